"""Resolve one vLLM request's diffusion options (engine side).

The scheduler calls `resolve_request` once per request when it arrives. The
result travels to the workers inside the request's own SamplingParams
(`extra_args[RESOLVED_KEY]`), so every tensor-parallel rank denoises with the
same options and the same seed.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from surelock_vllm.diffusion.options import (
    SURELOCK_KEYS,
    DiffusionOptions,
    InvalidDiffusionOption,
    SureLockOptions,
    length_option,
)
from surelock_vllm.engine.settings import ServerSettings

RESOLVED_KEY = "_surelock_resolved"


def resolve_request(
    sampling_params,
    prompt_len: int,
    *,
    max_model_len: int,
    max_rows_per_step: int,
    settings: ServerSettings = ServerSettings(),
    kv_block_size: int = 1,
) -> dict[str, Any]:
    """Validated options and seed; raises InvalidDiffusionOption naming the option.

    Called on the client's own parameters (the API server's validation, then
    the scheduler on arrival), before the engine has added anything.
    `kv_block_size`: the KV cache's block size (a guided request's second
    canvas starts on a block boundary).
    """
    check_supported_sampling(sampling_params)
    extra = dict(sampling_params.extra_args or {})
    for key in extra:
        if isinstance(key, str) and key.startswith("_"):
            raise InvalidDiffusionOption(key, "internal key, set by the engine; requests may not set it")
    surelock = settings.surelock.resolve(extra)
    options = DiffusionOptions.resolve(
        extra,
        max_tokens=sampling_params.max_tokens,
        temperature=sampling_params.temperature,
        defaults=settings.diffusion,
        limits=settings.limits,
        ignore_keys=frozenset(SURELOCK_KEYS),
        # the paper preset: one block over the whole generation, unless the request sets block_length
        one_block=surelock.preset == "paper",
    )
    if options.cfg_scale > 0 and surelock.enabled:
        own = {k: extra[k] for k in ("surelock", "surelock_preset") if k in extra}
        if SureLockOptions().resolve(own).enabled:  # the request's own keys ask for locking
            raise InvalidDiffusionOption(
                "cfg_scale",
                "classifier-free guidance cannot be combined with SureLock (the unconditional canvas "
                "would need locks of its own); set surelock to false or cfg_scale to 0",
            )
        # SureLock is this server's default, not the request's choice: guidance wins
        surelock = dataclasses.replace(surelock, enabled=False)
    canvas_len = prompt_len + options.gen_length
    gen_key = length_option(extra)
    if canvas_len > max_model_len:
        raise InvalidDiffusionOption(
            gen_key,
            f"prompt ({prompt_len} tokens) + gen_length ({options.gen_length}) "
            f"= {canvas_len} exceeds the model's context length {max_model_len}",
        )
    if canvas_len > max_rows_per_step:
        raise InvalidDiffusionOption(
            gen_key,
            f"the canvas (prompt {prompt_len} + gen_length {options.gen_length} "
            f"= {canvas_len} rows) exceeds max_num_batched_tokens={max_rows_per_step}",
        )
    if options.cfg_scale > 0:
        rows, kv_tokens = guided_rows(canvas_len), guided_kv_tokens(canvas_len, kv_block_size)
        if rows > max_rows_per_step:
            raise InvalidDiffusionOption(
                "cfg_scale",
                f"guidance runs the canvas twice ({rows} rows a step), more than "
                f"max_num_batched_tokens={max_rows_per_step}",
            )
        if kv_tokens > max_model_len:
            raise InvalidDiffusionOption(
                "cfg_scale",
                f"guidance keeps a second canvas in the KV cache ({kv_tokens} slots with the first), "
                f"more than the model's context length {max_model_len}",
            )
    seed = sampling_params.seed
    if seed is None:
        seed = random.getrandbits(63)
    return {"options": options.as_dict(), "surelock": surelock.as_dict(), "seed": int(seed)}


def guided_rows(canvas_len: int) -> int:
    """Rows a guided request computes each step: its canvas and the unconditional one."""
    return 2 * canvas_len


def guided_kv_tokens(canvas_len: int, block_size: int) -> int:
    """KV slots of a guided request: the canvas, then the unconditional canvas from the next
    block boundary on (each sequence's K/V are addressed by a block table of its own)."""
    return -(-canvas_len // block_size) * block_size + canvas_len


# SamplingParams fields the LLaDA sampler cannot honour: (field, value that
# means "unused", why). It samples x0 by argmax / Gumbel-max over the full
# posterior and unmasks by confidence; there is no per-token logit processing
# and no logprob to report for tokens decided in parallel.
UNSUPPORTED_SAMPLING = (
    ("top_p", 1.0, "nucleus sampling"),
    ("top_k", (0, -1, None), "top-k sampling"),
    ("min_p", 0.0, "min-p sampling"),
    ("presence_penalty", 0.0, "presence penalty"),
    ("frequency_penalty", 0.0, "frequency penalty"),
    ("repetition_penalty", 1.0, "repetition penalty"),
    ("logprobs", None, "logprobs"),
    ("prompt_logprobs", None, "prompt logprobs"),
    ("logit_bias", (None, {}), "logit bias"),
    ("allowed_token_ids", (None, []), "allowed_token_ids"),
    ("bad_words", (None, []), "bad_words"),
    ("structured_outputs", None, "structured outputs"),
    ("min_tokens", 0, "min_tokens (EOS cannot be suppressed per position)"),
)


def check_supported_sampling(sampling_params) -> None:
    for name, unused, what in UNSUPPORTED_SAMPLING:
        value = getattr(sampling_params, name, None)
        allowed = unused if isinstance(unused, tuple) else (unused,)
        if value not in allowed:
            raise InvalidDiffusionOption(
                name, f"{what} is not supported by the masked-diffusion sampler (got {value!r})"
            )
