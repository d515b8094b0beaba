"""Plain-torch Fast-dLLM: the reference sampler with a prefix or dual block cache.

One request at a time, written from the semantics of Fast-dLLM's
`generate_with_prefix_cache` and `generate_with_dual_cache` (LLaDA's
generate.py with an approximate K/V cache):

    for each block:
        refresh: run the model over the whole canvas, keep every row's K/V,
                 unmask with these logits (the block's first step);
        until the block's steps are done (or, with a confidence threshold,
        nothing in it is masked):
            prefix: run the block and everything after it, attending to the
                    prefix's K/V of the refresh;
            dual:   run the block only, attending to the prefix's and the
                    suffix's K/V of the refresh;
            unmask with these logits.

It is the benchmark's stand-in for Fast-dLLM itself ("batch 1, Fast-dLLM's
algorithm in plain torch") and the oracle the engine's `kv_cache` requests are
compared with, token for token. With `lock_options` it also runs SureLock on
top: locked rows are never computed, not even at a refresh, and the lock test
reads the rows each step computes (diffusion/block_cache.py has the combined
rule). Sampling, schedules and random numbers are the reference sampler's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surelock_vllm.diffusion.block_cache import rows_for
from surelock_vllm.diffusion.lock_rule import LockState
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.reference.sampler import (
    block_finished,
    get_num_transfer_tokens,
    num_to_transfer,
    top_k,
    x0_and_confidence,
)


@dataclass
class CachedRun:
    tokens: list[int]  # generated ids
    rows_per_step: list[int]  # rows fed to the model at each step
    lock_step: list[int]  # per canvas position: step it locked at, -1 never (all -1 without SureLock)
    refresh_steps: list[int]  # the steps that were a block's first (every unlocked row computed)


@torch.no_grad()
def reference_generate_cached(
    model,
    prompt: list[int],
    options: DiffusionOptions,
    mask_id: int,
    seed: int = 0,
    eos_id: int | None = None,
    eot_id: int | None = None,
    lock_options: SureLockOptions | None = None,
) -> CachedRun:
    """Denoise `prompt + gen_length` masks with `options.kv_cache` (none, prefix or dual).

    `model.forward_rows(ids, positions, caches)` computes some rows of the
    canvas, writing their K/V into `caches` (one per layer, the whole canvas)
    and attending to every row's K/V there: rows not computed at a step are
    read as they were when last computed.
    """
    if options.cfg_scale > 0:
        raise ValueError("classifier-free guidance is not combined with a block cache or SureLock")
    p = len(prompt)
    x = torch.full((p + options.gen_length,), mask_id, dtype=torch.long)
    x[:p] = torch.tensor(prompt, dtype=torch.long)
    caches = model.new_kv_caches(x.shape[0])
    locking = lock_options is not None and lock_options.enabled
    lock = LockState(x.shape[0], p, lock_options) if locking else None
    locked = lock.locked if lock is not None else torch.zeros(x.shape[0], dtype=torch.bool)
    rows_per_step: list[int] = []
    refresh_steps: list[int] = []
    step_index = 0
    for block in range(options.num_blocks):
        start = p + block * options.block_length
        end = start + options.block_length
        schedule = get_num_transfer_tokens(int((x[start:end] == mask_id).sum()), options.steps_per_block)
        for step in range(options.steps_per_block):
            # step 0 is the block's refresh: every unlocked row
            computed = rows_for(options.kv_cache, x.shape[0], start, options.block_length, step == 0) & ~locked
            rows = computed.nonzero().squeeze(-1)
            if step == 0:
                refresh_steps.append(step_index)
            rows_per_step.append(int(rows.numel()))
            logits = torch.full((x.shape[0], model.config.vocab_size), float("nan"))
            if rows.numel():
                logits[rows] = model.forward_rows(x[rows], rows, caches)
            mask_index = x == mask_id
            block_masked = mask_index.clone()
            block_masked[:start] = False
            block_masked[end:] = False
            z = lock.candidates(mask_index) & computed if lock is not None else None
            x0 = x.clone()
            x0_p = torch.full(x.shape, -torch.inf, dtype=torch.float64)
            if block_masked.any():
                x0[block_masked], x0_p[block_masked] = x0_and_confidence(
                    logits[block_masked], block_masked.nonzero().squeeze(-1), options, seed, step_index,
                    eos_id, eot_id)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            k = num_to_transfer(confidence, options, schedule, step, int(block_masked.sum()))
            if k > 0:
                select = top_k(confidence, k)
                x[select] = x0[select]
            if lock is not None:
                if lock_options.after_unmask:
                    z = lock.candidates(x == mask_id) & computed  # Algorithm 1: after this step's unmasking
                observed = (z | block_masked).nonzero().squeeze(-1)
                lock.observe(observed, logits[observed], z, step_index)
            step_index += 1
            if block_finished(x, start, end, options, mask_id):
                break
    return CachedRun(
        tokens=x[p:].tolist(),
        rows_per_step=rows_per_step,
        lock_step=lock.lock_step.tolist() if lock is not None else [-1] * x.shape[0],
        refresh_steps=refresh_steps,
    )
