"""SureLock attention on CPU: vLLM's paged KV cache, non-causal rows, read contiguously.

K/V are written to their slots by vLLM's CPU_ATTN writer (`do_kv_cache_update`)
and stay in its paged cache. What reads them depends on the cache layout the
writer chose (its ISA):

* `vec` (fp32, and bf16 on CPUs without AMX): a block holds, per KV head,
  K transposed `[head_dim, block_size]` and then V `[block_size, head_dim]`.
  A step gathers each sequence's blocks once per layer into contiguous
  `[seqs, heads, keys, head_dim]` K and V and runs torch's
  `scaled_dot_product_attention` on all sequences at once, queries padded to
  the longest sequence's rows. At a d_model-256 LLaDA's shapes (8 heads of 32,
  290-key canvases, batch 8) on 2 cores this is 1.3x (128 rows a canvas) to
  1.9x (whole canvases) faster than CPU_ATTN's vec kernel (microbenchmark;
  no-lock's whole step became 1.30x faster).
* any other layout (AMX packs keys for its tiles): vLLM's kernel.

Either way the result is non-causal attention of every computed row over its
whole canvas; `tests/test_attention_cpu.py` checks the two against each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from surelock_vllm.engine.attention import RowsMetadataBuilderMixin
from surelock_vllm.engine.rows import padded_rows_layout

# The CPU_ATTN cache layout the contiguous path reads (`gather_kv`).
CONTIGUOUS_ISA = "vec"


@dataclass
class SureLockCPUAttentionMetadata(CPUAttentionMetadata):
    # The contiguous path's view of the step (None: vLLM's kernel runs).
    kv_blocks: torch.Tensor | None = None  # [seqs, blocks] long: each sequence's blocks, in order
    query_rows: torch.Tensor | None = None  # [tokens] row in the padded [seqs * max_query_len]; None: no padding
    key_mask: torch.Tensor | None = None  # [seqs, 1, 1, max_seq_len] bool; None: every sequence is max_seq_len long


def gather_kv(kv_cache: torch.Tensor, kv_blocks: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V `[seqs, kv_heads, num_keys, head_dim]` of each sequence's first `num_keys` slots.

    `kv_cache`: one layer's CPU_ATTN cache `[blocks, kv_heads, block_size,
    2 * head_dim]` in the vec layout (per block and head: K transposed, then V).
    """
    _, heads, block_size, two_dims = kv_cache.shape
    dim = two_dims // 2
    seqs, blocks = kv_blocks.shape
    # index_select copies whole blocks in one pass; advanced indexing
    # (`kv_cache[kv_blocks]`) took 5x longer at a d256 model's shapes.
    raw = kv_cache.index_select(0, kv_blocks.reshape(-1)).view(seqs, blocks, heads, 2, dim * block_size)
    keys = raw[:, :, :, 0].view(seqs, blocks, heads, dim, block_size).permute(0, 2, 1, 4, 3)
    values = raw[:, :, :, 1].view(seqs, blocks, heads, block_size, dim).transpose(1, 2)
    shape = (seqs, heads, blocks * block_size, dim)
    return keys.reshape(shape)[:, :, :num_keys], values.reshape(shape)[:, :, :num_keys]


def contiguous_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, meta: SureLockCPUAttentionMetadata, scale: float
) -> torch.Tensor:
    """Non-causal attention of `query` [tokens, heads, head_dim] over each sequence's canvas."""
    seqs = meta.kv_blocks.shape[0]
    tokens, heads, dim = query.shape
    keys, values = gather_kv(kv_cache, meta.kv_blocks, meta.max_seq_len)
    # A shorter sequence's tail slots hold zeros (vLLM zero-fills the cache)
    # or an earlier request's K/V: finite values, which the mask removes.
    rows = meta.max_query_len
    if meta.query_rows is None:
        padded = query.reshape(seqs, rows, heads, dim)
    else:
        padded = query.new_zeros((seqs * rows, heads, dim))
        padded[meta.query_rows] = query
        padded = padded.view(seqs, rows, heads, dim)
    out = F.scaled_dot_product_attention(
        padded.transpose(1, 2), keys, values, attn_mask=meta.key_mask, scale=scale,
        enable_gqa=heads != keys.shape[1],
    )
    out = out.transpose(1, 2).reshape(seqs * rows, heads, dim)
    return out if meta.query_rows is None else out[meta.query_rows]


class SureLockCPUMetadataBuilder(RowsMetadataBuilderMixin, CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        fields = {name: getattr(meta, name) for name in meta.__dataclass_fields__}
        if self.isa != CONTIGUOUS_ISA or self.kv_cache_dtype != "auto" or self.window_size != -1:
            return SureLockCPUAttentionMetadata(**fields)
        common = common_attn_metadata
        seqs = common.query_start_loc_cpu.shape[0] - 1
        query_rows, key_mask = padded_rows_layout(
            common.query_start_loc_cpu, common.seq_lens.cpu(), common.max_query_len, common.max_seq_len
        )
        num_blocks = -(-common.max_seq_len // self.block_size)
        return SureLockCPUAttentionMetadata(
            **fields,
            kv_blocks=common.block_table_tensor[:seqs, :num_blocks].long(),
            query_rows=None if query_rows is None else query_rows.to(self.device),
            key_mask=None if key_mask is None else key_mask.to(self.device),
        )


class SureLockCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # What the contiguous path does not implement; the layer's kernel
        # settings are fixed, so decide once.
        self.contiguous_supported = (
            self.alibi_slopes is None
            and self.sinks is None
            and not self.logits_soft_cap
            and self.sliding_window == -1
        )

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        contiguous = (
            self.contiguous_supported
            and isinstance(attn_metadata, SureLockCPUAttentionMetadata)
            and attn_metadata.kv_blocks is not None
            and output_scale is None
            and output_block_scale is None
        )
        if not contiguous:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        tokens = attn_metadata.num_actual_tokens
        query = query[:tokens].reshape(tokens, self.num_heads, self.head_size)
        result = contiguous_attention(query, kv_cache, attn_metadata, self.scale)
        output[:tokens].copy_(result.reshape(output[:tokens].shape))
        return output


class SureLockCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "SURELOCK_CPU"

    @staticmethod
    def get_builder_cls() -> type[SureLockCPUMetadataBuilder]:
        return SureLockCPUMetadataBuilder

    @staticmethod
    def get_impl_cls() -> type[SureLockCPUAttentionImpl]:
        return SureLockCPUAttentionImpl
