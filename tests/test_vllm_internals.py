"""Fails loudly when the installed vLLM differs from what the plugin was built on."""

import dataclasses
import inspect

import pytest

from surelock_vllm import vllm_internals as vi


def test_installed_vllm_is_the_supported_series():
    assert vi.check_vllm_version().startswith(vi.SUPPORTED_VLLM)


def test_version_guard_refuses_other_versions(monkeypatch):
    monkeypatch.setattr(vi, "installed_vllm_version", lambda: "0.33.0")
    with pytest.raises(vi.UnsupportedVLLMVersion, match="0.33.0"):
        vi.check_vllm_version()


@pytest.mark.parametrize("module,path,why", vi.INTERNALS, ids=[f"{m}:{p}" for m, p, _ in vi.INTERNALS])
def test_internal_exists(module, path, why):
    try:
        vi.resolve(module, path)
    except (ImportError, AttributeError) as err:  # pragma: no cover - the point of the test
        pytest.fail(f"vLLM internal {module}:{path} is gone ({err}); the plugin uses it for: {why}")


@pytest.mark.parametrize("key", list(vi.REQUIRED_FIELDS), ids=[f"{m}:{c}" for m, c in vi.REQUIRED_FIELDS])
def test_dataclass_fields_still_exist(key):
    cls = vi.resolve(*key)
    names = {f.name for f in dataclasses.fields(cls)}
    missing = set(vi.REQUIRED_FIELDS[key]) - names
    assert not missing, f"{key[1]} lost fields {missing}"


def test_signatures_the_plugin_calls():
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    assert list(inspect.signature(KVCacheManager.allocate_slots).parameters)[:3] == [
        "self", "request", "num_new_tokens",
    ]
    assert list(inspect.signature(Scheduler._update_request_with_output).parameters)[:3] == [
        "self", "request", "new_token_ids",
    ]
    assert "delay_free_blocks" in inspect.signature(Scheduler._free_request).parameters


def test_plugin_registration_is_idempotent():
    import surelock_vllm
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    surelock_vllm.register()
    surelock_vllm.register()
    assert "LLaDAModelLM" in ModelRegistry.get_supported_archs()
    assert MODELS_CONFIG_MAP["LLaDAModelLM"].__name__ == "LLaDAEngineConfig"


def test_kv_transfer_params_reaches_request_outputs():
    """SureLock's per-request accounting rides on this field end to end."""
    from vllm.outputs import RequestOutput
    from vllm.v1.engine import EngineCoreOutput

    assert "kv_transfer_params" in EngineCoreOutput.__struct_fields__
    assert "kv_transfer_params" in inspect.signature(RequestOutput.__init__).parameters


@pytest.mark.parametrize("module,cls,attr,method", vi.INSTANCE_ATTRIBUTES, ids=[f"{c}.{a}" for _, c, a, _ in vi.INSTANCE_ATTRIBUTES])
def test_instance_attributes_are_still_set(module, cls, attr, method):
    source = inspect.getsource(getattr(vi.resolve(module, cls), method))
    assert f"self.{attr}" in source, f"{cls}.{method} no longer sets self.{attr}"
