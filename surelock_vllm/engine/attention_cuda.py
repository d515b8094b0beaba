"""SureLock attention on CUDA: vLLM's FlashAttention with causal=False.

Only the metadata builder differs from vLLM's FLASH_ATTN backend: the rows of
a step are scattered canvas positions, their queries attend over the whole
canvas in paged KV (FlashAttention's varlen kernel with a block table and
`causal=False`, the same call vLLM makes for DFlash drafting).
"""

from __future__ import annotations

import torch

from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionMetadataBuilder,
)

from surelock_vllm.engine.attention import RowsMetadataBuilderMixin


class SureLockFlashAttentionMetadataBuilder(RowsMetadataBuilderMixin, FlashAttentionMetadataBuilder):
    pass


class SureLockFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "SURELOCK_FLASH_ATTN"

    @staticmethod
    def get_builder_cls() -> type[SureLockFlashAttentionMetadataBuilder]:
        return SureLockFlashAttentionMetadataBuilder

    @staticmethod
    def read_kv_slots(layer, slots: torch.Tensor, block_size: int) -> torch.Tensor:
        """K and V at `slots` from FlashAttention's [2, blocks, block_size, heads, head] cache."""
        kv_cache = layer.kv_cache
        blocks, offsets = slots // block_size, slots % block_size
        keys = kv_cache[0, blocks, offsets]
        values = kv_cache[1, blocks, offsets]
        return torch.cat([keys, values], dim=-1).flatten(1).cpu().clone()
