"""SureLock attention on CPU: vLLM's CPU_ATTN kernel, non-causal row metadata."""

from __future__ import annotations

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
