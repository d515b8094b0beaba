"""The LLaDA reference sampler (`generate` of LLaDA's generate.py), in plain torch.

One documented convention differs from LLaDA's script and is shared with the
vLLM executor so that sampled runs are comparable: random numbers (Gumbel
noise for temperature > 0, scores for `random` remasking) are drawn from a
per-request `torch.Generator` seeded with the request's seed, and only for the
rows of the current block. Rows outside the block can never be unmasked in
this step (their confidence is -inf), so this changes no distribution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from surelock_vllm.diffusion.options import DiffusionOptions


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    """LLaDA's Gumbel-max in float64: argmax(exp(l) / (-log u)^T)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def get_num_transfer_tokens(num_masked: int, steps: int) -> list[int]:
    base, remainder = divmod(num_masked, steps)
    return [base + 1 if i < remainder else base for i in range(steps)]


@torch.no_grad()
def reference_generate(
    model,
    prompt: list[int],
    options: DiffusionOptions,
    mask_id: int,
    seed: int = 0,
) -> list[int]:
    """Denoise `prompt + gen_length` masks; returns the generated ids (all of them).

    `model(ids[L]) -> logits[L, V]` runs on the whole canvas at every step,
    exactly like LLaDA's script with batch size 1 and cfg_scale 0.
    """
    generator = torch.Generator().manual_seed(seed)
    p = len(prompt)
    gen, block_length = options.gen_length, options.block_length
    x = torch.full((p + gen,), mask_id, dtype=torch.long)
    x[:p] = torch.tensor(prompt, dtype=torch.long)
    num_blocks = gen // block_length
    steps_per_block = options.steps // num_blocks
    for block in range(num_blocks):
        start, end = p + block * block_length, p + (block + 1) * block_length
        schedule = get_num_transfer_tokens(
            int((x[start:end] == mask_id).sum()), steps_per_block
        )
        for step in range(steps_per_block):
            mask_index = x == mask_id
            logits = model(x)
            # Random numbers only for the block's masked rows (module docstring).
            rows = mask_index.clone()
            rows[:start] = False
            rows[end:] = False
            x0 = x.clone()
            x0_p = torch.full(x.shape, -torch.inf, dtype=torch.float64)
            row_logits = logits[rows]
            if row_logits.shape[0] > 0:
                x0[rows] = torch.argmax(
                    add_gumbel_noise(row_logits, options.temperature, generator), dim=-1
                )
                if options.remasking == "low_confidence":
                    probs = F.softmax(row_logits.float(), dim=-1)
                    x0_p[rows] = torch.gather(probs, -1, x0[rows][:, None]).squeeze(-1).double()
                else:  # random
                    x0_p[rows] = torch.rand(int(rows.sum()), generator=generator).double()
            # LLaDA: positions past the block and unmasked ones never transfer.
            x0_p[end:] = -torch.inf
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            k = schedule[step]
            if k > 0:
                _, select = torch.topk(confidence, k=k)
                x[select] = x0[select]
    return x[p:].tolist()
