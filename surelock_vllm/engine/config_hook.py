"""Per-model config hook: what a LLaDA engine needs from vLLM's configuration.

Registered in vLLM's MODELS_CONFIG_MAP under "LLaDAModelLM", so it runs for
every engine that serves a LLaDA checkpoint, whichever entry point built it.
It runs early in `VllmConfig.__post_init__`, before vLLM settles the model
runner, torch.compile and CUDA graphs, and in the process that starts the
engine, before the engine and worker processes are spawned (they inherit
the environment it sets). So `vllm serve GSAI-ML/LLaDA-8B-Instruct --plugin
surelock` needs no other flag on any platform.
"""

from __future__ import annotations

import os

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
        use_v1_model_runner()
        run_eagerly(vllm_config.model_config)
        default_temperature_zero(vllm_config.model_config)


V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def use_v1_model_runner() -> None:
    """The diffusion runner subclasses vLLM's V1 runners (GPUModelRunner,
    CPUModelRunner). vLLM 0.32 picks Model Runner V2 by default wherever Triton
    works (CUDA), and the GPU worker then takes V2-only branches even with our
    runner class in place; the choice is `VLLM_USE_V2_MODEL_RUNNER`, read from
    the environment by every process, so it is pinned to 0 here."""
    value = os.environ.get(V2_RUNNER_ENV)
    if value is not None and value.strip() not in ("", "0"):
        raise ValueError(
            f"surelock: LLaDA runs on vLLM's V1 model runner; unset {V2_RUNNER_ENV} (it is {value!r})"
        )
    if value is None:
        logger.info("surelock: using vLLM's V1 model runner (%s=0), the one the diffusion runner extends", V2_RUNNER_ENV)
    os.environ[V2_RUNNER_ENV] = "0"


def run_eagerly(model_config) -> None:
    """No torch.compile and no CUDA graphs: a diffusion step's row count
    changes every step (locked rows drop out), so there is no fixed batch
    shape to capture, and the runner calls the model directly. Same as
    `--enforce-eager`, set here so that users need not pass it."""
    if not model_config.enforce_eager:
        logger.info(
            "surelock: torch.compile and CUDA graphs off for LLaDA (as with --enforce-eager): "
            "the diffusion step computes a different set of rows every step and runs eagerly"
        )
        model_config.enforce_eager = True


def default_temperature_zero(model_config) -> None:
    """A request that gives no temperature gets 0, LLaDA's default (its chat and
    generate sample greedily), instead of vLLM's 1.0; an explicit temperature
    still wins. vLLM fills an omitted temperature from the model's generation
    config, so the default goes into `override_generation_config` unless the
    user or the checkpoint's generation_config.json sets one. (Offline, a
    `SamplingParams()` built by hand always carries a temperature, 1.0 unless
    given; `LLM.generate` without sampling params and
    `LLM.get_default_sampling_params()` get 0.)"""
    if "temperature" in model_config.override_generation_config:
        return
    if model_config.generation_config != "vllm" and "temperature" in model_config.try_get_generation_config():
        return
    model_config.override_generation_config = {**model_config.override_generation_config, "temperature": 0.0}
    logger.info("surelock: requests that give no temperature get 0 (LLaDA's default, greedy unmasking)")
