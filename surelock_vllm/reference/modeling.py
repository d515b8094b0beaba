"""LLaDA's transformer in plain torch, loading the real checkpoint's weights.

Mirrors `modeling_llada.py` of GSAI-ML/LLaDA-8B-Instruct for the configuration
that model uses (llama blocks, RMSNorm, RoPE, SiLU-gated MLP, no biases,
bidirectional attention). The module names match the checkpoint
(`model.transformer.blocks.N.q_proj`, ...), so `load_state_dict` takes the
safetensors file as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from surelock_vllm.configuration_llada import LLaDAConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LLaDA normalises in fp32 and casts back, like vLLM's RMSNorm.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.to(dtype)) * self.weight


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for neox-style (rotate-half) RoPE, in fp32."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; rotation done in fp32 (rope_full_precision)."""
    dtype = x.dtype
    x = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos[:, None, :] + rotated * sin[:, None, :]).to(dtype)


class LLaDABlock(nn.Module):
    """One llama-type LLaDA block: attention then SiLU-gated MLP, pre-norm."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, kv = config.d_model, config.n_kv_heads * config.head_dim
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def attention(
        self, x: torch.Tensor, positions: torch.Tensor, kv_cache: "KVCache | None" = None
    ) -> torch.Tensor:
        """Bidirectional attention of the rows `x` (at canvas `positions`).

        Without a cache the rows are the whole sequence. With one, the rows'
        K/V are written at their positions and the queries attend over the
        whole cached canvas: rows not given keep the K/V they were last
        computed with (SureLock's locked rows).
        """
        rows = x.shape[0]
        q = self.q_proj(x).view(rows, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(rows, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(rows, self.n_kv_heads, self.head_dim)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            kv_cache.keys[positions] = k
            kv_cache.values[positions] = v
            k, v = kv_cache.keys, kv_cache.values
        groups = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=False
        )
        return self.attn_out(out.transpose(0, 1).reshape(rows, -1))

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, kv_cache: "KVCache | None" = None
    ) -> torch.Tensor:
        x = x + self.attention(self.attn_norm(x), positions, kv_cache)
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class KVCache:
    """One layer's K/V for a whole canvas: [canvas_len, n_kv_heads, head_dim]."""

    def __init__(self, canvas_len: int, config: LLaDAConfig, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (canvas_len, config.n_kv_heads, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)


class LLaDATransformer(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.wte = nn.Embedding(config.embedding_size, config.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_out = nn.Linear(config.d_model, config.embedding_size, bias=False)


class LLaDAModel(nn.Module):
    """`model.transformer.*` as in the checkpoint."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.transformer = LLaDATransformer(config)


class LLaDAReferenceLM(nn.Module):
    """Plain-torch LLaDAModelLM: `forward(ids[L]) -> logits[L, vocab]`."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        config.check_supported()
        self.config = config
        self.model = LLaDAModel(config)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of one sequence (1-D ids), or of a batch of equal-length ones."""
        if input_ids.dim() == 2:
            return torch.stack([self.forward(row) for row in input_ids])
        return self.forward_rows(input_ids, torch.arange(input_ids.shape[0]))

    @torch.no_grad()
    def forward_rows(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: "list[KVCache] | None" = None,
    ) -> torch.Tensor:
        """Logits of some rows of a canvas; other rows come from `kv_caches`."""
        t = self.model.transformer
        x = t.wte(input_ids)
        for i, block in enumerate(t.blocks):
            x = block(x, positions, None if kv_caches is None else kv_caches[i])
        logits = t.ff_out(t.ln_f(x))
        return logits[:, : self.config.vocab_size].float()

    def new_kv_caches(self, canvas_len: int) -> "list[KVCache]":
        weight = self.model.transformer.wte.weight
        return [KVCache(canvas_len, self.config, weight.dtype, weight.device) for _ in range(self.config.n_layers)]

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32
    ) -> "LLaDAReferenceLM":
        from safetensors.torch import load_file

        path = Path(path)
        config = LLaDAConfig(**json.loads((path / "config.json").read_text()))
        model = cls(config)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(path.glob("*.safetensors")):
            state.update(load_file(shard))
        model.load_state_dict(state, strict=True)
        return model.to(dtype).eval()
