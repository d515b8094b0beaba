"""CUDA worker: vLLM's GPU Worker with the diffusion runner.

Same runner class as on CPU; on CUDA the attention metadata it builds goes to
vLLM's FlashAttention backend, which runs the rows with causal=False.
"""

from __future__ import annotations

from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from surelock_vllm.engine.debug import DiffusionWorkerDebugMixin
from surelock_vllm.engine.runner import DiffusionRunnerMixin


class DiffusionGPUModelRunner(DiffusionRunnerMixin, GPUModelRunner):
    pass


class DiffusionGPUWorker(DiffusionWorkerDebugMixin, Worker):
    def _make_model_runner(self) -> GPUModelRunner:
        return DiffusionGPUModelRunner(self.vllm_config, self.device)
