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
    def read_kv_slots(layer, slots: torch.Tensor, block_size: int) -> torch.Tensor:
        """The K/V bytes stored for `slots`: [len(slots), values per slot].

        CPU_ATTN packs K/V inside a block in a kernel-specific order, so the
        elements of one slot are found by writing a probe with the kernel's own
        writer (`do_kv_cache_update`) into a scratch block.
        """
        kv_cache = layer.kv_cache
        masks = _slot_element_masks(layer, kv_cache, block_size)
        blocks, offsets = (slots // block_size).tolist(), (slots % block_size).tolist()
        return torch.stack([kv_cache[b][masks[o]] for b, o in zip(blocks, offsets)]).clone()


_MASKS: dict[tuple, list[torch.Tensor]] = {}


def _slot_element_masks(layer, kv_cache: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    key = (tuple(kv_cache.shape[1:]), kv_cache.dtype, block_size)
    if key not in _MASKS:
        impl = layer.impl
        heads, head = impl.num_kv_heads, impl.head_size
        masks = []
        for offset in range(block_size):
            scratch = torch.zeros((1, *kv_cache.shape[1:]), dtype=kv_cache.dtype)
            probe = torch.arange(1, heads * head + 1, dtype=kv_cache.dtype).view(1, heads, head)
            impl.do_kv_cache_update(layer, probe, probe + 0.5, scratch, torch.tensor([offset]))
            masks.append(scratch[0] != 0)
        _MASKS[key] = masks
    return _MASKS[key]
