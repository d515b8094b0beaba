"""Patch: a diffusion request's max_tokens is a default, not a cap, and never silently clamped.

What: the OpenAI server computes each request's max_tokens with
`vllm.entrypoints.serve.utils.api_utils.get_max_tokens`, which takes the
generation config's `max_new_tokens` both as the default (request gave no
max_tokens) and as a server-wide cap (`override_max_tokens`). When the value
came from this plugin (`--plugin surelock` / `--diffusion-gen-length`, see
cli_flags.py), the patched function drops the cap: a request that gives
max_tokens gets that many (up to the context), one that gives none gets the
diffusion default. A `max_new_tokens` the user set themselves
(`--override-generation-config`, the model's generation_config.json) keeps
vLLM's cap semantics.

When the server serves LLaDA (request_validation.serving_llada), a request
whose prompt plus generation length exceeds the context is refused with a
400 naming `max_tokens`, where vLLM would cut max_tokens to what fits: for a
diffusion request the length is the canvas, and cutting it changes the block
layout (and with it the answer) without telling the client. The same length
given as `vllm_xargs.gen_length` is refused by the request validation.

Why: a masked-diffusion request pays for its whole canvas (prompt +
gen_length) at every step, so vLLM's fallback for requests without max_tokens
(the rest of the context, thousands of positions for LLaDA-8B) is the wrong
default; but the only per-model default vLLM has also caps every request, so
`max_tokens: 256` would silently become 128.

Versions: vLLM 0.32.0 (`get_max_tokens(max_model_len, max_tokens,
input_length, default_sampling_params, override_max_tokens, ...)`, imported by
name into the chat, completion, render and batch serving modules). Retire when
vLLM separates the default max_tokens from the server-wide cap.
"""

from __future__ import annotations

import sys

#: the max_new_tokens value this plugin injected (cli_flags), None if it did not
plugin_default_max_tokens: int | None = None

_original_get_max_tokens = None


def apply() -> None:
    global _original_get_max_tokens
    from vllm.entrypoints.serve.utils import api_utils

    if is_applied():
        return
    _original_get_max_tokens = api_utils.get_max_tokens

    def get_max_tokens(max_model_len, max_tokens, input_length, default_sampling_params,
                       override_max_tokens=None, truncate_prompt_tokens=None):
        from surelock_vllm.patches import request_validation

        if plugin_default_max_tokens is not None and override_max_tokens == plugin_default_max_tokens:
            override_max_tokens = None  # a default, not a cap
        result = _original_get_max_tokens(max_model_len, max_tokens, input_length, default_sampling_params,
                                          override_max_tokens, truncate_prompt_tokens)
        if request_validation.serving_llada:
            wanted = max_tokens if max_tokens is not None else default_sampling_params.get("max_tokens")
            if wanted is not None and result < wanted and result == max_model_len - input_length:
                _refuse_overflow(max_model_len, input_length, wanted, given=max_tokens is not None)
        return result

    get_max_tokens._surelock_patch = True
    api_utils.get_max_tokens = get_max_tokens
    # Serving modules imported before the plugin loaded hold the original by name.
    # (vars(), not getattr: lazy modules would import on attribute access)
    for name, module in list(sys.modules.items()):
        if name.startswith("vllm.") and vars(module).get("get_max_tokens") is _original_get_max_tokens:
            module.get_max_tokens = get_max_tokens


def _refuse_overflow(max_model_len: int, input_length: int, wanted: int, given: bool) -> None:
    from vllm.exceptions import VLLMValidationError

    what = "max_tokens" if given else "the default generation length (no max_tokens given)"
    raise VLLMValidationError(
        f"prompt ({input_length} tokens) + {what} ({wanted}) = {input_length + wanted} exceeds "
        f"the model's context length {max_model_len}; a diffusion canvas is not cut to fit",
        parameter="max_tokens",
    )


def is_applied() -> bool:
    from vllm.entrypoints.serve.utils import api_utils

    return getattr(api_utils.get_max_tokens, "_surelock_patch", False)
