"""SureLock's lock rule (arXiv 2602.06412), in plain torch.

Per request, per step t, with A the unlocked positions:
  Z = A ∩ unmasked  (prompt positions count as unmasked when `lock_prompt`)
  D_i = KL(p_t^i || p_{t-1}^i) over the vocabulary, on the raw posterior
        (no temperature); infinite when position i has no posterior from the
        previous step (its first step)
  optional confidence gate: u_i = 1 - max p_t^i must be among the smallest
        `confidence_gate` fraction of u over Z (the paper uses 20%)
  lock F = {i in Z : D_i < eps (and the gate)}: strict, as in the paper, so
        eps = 0 never locks (identical posteriors give D_i = 0).
A locked position stays locked: from the next step on it is not computed at
all, and its K/V stay as computed at its lock step. Masked positions never lock.

Prompt positions: the paper's sure test runs over every unmasked position, and
the prompt is unmasked from the start, so by default prompt positions lock like
any other converged position (`lock_prompt=True`). `lock_prompt=False` keeps the
prompt recomputed every step (more compute, prompt K/V always fresh).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from surelock_vllm.diffusion.options import InvalidDiffusionOption

#: per-request keys (SamplingParams.extra_args / vllm_xargs)
REQUEST_KEYS = {
    "surelock": "enabled",
    "surelock_eps": "eps",
    "surelock_confidence_gate": "confidence_gate",
    "surelock_lock_prompt": "lock_prompt",
}


@dataclass(frozen=True)
class SureLockOptions:
    enabled: bool = False
    eps: float = 5e-3
    confidence_gate: float | None = None  # fraction m of Z; None = no gate
    lock_prompt: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_defaults(cls, values: Mapping[str, Any] | None) -> "SureLockOptions":
        """Server defaults: `--additional-config '{"surelock": {"enabled": true, "eps": ...}}'`."""
        values = dict(values or {})
        known = {k: values[k] for k in ("enabled", "eps", "confidence_gate", "lock_prompt") if k in values}
        return cls()._validated(known, names={k: k for k in known})

    def resolve(self, extra_args: Mapping[str, Any] | None) -> "SureLockOptions":
        """This request's options: server defaults overridden by request keys."""
        extra = dict(extra_args or {})
        given = {field: extra[key] for key, field in REQUEST_KEYS.items() if key in extra}
        names = {field: key for key, field in REQUEST_KEYS.items()}
        return self._validated(given, names)

    def _validated(self, given: dict[str, Any], names: dict[str, str]) -> "SureLockOptions":
        values = {**self.as_dict(), **given}
        for field in ("enabled", "lock_prompt"):
            values[field] = _as_bool(values[field], names.get(field, field))
        eps = values["eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise InvalidDiffusionOption(names.get("eps", "eps"), f"must be a finite number >= 0, got {eps!r}")
        gate = values["confidence_gate"]
        if gate is not None and (
            isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 < gate <= 1
        ):
            raise InvalidDiffusionOption(
                names.get("confidence_gate", "confidence_gate"),
                f"must be a fraction in (0, 1] or null, got {gate!r}",
            )
        values["eps"] = float(eps)
        values["confidence_gate"] = None if gate is None else float(gate)
        return SureLockOptions(**values)


def _as_bool(value: Any, name: str) -> bool:
    """true/false; also 1/0 and "true"/"false", the forms vllm_xargs delivers
    (the OpenAI server's vllm_xargs holds str, int and float values only)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidDiffusionOption(name, f"must be true or false, got {value!r}")


def stepwise_kl(logp_now: torch.Tensor, logp_prev: torch.Tensor) -> torch.Tensor:
    """KL(p_t || p_{t-1}) per row, from log-probabilities [rows, vocab]."""
    return (logp_now.exp() * (logp_now - logp_prev)).sum(-1).clamp_min(0.0)


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
        logp: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Record posteriors of `positions` and lock the converged ones of Z.

        `positions` are the rows whose logits this step computed; `z` the
        candidate mask taken before the sampler unmasked anything this step;
        `logp`, if given, is `log_softmax(logits)` computed by the caller
        (the runner does it once for the whole batch). Returns the positions
        locked now.
        """
        if logp is None:
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
            sure = in_z & self._has_prev[positions] & (kl < self.options.eps)
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


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs formulas need from a LLaDA config."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        return cls(
            n_layers=config.n_layers,
            d_model=config.d_model,
            n_heads=config.n_heads,
            n_kv_heads=config.n_kv_heads,
            mlp_hidden=config.mlp_hidden_size,
            vocab=config.vocab_size,
        )

    def dense_flops(self, rows: int) -> int:
        """Linear layers of all blocks for `rows` query rows (2 FLOPs per MAC).

        Q, K, V, O projections plus the gated MLP (ff_proj, up_proj, ff_out).
        """
        d, kv = self.d_model, self.n_kv_heads * (self.d_model // self.n_heads)
        per_row = 2 * (d * d + 2 * d * kv + d * d) + 2 * 3 * d * self.mlp_hidden
        return self.n_layers * rows * per_row

    def attention_flops(self, rows: int, context: int) -> int:
        """Scores and weighted values of `rows` queries over `context` keys."""
        return self.n_layers * 4 * rows * context * self.d_model

    def lm_head_flops(self, rows: int) -> int:
        return 2 * rows * self.d_model * self.vocab


@dataclass
class ComputeLedger:
    """Rows and FLOPs one request computed, vs. the same sampler without locking.

    The no-lock baseline computes every canvas row at every step (M = N), so
    its per-step cost is O(N^2 d) in attention; with locking M = |A| rows and
    the cost is O(M N d) (the paper's model). LM-head FLOPs are counted apart,
    as the paper leaves them out.
    """

    steps: int = 0
    rows: int = 0
    rows_nolock: int = 0
    dense_flops: int = 0
    dense_flops_nolock: int = 0
    attention_flops: int = 0
    attention_flops_nolock: int = 0
    lm_head_flops: int = 0
    locked_fraction: list[float] | None = None
    # engine steps from the request's arrival to its last step, waiting and
    # steps it sat out included (set by the scheduler; steps <= engine_steps)
    engine_steps: int = 0

    def add_step(self, shape: ModelShape, rows: int, canvas_len: int, logit_rows: int, locked: int) -> None:
        self.steps += 1
        self.rows += rows
        self.rows_nolock += canvas_len
        self.dense_flops += shape.dense_flops(rows)
        self.dense_flops_nolock += shape.dense_flops(canvas_len)
        self.attention_flops += shape.attention_flops(rows, canvas_len)
        self.attention_flops_nolock += shape.attention_flops(canvas_len, canvas_len)
        self.lm_head_flops += shape.lm_head_flops(logit_rows)
        if self.locked_fraction is None:
            self.locked_fraction = []
        self.locked_fraction.append(round(locked / canvas_len, 4))

    def merge(self, other: "ComputeLedger") -> None:
        """Add another ledger's counts (aggregates keep no per-step fractions)."""
        for name in (
            "steps", "rows", "rows_nolock", "dense_flops", "dense_flops_nolock",
            "attention_flops", "attention_flops_nolock", "lm_head_flops",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> str:
        return (
            f"rows computed {self.rows} / no-lock {self.rows_nolock} "
            f"({self.rows / max(self.rows_nolock, 1):.1%}), algorithmic FLOPs "
            f"{self.flops_ratio:.3f}x no-lock (dense {self.dense_flops / max(self.dense_flops_nolock, 1):.3f}x, "
            f"attention {self.attention_flops / max(self.attention_flops_nolock, 1):.3f}x)"
        )

    @property
    def flops_ratio(self) -> float:
        """Algorithmic FLOPs (dense + attention) relative to no-lock."""
        base = self.dense_flops_nolock + self.attention_flops_nolock
        return (self.dense_flops + self.attention_flops) / base if base else 1.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["flops_ratio"] = self.flops_ratio
        return out
