"""CPU worker: vLLM's CPUWorker with the diffusion runner."""

from __future__ import annotations

import os

from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from surelock_vllm.engine.debug import DiffusionWorkerDebugMixin
from surelock_vllm.engine.runner import DiffusionRunnerMixin


class DiffusionCPUModelRunner(DiffusionRunnerMixin, CPUModelRunner):
    pass


# oneDNN's process-wide primitive cache (default 1024 entries) keeps every
# matmul primitive it has built, and each one holds memory. No-lock builds a
# few (its row counts repeat); SureLock's row counts change every step, so the
# cache kept about 250 MB more after one batch-8 run at LLaDA-8B's 126k
# vocabulary (heap in use after a run, d_model-256 checkpoint), which made
# SureLock's peak 8.7% above no-lock's. vLLM's linear layers keep their own
# primitive caches (32 entries per weight shape, `create_onednn_mm`), so a small
# global cache costs no measurable speed (no-lock 446 vs 445 ms a step at 4 and
# 1024 entries), and SureLock's peak was +4.0% above no-lock's. A user's own
# setting wins.
ONEDNN_PRIMITIVE_CACHE_CAPACITY = "4"


class DiffusionCPUWorker(DiffusionWorkerDebugMixin, CPUWorker):
    def __init__(self, *args, **kwargs) -> None:
        # read by oneDNN when it first builds a primitive (loading the model)
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_PRIMITIVE_CACHE_CAPACITY)
        super().__init__(*args, **kwargs)

    def init_device(self) -> None:
        # CPUWorker.init_device builds `cpu_worker.CPUModelRunner(...)` at its
        # end and has no factory hook (the GPU worker has _make_model_runner):
        # point that name at our runner for the duration of the call.
        # Listed in surelock_vllm/vllm_internals.py.
        original = cpu_worker.CPUModelRunner
        cpu_worker.CPUModelRunner = DiffusionCPUModelRunner
        try:
            super().init_device()
        finally:
            cpu_worker.CPUModelRunner = original
        assert isinstance(self.model_runner, DiffusionCPUModelRunner)
