"""Plain-torch SureLock: the reference sampler with locked rows skipped.

Each step runs the model on the unlocked rows only (`forward_rows`), with a
per-layer K/V cache of the whole canvas holding locked rows' K/V as of their
lock step, exactly the computation SureLock prescribes. The vLLM path does the
same with paged KV blocks; tests compare tokens and lock decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.diffusion.lock_rule import LockState
from surelock_vllm.reference.sampler import (
    block_finished,
    get_num_transfer_tokens,
    num_to_transfer,
    top_k,
    x0_and_confidence,
)


@dataclass
class SureLockRun:
    tokens: list[int]  # generated ids
    lock_step: list[int]  # per canvas position: step it locked at, -1 never
    rows_per_step: list[int]  # rows fed to the model at each step


@torch.no_grad()
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
    if options.cfg_scale > 0:
        raise ValueError("classifier-free guidance is not combined with SureLock")
    p = len(prompt)
    x = torch.full((p + options.gen_length,), mask_id, dtype=torch.long)
    x[:p] = torch.tensor(prompt, dtype=torch.long)
    caches = model.new_kv_caches(x.shape[0])
    lock = LockState(x.shape[0], p, lock_options)
    rows_per_step: list[int] = []
    step_index = 0
    for block in range(options.num_blocks):
        start = p + block * options.block_length
        end = start + options.block_length
        schedule = get_num_transfer_tokens(int((x[start:end] == mask_id).sum()), options.steps_per_block)
        for step in range(options.steps_per_block):
            mask_index = x == mask_id
            active = (~lock.locked).nonzero().squeeze(-1)
            rows_per_step.append(int(active.numel()))
            logits = torch.full((x.shape[0], model.config.vocab_size), float("nan"))
            if active.numel():  # every row can be locked (more steps than positions to unmask)
                logits[active] = model.forward_rows(x[active], active, caches)
            z = lock.candidates(mask_index)
            # posteriors needed: Z (lock test) and the block's masked rows (sampling)
            block_masked = mask_index.clone()
            block_masked[:start] = False
            block_masked[end:] = False
            observed = (z | block_masked).nonzero().squeeze(-1)
            # LLaDA's unmasking rule, random numbers for the block's masked rows only
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
            if lock_options.after_unmask:
                z = lock.candidates(x == mask_id)  # Algorithm 1: Z after this step's UpdateMASK
            lock.observe(observed, logits[observed], z, step_index)
            step_index += 1
            if block_finished(x, start, end, options, mask_id):
                break
    return SureLockRun(
        tokens=x[p:].tolist(),
        lock_step=lock.lock_step.tolist(),
        rows_per_step=rows_per_step,
    )
