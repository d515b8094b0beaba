"""Plain-torch SureLock: the reference sampler with locked rows skipped.

Each step runs the model on the unlocked rows only (`forward_rows`), with a
per-layer K/V cache of the whole canvas holding locked rows' K/V as of their
lock step, exactly the computation SureLock prescribes. The vLLM path does the
same with paged KV blocks; tests compare tokens and lock decisions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.reference.block_cache import reference_generate_cached


@dataclass
class SureLockRun:
    tokens: list[int]  # generated ids
    lock_step: list[int]  # per canvas position: step it locked at, -1 never
    rows_per_step: list[int]  # rows fed to the model at each step


def reference_generate_surelock(
    model,
    prompt: list[int],
    options: DiffusionOptions,
    lock_options: SureLockOptions,
    mask_id: int,
    seed: int = 0,
    eos_id: int | None = None,
    eot_id: int | None = None,
) -> SureLockRun:
    """SureLock without a block cache: the cached reference's `none` policy (every unlocked
    row, every step), which is exactly this computation."""
    if options.cfg_scale > 0:
        raise ValueError("classifier-free guidance is not combined with SureLock")
    run = reference_generate_cached(model, prompt, dataclasses.replace(options, kv_cache="none"), mask_id, seed,
                                    eos_id, eot_id, lock_options=lock_options)
    return SureLockRun(tokens=run.tokens, lock_step=run.lock_step, rows_per_step=run.rows_per_step)
