"""SureLock attention on CPU: vLLM's CPU_ATTN kernel, non-causal row metadata."""

from __future__ import annotations

import torch

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionMetadataBuilder,
)

from surelock_vllm.engine.attention import RowsMetadataBuilderMixin


class SureLockCPUMetadataBuilder(RowsMetadataBuilderMixin, CPUAttentionMetadataBuilder):
    pass


class SureLockCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "SURELOCK_CPU"

    @staticmethod
    def get_builder_cls() -> type[SureLockCPUMetadataBuilder]:
        return SureLockCPUMetadataBuilder

    @staticmethod
    def read_kv_slots(kv_cache: torch.Tensor, slots: torch.Tensor, block_size: int) -> torch.Tensor:
        """K and V stored at `slots`: [len(slots), num_kv_heads, 2 * head_size].

        CPU_ATTN's layout is [num_blocks, num_kv_heads, block_size * 2, head]
        viewed as K blocks then V blocks per head (see CPUAttentionBackendImpl).
        """
        num_blocks, num_kv_heads, bs, _ = kv_cache.shape
        kv = kv_cache.view(num_blocks, num_kv_heads, bs * 2, -1)
        key_cache, value_cache = kv.chunk(2, dim=2)
        blocks, offsets = slots // block_size, slots % block_size
        keys = key_cache[blocks, :, offsets]
        values = value_cache[blocks, :, offsets]
        return torch.cat([keys, values], dim=-1).clone()
