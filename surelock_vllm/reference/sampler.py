"""The LLaDA reference sampler (`generate` of LLaDA's generate.py), in plain torch.

Two documented conventions differ from LLaDA's script and are shared with the
vLLM executor so that runs compare token for token:
* random numbers (Gumbel noise for temperature > 0, scores for `random`
  remasking) come from the request's counter-based stream
  (`diffusion/random.py`: a hash of seed, step, position and vocabulary
  index), and only for the rows of the current block. Rows outside the block
  can never be unmasked in this step (their confidence is -inf), so this
  changes no distribution;
* among equally confident positions the earlier one is unmasked first
  (LLaDA's `torch.topk` leaves the order of ties unspecified).

With `confidence_threshold` set, a step unmasks as Fast-dLLM's parallel
decoding does (`get_transfer_index` with `threshold`): every masked position
of the block at least that confident, and at least one; a block ends when
nothing in it is masked. Our `steps` stays an upper bound: a step also
unmasks at least ceil(masked / steps left in the block) positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from surelock_vllm.diffusion.options import DiffusionOptions
from surelock_vllm.diffusion.random import GUMBEL, REMASK_SCORE, request_seed, uniform_matrix, uniform_rows
from surelock_vllm.diffusion.sampling import ban_token, hold_back_tokens


def add_gumbel_noise(logits: torch.Tensor, temperature: float, seed: int, step: int, positions: torch.Tensor) -> torch.Tensor:
    """LLaDA's Gumbel-max in float64: argmax(exp(l) / (-log u)^T), for the rows at `positions`."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = uniform_matrix(*_keys(seed, step, positions), logits.shape[-1], GUMBEL)
    gumbel_noise = (-torch.log(noise)) ** torch.tensor(temperature, dtype=torch.float64)
    return logits.exp() / gumbel_noise


def random_scores(seed: int, step: int, positions: torch.Tensor) -> torch.Tensor:
    """`random` remasking's score of each row at `positions`."""
    return uniform_rows(*_keys(seed, step, positions), REMASK_SCORE)


def _keys(seed: int, step: int, positions: torch.Tensor):
    n = positions.shape[0]
    return torch.full((n,), request_seed(seed)), torch.full((n,), step), positions


def top_k(confidence: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest confidences, ties to the lower index."""
    return torch.argsort(confidence, descending=True, stable=True)[:k]


def x0_and_confidence(
    row_logits: torch.Tensor,
    positions: torch.Tensor,
    options: DiffusionOptions,
    seed: int,
    step: int,
    eos_id: int | None = None,
    eot_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA's x0 and confidence (float64) for the block's masked rows at `positions`."""
    if options.logits_eos_inf:
        row_logits = ban_token(row_logits, None, eos_id)
    x0 = torch.argmax(add_gumbel_noise(row_logits, options.temperature, seed, step, positions), dim=-1)
    if options.remasking == "low_confidence":
        probs = F.softmax(row_logits.float(), dim=-1)
        confidence = torch.gather(probs, -1, x0[:, None]).squeeze(-1).double()
    else:  # random
        confidence = random_scores(seed, step, positions)
    if options.confidence_eos_eot_inf:
        confidence = hold_back_tokens(confidence, x0, None, (eos_id, eot_id))
    return x0, confidence


def get_num_transfer_tokens(num_masked: int, steps: int) -> list[int]:
    base, remainder = divmod(num_masked, steps)
    return [base + 1 if i < remainder else base for i in range(steps)]


def num_to_transfer(
    confidence: torch.Tensor, options: DiffusionOptions, schedule: list[int], step: int, num_masked: int
) -> int:
    """Positions to unmask at `step` of a block with `num_masked` masked positions left.

    `confidence` is -inf outside the block's masked positions.
    """
    threshold = options.confidence_threshold
    if threshold is None:
        return schedule[step]
    steps_left = options.steps_per_block - step
    return max(int((confidence >= threshold).sum()), -(-num_masked // steps_left))


def block_finished(x: torch.Tensor, start: int, end: int, options: DiffusionOptions, mask_id: int) -> bool:
    """With a confidence threshold a block ends as soon as nothing in it is masked."""
    return options.confidence_threshold is not None and not bool((x[start:end] == mask_id).any())


@torch.no_grad()
def reference_generate(
    model,
    prompt: list[int],
    options: DiffusionOptions,
    mask_id: int,
    seed: int = 0,
    eos_id: int | None = None,
    eot_id: int | None = None,
) -> list[int]:
    """Denoise `prompt + gen_length` masks; returns the generated ids (all of them).

    `model(ids[L]) -> logits[L, V]` runs on the whole canvas at every step
    (twice with `cfg_scale`), exactly like LLaDA's script with batch size 1.
    `eos_id` / `eot_id`: end-of-text and end-of-turn, for the EOS options.
    """
    p = len(prompt)
    gen, block_length = options.gen_length, options.block_length
    x = torch.full((p + gen,), mask_id, dtype=torch.long)
    x[:p] = torch.tensor(prompt, dtype=torch.long)
    prompt_index = x != mask_id  # LLaDA's: what the unconditional canvas masks
    num_blocks = gen // block_length
    steps_per_block = options.steps // num_blocks
    step_index = 0
    for block in range(num_blocks):
        start, end = p + block * block_length, p + (block + 1) * block_length
        schedule = get_num_transfer_tokens(
            int((x[start:end] == mask_id).sum()), steps_per_block
        )
        for step in range(steps_per_block):
            mask_index = x == mask_id
            if options.cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits, un_logits = model(x).float(), model(un_x).float()
                logits = un_logits + (options.cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            # Random numbers only for the block's masked rows (module docstring).
            rows = mask_index.clone()
            rows[:start] = False
            rows[end:] = False
            x0 = x.clone()
            x0_p = torch.full(x.shape, -torch.inf, dtype=torch.float64)
            if rows.any():
                positions = rows.nonzero().squeeze(-1)
                x0[rows], x0_p[rows] = x0_and_confidence(
                    logits[rows], positions, options, seed, step_index, eos_id, eot_id)
            # LLaDA: positions past the block and unmasked ones never transfer.
            x0_p[end:] = -torch.inf
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            k = num_to_transfer(confidence, options, schedule, step, int(mask_index[start:end].sum()))
            if k > 0:
                select = top_k(confidence, k)
                x[select] = x0[select]
            step_index += 1
            if block_finished(x, start, end, options, mask_id):
                break
    return x[p:].tolist()
