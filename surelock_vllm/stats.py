"""Reading SureLock's per-request accounting from vLLM outputs."""

from __future__ import annotations

from typing import Any


def surelock_stats(request_output) -> dict[str, Any] | None:
    """Rows and FLOPs a finished request computed, vs. the same sampler without locking.

    Keys: steps (taken), steps_fixed (the fixed schedule's), rows, rows_nolock,
    dense_flops(_nolock), attention_flops(_nolock), lm_head_flops, locked_fraction
    (per step), flops_ratio. The engine delivers
    them in `RequestOutput.kv_transfer_params["surelock"]` (and in the
    `kv_transfer_params` field of OpenAI responses).
    """
    params = getattr(request_output, "kv_transfer_params", None) or {}
    return params.get("surelock")
