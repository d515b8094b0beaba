"""Per-model config hook: what a LLaDA engine needs from vLLM's configuration.

Registered in vLLM's MODELS_CONFIG_MAP under "LLaDAModelLM", so it runs for
every engine that serves a LLaDA checkpoint, whichever entry point built it.
"""

from __future__ import annotations

from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.platforms import current_platform

from surelock_vllm.log import get_logger

logger = get_logger(__name__)

SCHEDULER_CLS = "surelock_vllm.engine.scheduler.DiffusionScheduler"
WORKER_CLS = {
    "cpu": "surelock_vllm.engine.worker_cpu.DiffusionCPUWorker",
    "cuda": "surelock_vllm.engine.worker_cuda.DiffusionGPUWorker",
}


class LLaDAEngineConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        platform = "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else None
        if platform is None:
            raise ValueError(
                f"surelock: LLaDA runs on CPU or CUDA, not on {current_platform.device_name}"
            )
        sched = vllm_config.scheduler_config
        parallel = vllm_config.parallel_config
        cache = vllm_config.cache_config
        if sched.scheduler_cls not in (None, SCHEDULER_CLS):
            raise ValueError(
                f"surelock: --scheduler-cls {sched.scheduler_cls} cannot serve LLaDA; "
                f"it needs {SCHEDULER_CLS}"
            )
        sched.scheduler_cls = SCHEDULER_CLS
        if parallel.worker_cls not in ("auto", WORKER_CLS[platform]):
            raise ValueError(
                f"surelock: --worker-cls {parallel.worker_cls} cannot serve LLaDA; "
                f"it needs {WORKER_CLS[platform]}"
            )
        parallel.worker_cls = WORKER_CLS[platform]
        # A canvas's K/V is rewritten in place every step: blocks cannot be
        # shared between requests, and steps cannot overlap.
        if cache.enable_prefix_caching:
            logger.info("surelock: prefix caching off (a diffusion canvas is rewritten every step)")
        cache.enable_prefix_caching = False
        sched.async_scheduling = False
        # Pipeline parallelism would need intermediate tensors between stages
        # for scattered rows; tensor parallelism is supported.
        if parallel.pipeline_parallel_size > 1:
            raise ValueError("surelock: pipeline parallelism is not supported for LLaDA; use tensor parallelism")
