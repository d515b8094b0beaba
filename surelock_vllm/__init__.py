"""surelock-vllm: masked diffusion LMs (LLaDA) with SureLock, served by vLLM."""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point (`vllm.general_plugins: surelock`).

    Runs in every vLLM process; idempotent and cheap: registrations only, the
    engine classes are imported by qualified name when an engine starts.
    """
    from surelock_vllm.plugin import register_all

    register_all()
