"""Patch: reject invalid diffusion requests in the API server with HTTP 400.

What: when an AsyncLLM (the engine client of `vllm serve`) processes a request
for a LLaDA model, its diffusion and SureLock options and its sampling
parameters are validated right after vLLM's own input processing
(`InputProcessor.process_inputs`); a bad one raises `VLLMValidationError`
naming the parameter, which the OpenAI server answers with 400.

Why: vLLM validates SamplingParams in the frontend but knows nothing of
options in `extra_args`/`vllm_xargs`; the engine-side check (the scheduler
finishes such a request with an error naming the option) is right for offline
`LLM.generate`, where one bad request must not sink the others, but a server
must answer 400 before the request reaches the engine. The logits-processor
`validate_params` hook would also fire for offline `LLM.generate` and abort the
whole call, so it cannot be used.

Versions: vLLM 0.32.0. Retire when vLLM offers a per-model request-validation
hook for `extra_args` in the frontend.
"""

from __future__ import annotations

_original_process_inputs = None
_original_async_init = None


def apply() -> None:
    global _original_process_inputs, _original_async_init
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.input_processor import InputProcessor

    if is_applied():
        return
    _original_process_inputs = InputProcessor.process_inputs
    _original_async_init = AsyncLLM.__init__

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        request = _original_process_inputs(self, request_id, prompt, params, *args, **kwargs)
        if getattr(self, "surelock_validate", False):
            validate_engine_request(self.vllm_config, request)
        return request

    def async_init(self, *args, **kwargs):
        _original_async_init(self, *args, **kwargs)
        # Only the API server's engine client validates up front.
        self.input_processor.surelock_validate = True

    process_inputs._surelock_patch = True
    InputProcessor.process_inputs = process_inputs
    AsyncLLM.__init__ = async_init


def is_applied() -> bool:
    from vllm.v1.engine.input_processor import InputProcessor

    return getattr(InputProcessor.process_inputs, "_surelock_patch", False)


def validate_engine_request(vllm_config, request) -> None:
    from vllm.exceptions import VLLMValidationError

    from surelock_vllm.diffusion.options import DiffusionDefaults, InvalidDiffusionOption
    from surelock_vllm.diffusion.surelock import SureLockOptions
    from surelock_vllm.engine.request_options import resolve_request
    from surelock_vllm.engine.scheduler import server_settings
    from surelock_vllm.plugin import ARCHITECTURE

    if vllm_config.model_config.architecture != ARCHITECTURE or request.sampling_params is None:
        return
    settings = server_settings(vllm_config)
    try:
        resolve_request(
            request.sampling_params,
            len(request.prompt_token_ids or ()),
            max_model_len=vllm_config.model_config.max_model_len,
            max_rows_per_step=vllm_config.scheduler_config.max_num_batched_tokens,
            defaults=DiffusionDefaults.from_mapping(settings),
            surelock_defaults=SureLockOptions.from_defaults(settings),
        )
    except InvalidDiffusionOption as err:
        raise VLLMValidationError(str(err), parameter=err.option) from err
