"""Worker methods for tests and debugging, reached with `collective_rpc`.

Offline: `llm.collective_rpc("take_trace")`; on a server started with
`VLLM_SERVER_DEV_MODE=1`: `POST /collective_rpc {"method": "memory_report"}`.
None of them runs on the step path.
"""

from __future__ import annotations

import ctypes
import gc
import os


class DiffusionWorkerDebugMixin:
    """Mixed into the CPU and CUDA diffusion workers."""

    def canvas_logits(self, token_ids: list[int]) -> list[list[float]]:
        # Plain lists: results cross the process boundary as msgpack.
        return self.model_runner.canvas_logits(token_ids).cpu().tolist()

    def take_trace(self) -> list[dict]:
        return self.model_runner.take_trace()

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
            "diffusion_states": len(self.model_runner._diffusion_state()),
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
