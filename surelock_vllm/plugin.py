"""What `register()` registers with transformers and vLLM."""

from __future__ import annotations

ARCHITECTURE = "LLaDAModelLM"
MODEL_CLASS = "surelock_vllm.model_executor.llada:LLaDAModelLM"

_registered = False


def register_all() -> None:
    global _registered
    if _registered:
        return
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from surelock_vllm.configuration_llada import LLaDAConfig
    from surelock_vllm.engine.attention import register_backends
    from surelock_vllm.engine.config_hook import LLaDAEngineConfig
    from surelock_vllm.vllm_internals import check_vllm_version

    check_vllm_version()
    AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    MODELS_CONFIG_MAP[ARCHITECTURE] = LLaDAEngineConfig
    register_backends()
    from surelock_vllm.patches import apply_all

    apply_all()
    _registered = True
