"""Tests' and debugging hooks, kept out of the runner's step.

* worker methods reached with `collective_rpc` (offline:
  `llm.collective_rpc("take_trace")`; on a server started with
  `VLLM_SERVER_DEV_MODE=1`: `POST /collective_rpc {"method": "memory_report"}`):
  `canvas_logits`, `take_trace`, `memory_report`;
* `StepTrace`, which the runner feeds only when `--additional-config
  '{"surelock": {"trace": true}}'` is set: per step and request, the rows
  computed, the locked positions and their K/V as stored in the paged cache;
* `read_kv_slots`, which finds a slot's K/V elements with the attention
  kernel's own cache writer, so it follows whatever layout the platform's
  backend uses (CPU_ATTN packs K/V per block; FlashAttention stores
  [blocks, heads, block_size, 2 * head_size]).
"""

from __future__ import annotations

import ctypes
import gc
import os

import torch

from surelock_vllm.engine.rows import RequestRows, build_step_layout, slot_mapping_for


class DiffusionWorkerDebugMixin:
    """Mixed into the CPU and CUDA diffusion workers."""

    def canvas_logits(self, token_ids: list[int]) -> list[list[float]]:
        # Plain lists: results cross the process boundary as msgpack.
        return canvas_logits(self.model_runner, token_ids).cpu().tolist()

    def take_trace(self) -> list[dict]:
        trace = self.model_runner._step_trace()
        return [] if trace is None else trace.take()

    def memory_report(self) -> dict[str, int]:
        """This process's memory, after a garbage collection, and the
        per-request states the runner holds.

        `heap_in_use_bytes` is what the C heap has handed out and not got back
        (glibc `mallinfo2`: small blocks in use plus mmap'd large ones): Python
        objects, tensors and native caches alike. It is the figure a leak
        grows. Resident memory (`rss_bytes`, and `rss_trimmed_bytes` after
        `malloc_trim` returns free pages) also holds memory the allocator keeps
        for reuse: freed tensors of varying sizes leave the heap fragmented.
        Values are -1 where the C library is not glibc.
        """
        gc.collect()
        rss = _rss_bytes()
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
        info = libc.mallinfo2() if libc is not None else None
        return {
            "pid": os.getpid(),
            "rss_bytes": rss,
            "rss_trimmed_bytes": _rss_bytes() if libc is not None else -1,
            "heap_in_use_bytes": info.uordblks + info.hblkhd if info is not None else -1,
            "diffusion_states": len(self.model_runner.diffusion_batch()),
            # oneDNN's process-wide primitive cache (engine/worker_cpu.py); -1: its default
            "onednn_primitive_cache_capacity": int(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", -1)),
        }


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim  # noqa: B018  (both exist in glibc >= 2.33)
    except (OSError, AttributeError):
        return None
    return libc


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@torch.inference_mode()
def canvas_logits(runner, token_ids: list[int]) -> torch.Tensor:
    """Logits [len, vocab] of one whole canvas, as the serving path computes them.

    Tests compare it with the plain-torch model. It writes K/V into the last
    blocks of the KV cache, so call it only while the engine is idle.
    """
    block_size = runner.cache_config.block_size
    num_blocks = -(-len(token_ids) // block_size)
    total_blocks = runner.kv_cache_config.num_blocks
    rows = RequestRows(
        canvas=torch.tensor(token_ids, dtype=torch.long),
        query_positions=torch.arange(len(token_ids)),
        logit_positions=torch.arange(len(token_ids)),
        block_ids=list(range(total_blocks - num_blocks, total_blocks)),
    )
    hidden = runner._run_rows(build_step_layout([rows], block_size))
    return runner.model.compute_logits(hidden).float().cpu()


class StepTrace:
    """Per step and request: rows fed, locked positions, and their K/V slots."""

    def __init__(self):
        self.records: list[dict] = []
        self.engine_steps = 0

    def take(self) -> list[dict]:
        records, self.records = self.records, []
        return records

    def record(self, runner, req_ids, plan, batch) -> None:
        """After a step: per scheduled request (plan order), what it computed and holds locked."""
        from vllm.model_executor.layers.attention import Attention

        self.engine_steps += 1
        block_size = runner.cache_config.block_size
        layers = [m for m in runner.model.modules() if isinstance(m, Attention)]
        states = runner._diffusion_state()
        for b, req_id in enumerate(req_ids):
            slot = plan.slots[b]
            canvas_len = batch.info[slot].canvas_len
            locked = batch.locked[slot, :canvas_len].nonzero().squeeze(-1).cpu()
            kv = []
            if locked.numel():
                slots = slot_mapping_for(locked, states[req_id].block_ids, block_size)
                kv = [read_kv_slots(layer, slots, block_size).tolist() for layer in layers]
            self.records.append(
                {
                    "req_id": req_id,
                    "engine_step": self.engine_steps,
                    "step": int(batch.steps_done[slot]) - 1,
                    "query_positions": plan.query_pos[plan.query_seq == b].tolist(),
                    "locked": locked.tolist(),
                    "masked": batch.masked[slot, :canvas_len].nonzero().squeeze(-1).tolist(),  # after the step
                    "locked_kv": kv,
                }
            )


def read_kv_slots(layer, slots: torch.Tensor, block_size: int) -> torch.Tensor:
    """The K/V elements stored for `slots` in `layer`'s paged cache: [len(slots), values per slot].

    The cache's first dimension is the block; where a slot's elements sit
    inside a block is the backend's business, so they are located by writing
    a probe with the backend's own writer (`do_kv_cache_update`) into a
    scratch block.
    """
    kv_cache = layer.kv_cache
    masks = _slot_element_masks(layer, kv_cache, block_size)
    blocks, offsets = (slots // block_size).tolist(), (slots % block_size).tolist()
    return torch.stack([kv_cache[b][masks[o]] for b, o in zip(blocks, offsets)]).cpu().clone()


_MASKS: dict[tuple, list[torch.Tensor]] = {}


def _slot_element_masks(layer, kv_cache: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    key = (tuple(kv_cache.shape[1:]), kv_cache.dtype, str(kv_cache.device), block_size)
    if key not in _MASKS:
        impl = layer.impl
        heads, head = impl.num_kv_heads, impl.head_size
        device = kv_cache.device
        masks = []
        for offset in range(block_size):
            scratch = torch.zeros((1, *kv_cache.shape[1:]), dtype=kv_cache.dtype, device=device)
            probe = torch.arange(1, heads * head + 1, dtype=kv_cache.dtype, device=device).view(1, heads, head)
            impl.do_kv_cache_update(layer, probe, probe + 0.5, scratch, torch.tensor([offset], device=device))
            masks.append(scratch[0] != 0)
        _MASKS[key] = masks
    return _MASKS[key]
