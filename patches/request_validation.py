"""Patch: reject invalid diffusion requests in the API server with HTTP 400.

What: when an AsyncLLM (the engine client of `vllm serve`) processes a request
for a LLaDA model, its diffusion and SureLock options and its sampling
parameters are validated right after vLLM's own input processing
(`InputProcessor.process_inputs`); a bad one raises `VLLMValidationError`
naming the parameter, which the OpenAI server answers with 400 (a streamed
request gets vLLM's stream convention instead: HTTP 200 and an SSE `error`
event). Beam search (`use_beam_search: true`) is refused there too, naming
`use_beam_search`: vLLM would otherwise run it as many logprob requests and
the client would read an error about `logprobs`.

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

from surelock_vllm.patches.vllm_xargs_booleans import openai_request_classes

#: set in the API server process once its engine client serves a LLaDA model
serving_llada = False

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
        settings = getattr(self, "surelock_settings", None)
        if settings is not None:
            validate_engine_request(self.vllm_config, request, settings)
        return request

    def async_init(self, *args, **kwargs):
        global serving_llada
        from surelock_vllm.engine.settings import ServerSettings
        from surelock_vllm.plugin import ARCHITECTURE

        _original_async_init(self, *args, **kwargs)
        # Only the API server's engine client validates up front, with the
        # server settings parsed once.
        if self.vllm_config.model_config.architecture == ARCHITECTURE:
            serving_llada = True
            self.input_processor.surelock_settings = ServerSettings.from_vllm_config(self.vllm_config)

    def refuse_beam_search(original):
        def to_beam_search_params(self, *args, **kwargs):
            if serving_llada:
                from vllm.exceptions import VLLMValidationError

                raise VLLMValidationError(
                    "beam search is not supported by the masked-diffusion sampler",
                    parameter="use_beam_search",
                )
            return original(self, *args, **kwargs)

        return to_beam_search_params

    process_inputs._surelock_patch = True
    InputProcessor.process_inputs = process_inputs
    AsyncLLM.__init__ = async_init
    for cls in openai_request_classes():
        cls.to_beam_search_params = refuse_beam_search(cls.to_beam_search_params)


def is_applied() -> bool:
    from vllm.v1.engine.input_processor import InputProcessor

    return getattr(InputProcessor.process_inputs, "_surelock_patch", False)


def validate_engine_request(vllm_config, request, settings=None) -> None:
    from vllm.exceptions import VLLMValidationError

    from surelock_vllm.diffusion.options import InvalidDiffusionOption
    from surelock_vllm.engine.request_options import resolve_request
    from surelock_vllm.engine.settings import ServerSettings
    from surelock_vllm.plugin import ARCHITECTURE

    if vllm_config.model_config.architecture != ARCHITECTURE or request.sampling_params is None:
        return
    try:
        resolve_request(
            request.sampling_params,
            len(request.prompt_token_ids or ()),
            max_model_len=vllm_config.model_config.max_model_len,
            max_rows_per_step=vllm_config.scheduler_config.max_num_batched_tokens,
            kv_block_size=vllm_config.cache_config.block_size,
            settings=settings or ServerSettings.from_vllm_config(vllm_config),
        )
    except InvalidDiffusionOption as err:
        raise VLLMValidationError(str(err), parameter=err.option) from err
