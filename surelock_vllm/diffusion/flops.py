"""Rows and algorithmic FLOPs of a diffusion request, with and without locking.

By formula from the model's shape (2 FLOPs per multiply-add): the linear
layers (Q, K, V, O and the gated MLP) per computed row, attention per query
row over the canvas, and the LM head per row whose logits are read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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
    # steps the fixed schedule takes for the whole generation (options.steps);
    # a confidence threshold, or a stop at end of turn, takes fewer
    steps_fixed: int = 0
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

    def add_step(
        self, shape: ModelShape, rows: int, canvas_len: int, logit_rows: int, locked: int, sequences: int = 1
    ) -> None:
        """One step: `rows` computed over canvases of `canvas_len` (`sequences` of them: 2
        with classifier-free guidance, the canvas and the unconditional one)."""
        self.steps += 1
        self.rows += rows
        self.rows_nolock += sequences * canvas_len
        self.dense_flops += shape.dense_flops(rows)
        self.dense_flops_nolock += shape.dense_flops(sequences * canvas_len)
        self.attention_flops += shape.attention_flops(rows, canvas_len)
        self.attention_flops_nolock += sequences * shape.attention_flops(canvas_len, canvas_len)
        self.lm_head_flops += shape.lm_head_flops(logit_rows)
        if self.locked_fraction is None:
            self.locked_fraction = []
        self.locked_fraction.append(round(locked / canvas_len, 4))

    def merge(self, other: "ComputeLedger") -> None:
        """Add another ledger's counts (aggregates keep no per-step fractions)."""
        for name in (
            "steps", "steps_fixed", "rows", "rows_nolock", "dense_flops", "dense_flops_nolock",
            "attention_flops", "attention_flops_nolock", "lm_head_flops",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> str:
        return (
            f"steps {self.steps} / fixed schedule {self.steps_fixed}, "
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
