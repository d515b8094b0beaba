"""SureLock's lock rule (arXiv 2602.06412), in plain torch: the step-wise KL and
the per-request lock state. Options: options.SureLockOptions; FLOPs: flops.py.

Per request, per step t, with A the unlocked positions:
  Z = A ∩ unmasked  (prompt positions count as unmasked when `lock_prompt`),
        unmasked before this step's unmasking (`candidates="before_unmask"`,
        the default) or after it (`"after_unmask"`, the paper's Algorithm 1:
        a token unmasked at step t is tested, and may lock, at t, with the
        posterior and K/V its [MASK] input produced)
  D_i = KL(p_t^i || p_{t-1}^i) over the vocabulary, on the raw posterior
        (no temperature); infinite when position i has no posterior from the
        previous step (its first step)
  optional confidence gate: u_i = 1 - max p_t^i must be among the smallest
        `confidence_gate` fraction of u over Z (the paper uses 20%)
  lock F = {i in Z : D_i < eps (and the gate)}: strict by default, so eps = 0
        never locks (identical posteriors give D_i = 0); `kl_test="<="` is
        Algorithm 1's D_i <= eps.
A locked position stays locked: from the next step on it is not computed at
all, and its K/V stay as computed at its lock step. Masked positions never lock.

Prompt positions: the paper's sure test runs over every unmasked position, and
the prompt is unmasked from the start, so by default prompt positions lock like
any other converged position (`lock_prompt=True`). `lock_prompt=False` keeps the
prompt recomputed every step (more compute, prompt K/V always fresh).
"""

from __future__ import annotations

import math

import torch

from surelock_vllm.diffusion.options import SureLockOptions


def stepwise_kl(
    logp_now: torch.Tensor,
    logp_prev: torch.Tensor,
    p_now: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p_t || p_{t-1}) = sum p_t (logp_t - logp_{t-1}) per row, from log-probabilities [rows, vocab].

    The difference is taken first, so the result is accurate to rounding of
    the KL itself, not of the entropy (two separate sums would lose ~1e-7
    absolute, enough to flip a decision within that of eps). At a 126k
    vocabulary this is most of the lock test's cost: a caller may pass
    p_t = exp(logp_t) and a scratch buffer it already holds (same shape);
    the values are the same.
    """
    p = logp_now.exp() if p_now is None else p_now
    difference = logp_now - logp_prev if scratch is None else torch.sub(logp_now, logp_prev, out=scratch)
    return difference.mul_(p).sum(-1).clamp_min(0.0)


_EMPTY = torch.empty(0, dtype=torch.long)


class LockState:
    """Lock flags and last posteriors of one request's canvas."""

    def __init__(self, canvas_len: int, prompt_len: int, options: SureLockOptions):
        self.options = options
        self.prompt_len = prompt_len
        self.locked = torch.zeros(canvas_len, dtype=torch.bool)
        # step at which each position locked (-1: never)
        self.lock_step = torch.full((canvas_len,), -1, dtype=torch.long)
        self._prev_logp: torch.Tensor | None = None  # [canvas_len, vocab], lazily
        self._has_prev = torch.zeros(canvas_len, dtype=torch.bool)
        self.num_locked = 0

    def _confidence_gate(self, logp: torch.Tensor, in_z: torch.Tensor) -> torch.Tensor:
        """Rows of Z among the `confidence_gate` fraction with the least uncertainty."""
        zrows = in_z.nonzero().squeeze(-1)
        gate = torch.zeros_like(in_z)
        if zrows.numel():
            uncertainty = 1.0 - logp[zrows].max(-1).values.exp()
            keep = max(1, math.ceil(self.options.confidence_gate * zrows.numel()))
            gate[zrows[torch.argsort(uncertainty, stable=True)[:keep]]] = True
        return gate

    def candidates(self, masked: torch.Tensor) -> torch.Tensor:
        """Z as a bool mask: unlocked, unmasked (and not prompt unless lock_prompt)."""
        z = ~self.locked & ~masked
        if not self.options.lock_prompt:
            z[: self.prompt_len] = False
        return z

    def observe(
        self,
        positions: torch.Tensor,
        logits: torch.Tensor,
        z: torch.Tensor,
        step: int,
    ) -> torch.Tensor:
        """Record posteriors of `positions` and lock the converged ones of Z.

        `positions` are the rows whose logits this step computed; `z` the
        candidate mask (`candidates`, before or after this step's unmasking;
        either way a subset of `positions`). Returns the positions locked now.
        """
        logp = torch.log_softmax(logits.float(), dim=-1)
        if self._prev_logp is None:
            self._prev_logp = torch.zeros(self.locked.shape[0], logp.shape[-1])
        newly = _EMPTY
        if self.options.enabled:
            in_z = z[positions]
            # KL of every row read (Z plus a few masked block rows: cheaper
            # than gathering Z first); rows with no previous posterior (their
            # first observation) never lock.
            kl = stepwise_kl(logp, self._prev_logp[positions])
            passes = kl <= self.options.eps if self.options.inclusive else kl < self.options.eps
            sure = in_z & self._has_prev[positions] & passes
            if self.options.confidence_gate is not None:
                sure &= self._confidence_gate(logp, in_z)
            newly = positions[sure]
            if newly.numel():
                self.locked[newly] = True
                self.lock_step[newly] = step
                self.num_locked += int(newly.numel())
        self._prev_logp[positions] = logp
        self._has_prev[positions] = True
        return newly
