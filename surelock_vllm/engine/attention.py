"""The SureLock attention backend: scattered, non-causal query rows over paged KV.

A diffusion step computes some rows of each request's canvas (all of them
without locking, the unlocked ones with SureLock). The backend owns the
mapping from those rows to vLLM's paged KV cache:

* `build_for_rows` turns a step's row layout (`rows.StepLayout`: positions,
  slot mapping, query offsets, full-canvas sequence lengths, block table) into
  the platform kernel's metadata, always non-causal: every computed row
  attends to every position of its request, locked rows included (their K/V
  sit in their slots as of their lock step);
* the rows' fresh K/V are written to their own slots by the platform's
  `do_kv_cache_update`; slots of rows not computed are never touched;
* the kernel is the platform's: CPU_ATTN on CPU (`attention_cpu`), vLLM's
  FlashAttention with causal=False on CUDA (`attention_cuda`).

The backends subclass the platform backends and change only the metadata
builder, so KV-cache shapes, block sizes and kernels stay vLLM's.
"""

from __future__ import annotations

import dataclasses

import torch

from vllm.v1.attention.backend import CommonAttentionMetadata

from surelock_vllm.engine.rows import StepLayout

BACKENDS = {
    "cpu": ("SURELOCK_CPU", "surelock_vllm.engine.attention_cpu.SureLockCPUAttentionBackend"),
    "cuda": ("SURELOCK_FLASH_ATTN", "surelock_vllm.engine.attention_cuda.SureLockFlashAttentionBackend"),
}


def platform_key() -> str:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_cuda():
        return "cuda"
    raise ValueError(f"surelock: no attention backend for {current_platform.device_name}")


def register_backends() -> None:
    from vllm.v1.attention.backends.registry import register_backend

    for name, class_path in BACKENDS.values():
        register_backend(name, class_path)


def surelock_attention_backend():
    """The backend class LLaDA's attention layers use on this platform."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    return resolve_obj_by_qualname(BACKENDS[platform_key()][1])


class RowsMetadataBuilderMixin:
    """Mixed into the platform's metadata builder."""

    def build(self, common_prefix_len, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        # Bidirectional model: no call path may build causal metadata, and no
        # prefix is shared between requests (canvases are rewritten).
        common = dataclasses.replace(common_attn_metadata, causal=False)
        return super().build(0, common, fast_build)

    def build_for_rows(self, layout: StepLayout, device: torch.device):
        slot_mapping = layout.slot_mapping.to(device)
        common = CommonAttentionMetadata(
            query_start_loc=layout.query_start_loc.to(device),
            query_start_loc_cpu=layout.query_start_loc,
            seq_lens=layout.seq_lens.to(device),
            num_reqs=layout.num_reqs,
            num_actual_tokens=layout.num_rows,
            max_query_len=layout.max_query_len,
            max_seq_len=layout.max_seq_len,
            block_table_tensor=layout.block_table.to(device),
            slot_mapping=slot_mapping,
            causal=False,
            positions=layout.positions.to(device),
            seq_lens_cpu_upper_bound=layout.seq_lens,
        )
        return self.build(0, common)
