"""CPU worker: vLLM's CPUWorker with the diffusion runner."""

from __future__ import annotations

from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from surelock_vllm.engine.debug import DiffusionWorkerDebugMixin
from surelock_vllm.engine.runner import DiffusionRunnerMixin


class DiffusionCPUModelRunner(DiffusionRunnerMixin, CPUModelRunner):
    pass


class DiffusionCPUWorker(DiffusionWorkerDebugMixin, CPUWorker):
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
