"""Fast-dLLM's block caches as a rule for which canvas rows a step computes.

A block cache trades exactness for rows: some rows are not computed at a step
although they are not locked, and the other rows attend to the K/V those rows
had when they were last computed (Fast-dLLM, Wu et al. 2025,
`generate_with_prefix_cache` / `generate_with_dual_cache`):

* `none`: every unlocked row, every step (the reference sampler's semantics);
* `prefix`: at a block's first step (the refresh) every unlocked row; at its
  other steps only the unlocked rows from the block's start on (the block and
  the suffix); the prefix (prompt and finished blocks) keeps the K/V of the
  refresh;
* `dual`: at the refresh every unlocked row; at the block's other steps only
  its unlocked rows; prefix and suffix keep the K/V of the refresh.

Combined with SureLock, a step computes a row when it is unlocked AND the
policy computes it: a locked row is never computed again, not even at a
refresh (its K/V are final); a row the policy freezes is computed again at
the next refresh. The lock test only sees rows computed at this step: its
candidates Z are the computed, unmasked, unlocked rows, and a row's previous
posterior is the one of the last step that computed it (for a row frozen
since the refresh: the refresh's). So a frozen prefix row is tested once per
block, refresh against refresh.

With a confidence threshold a block can end before its steps run out; the
next block's first step is then the refresh, as in Fast-dLLM. Plain torch, no
vLLM: the batched step (batch.py), the one-request oracle (denoiser.py) and
the reference (reference/block_cache.py) share this rule.
"""

from __future__ import annotations

import torch

from surelock_vllm.diffusion.options import KV_CACHE_CHOICES

#: per-slot code of each policy in the batch's tensors
KV_CACHE_CODE = {name: i for i, name in enumerate(KV_CACHE_CHOICES)}
NONE, PREFIX, DUAL = (KV_CACHE_CODE[name] for name in KV_CACHE_CHOICES)


def policy_rows(
    positions: torch.Tensor,
    block_start: torch.Tensor,
    block_length: torch.Tensor,
    refresh: torch.Tensor,
    policy: torch.Tensor,
) -> torch.Tensor:
    """Bool mask of the rows the block cache lets a step compute (before the locks).

    Broadcasts: `positions` [..., W] canvas positions; `block_start`,
    `block_length`, `refresh` (the block's first step) and `policy`
    (KV_CACHE_CODE) per request, shaped to broadcast against them.
    """
    from_block = positions >= block_start
    in_block = from_block & (positions < block_start + block_length)
    return refresh | (policy == NONE) | ((policy == PREFIX) & from_block) | ((policy == DUAL) & in_block)


def rows_for(policy: str, canvas_len: int, block_start: int, block_length: int, refresh: bool) -> torch.Tensor:
    """One request's mask over its canvas (the oracle's and the reference's form)."""
    return policy_rows(
        torch.arange(canvas_len), torch.tensor(block_start), torch.tensor(block_length),
        torch.tensor(refresh), torch.tensor(KV_CACHE_CODE[policy]),
    )
