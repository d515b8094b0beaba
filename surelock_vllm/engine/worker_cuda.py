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
        # The worker follows vllm_config.use_v2_model_runner in many places
        # (warm-up, CUDA graph capture, KV cache setup); the config hook pins
        # it to V1, and a V2 worker around this V1 runner would fail later
        # and less clearly.
        if self.use_v2_model_runner:
            raise RuntimeError(
                "surelock: the GPU worker was configured for Model Runner V2; the diffusion runner "
                "is a V1 runner (VLLM_USE_V2_MODEL_RUNNER must be 0, which the LLaDA config hook sets)"
            )
        return DiffusionGPUModelRunner(self.vllm_config, self.device)
