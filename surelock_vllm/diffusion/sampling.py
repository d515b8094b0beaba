"""LLaDA's unmasking rule as row-wise tensor functions.

One implementation for every sampler: the plain-torch reference
(`reference/sampler.py`), the one-request oracle (`denoiser.CanvasDenoiser`)
and the engine's batched step (`batch.DiffusionBatch`). Each function works on
rows independently, so a row gets the same result alone or in any batch:
* x0: argmax at temperature 0, Gumbel-max on float64 logits above (LLaDA's
  `add_gumbel_noise`), noise from the request's counter-based stream;
* confidence: the softmax probability of x0 (`low_confidence`) or a uniform
  score (`random`);
* transfer: the k most confident masked rows of each request, ties to the
  lower position (LLaDA's `torch.topk` leaves ties unspecified); k from the
  fixed schedule, or, with a confidence threshold (Fast-dLLM's parallel
  decoding), every row at least that confident, at least one, and at least
  enough to finish the block within the steps it has left.
"""

from __future__ import annotations

import torch

from surelock_vllm.diffusion.random import GUMBEL, REMASK_SCORE, uniform_matrix, uniform_rows


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows of [rows, vocab] float32 work to handle at once: about 4 MB on a CPU,
    so that several passes over a row run from cache, without fresh
    allocations; on a GPU, 64 rows (the work per launch is large enough)."""
    if device.type != "cpu":
        return 64
    return max(1, (4 << 20) // (vocab * 4))


def transfer_schedule(num_masked: int, steps: int) -> list[int]:
    """How many positions each step unmasks: an even split, earlier steps +1."""
    base, remainder = divmod(num_masked, steps)
    return [base + 1 if i < remainder else base for i in range(steps)]


def num_transfer(block_length: torch.Tensor, steps_per_block: torch.Tensor, step_in_block: torch.Tensor) -> torch.Tensor:
    """`transfer_schedule(block_length, steps_per_block)[step_in_block]`, per request."""
    base = torch.div(block_length, steps_per_block, rounding_mode="floor")
    return base + (step_in_block < block_length - base * steps_per_block).to(base.dtype)


def threshold_num_transfer(
    score: torch.Tensor,
    group: torch.Tensor,
    threshold: torch.Tensor,
    steps_left: torch.Tensor,
) -> torch.Tensor:
    """k per group under a confidence threshold: max(#rows with score >= threshold,
    ceil(masked rows / steps left in the block)).

    `score` [rows] of the block's masked rows, `group` [rows] their request;
    `threshold`, `steps_left` [groups]. The second term is 1 as long as the
    block can still finish one row per step (always, with steps = gen_length:
    Fast-dLLM's "at least one"); with fewer steps it makes steps an upper bound.
    """
    num_groups = threshold.shape[0]
    masked = torch.zeros(num_groups, dtype=torch.long, device=score.device)
    masked.index_add_(0, group, torch.ones_like(group))
    sure = torch.zeros_like(masked).index_add_(0, group, (score >= threshold[group]).long())
    at_least = torch.div(masked + steps_left - 1, steps_left, rounding_mode="floor")
    return torch.maximum(sure, at_least)


def x0_and_score(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    random_remasking: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
    position: torch.Tensor,
    any_sampled: bool,
    any_random: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and unmasking score per row of float32 `logits` [rows, vocab].

    Per row: temperature, remasking, seed, step and canvas position. x0 is the
    argmax (temperature 0) or LLaDA's Gumbel-max; the score is p(x0) under
    the softmax (`low_confidence`) or a uniform number (`random`), float64.
    `any_sampled` / `any_random`: whether some row has temperature > 0 /
    random remasking (the caller knows it on the host).

    The argmax and softmax run a few rows at a time into one buffer: a
    126k-token row is 0.5 MB, and both passes then read it from cache.
    """
    rows, vocab = logits.shape
    x0 = torch.empty((rows,), dtype=torch.long, device=logits.device)
    probs = torch.empty((rows,), dtype=logits.dtype, device=logits.device)
    chunk = min(chunk_rows(vocab, logits.device), max(1, rows))
    buffer = logits.new_empty((chunk, vocab))
    for lo in range(0, rows, chunk):
        hi = min(lo + chunk, rows)
        torch.argmax(logits[lo:hi], dim=-1, out=x0[lo:hi])
        softmax = torch.softmax(logits[lo:hi], dim=-1, out=buffer[: hi - lo])
        probs[lo:hi] = torch.gather(softmax, -1, x0[lo:hi, None]).squeeze(-1)
    if any_sampled:
        hot = (temperature > 0).nonzero().squeeze(-1)
        if hot.numel():
            noise = uniform_matrix(seed[hot], step[hot], position[hot], vocab, GUMBEL)
            gumbel = (-torch.log(noise)) ** temperature[hot, None]
            x0[hot] = (logits[hot].to(torch.float64).exp() / gumbel).argmax(dim=-1)
            probs[hot] = torch.gather(torch.softmax(logits[hot], dim=-1), -1, x0[hot, None]).squeeze(-1)
    score = probs.to(torch.float64)
    if any_random:
        score = torch.where(random_remasking, uniform_rows(seed, step, position, REMASK_SCORE), score)
    return x0, score


#: the score of a position `confidence_eos_eot_inf` holds back: below every other
#: masked position's (probabilities and uniform scores are >= 0), above the
#: rows outside the block and the unmasked ones (-inf in the reference sampler)
HELD_BACK_SCORE = -1.0


def ban_token(logits: torch.Tensor, rows: torch.Tensor | None, token_id: int) -> torch.Tensor:
    """LLaDA's `logits_eos_inf`: `token_id` gets logit -inf in the `rows` (bool [rows]; None: all).

    Returns a new tensor; the caller's logits (which the lock test may read) are untouched."""
    banned = logits.clone()
    banned[slice(None) if rows is None else rows, token_id] = -torch.inf
    return banned


def hold_back_tokens(
    score: torch.Tensor, x0: torch.Tensor, rows: torch.Tensor | None, token_ids: tuple[int | None, ...]
) -> torch.Tensor:
    """LLaDA's `confidence_eos_eot_inf`: in the `rows` (bool; None: all), a position whose x0 is
    one of `token_ids` (end-of-text, end-of-turn; None: the model has no such token) scores
    HELD_BACK_SCORE, so it is unmasked after every other masked position of its block (ties
    to the earlier position) and never passes a confidence threshold.

    This is the option as its name and LLaDA's Appendix B.4 state it. LLaDA's
    current generate.py line, `logits_with_noise[:, :, 126081] = logits[:, :, 126348]
    = -torch.inf`, is a chained assignment: the first target is written after x0
    was taken (no effect), the second makes an EoT prediction's confidence 0 and
    renormalises the others without EoT; an EOS prediction keeps its confidence.
    A literal -inf would also tie with the positions that are not masked, so a
    step could transfer fewer tokens than scheduled; a score just below every
    masked position's keeps the schedule.
    """
    hit = torch.zeros_like(x0, dtype=torch.bool)
    for token_id in token_ids:
        if token_id is not None:
            hit |= x0 == token_id
    return torch.where(hit if rows is None else rows & hit, HELD_BACK_SCORE, score)


def top_k_per_group(score: torch.Tensor, group: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool per row: among the rows of its group, one of the `k[group]` highest scores.

    Rows are given grouped and in position order within a group; ties go to
    the earlier row. One sort for all groups: by score, then (stably) by group.
    """
    by_score = torch.argsort(score, descending=True, stable=True)
    order = by_score[torch.argsort(group[by_score], stable=True)]
    sorted_group = group[order]
    first = torch.searchsorted(sorted_group, sorted_group, right=False)
    rank = torch.arange(order.numel(), device=order.device) - first
    chosen = torch.zeros_like(score, dtype=torch.bool)
    chosen[order] = rank < k[sorted_group]
    return chosen
