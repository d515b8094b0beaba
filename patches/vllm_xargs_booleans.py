"""Patch: `vllm_xargs` keeps JSON booleans as booleans in the OpenAI server.

What: the `vllm_xargs` field of the completions and chat request models is
re-declared as `dict[str, bool | str | int | float | list[...]]` (vLLM:
without `bool`) and the models are rebuilt, so `{"surelock": true}` arrives
as `True` and `{"steps": true}` is refused by the diffusion options'
validation as "must be a positive integer, got True".

Why: pydantic's lax mode turns a JSON `true` into the int `1` for a field
typed `str | int | float`, so `steps: true` used to run as one step (or fail
with a message about block counts the client never sent). Integers, floats,
strings and lists validate exactly as before.

Versions: vLLM 0.32.0 (`CompletionRequest` / `ChatCompletionRequest`
`vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None`).
Must run before the API server's FastAPI routes are built (plugins load while
the CLI parser is made, before `vllm.entrypoints.openai.*.api_router` is
imported; test_patches checks the models, test_server_limits a live server). Retire
when vLLM accepts booleans in `vllm_xargs`.
"""

from __future__ import annotations

_original_annotations: dict = {}


def openai_request_classes():
    """The request models of /v1/completions and /v1/chat/completions."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return (CompletionRequest, ChatCompletionRequest)


def apply() -> None:
    if is_applied():
        return
    scalar = bool | str | int | float
    for cls in openai_request_classes():
        field = cls.model_fields["vllm_xargs"]
        _original_annotations[cls] = field.annotation
        field.annotation = dict[str, scalar | list[scalar]] | None
        cls.model_rebuild(force=True)
        cls._surelock_xargs_patch = True


def is_applied() -> bool:
    return all(getattr(cls, "_surelock_xargs_patch", False) for cls in openai_request_classes())
