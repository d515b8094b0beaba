"""SureLock attention on CUDA: vLLM's FlashAttention with causal=False.

Only the metadata builder differs from vLLM's FLASH_ATTN backend: the rows of
a step are scattered canvas positions, their queries attend over the whole
canvas in paged KV (FlashAttention's varlen kernel with a block table and
`causal=False`, the same call vLLM makes for DFlash drafting).
"""

from __future__ import annotations

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
