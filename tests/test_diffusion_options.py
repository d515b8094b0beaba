"""Diffusion options: defaults, max_tokens mapping, and errors that name the option."""

import pytest

from surelock_vllm.diffusion.denoiser import transfer_schedule
from surelock_vllm.diffusion.options import (
    DiffusionDefaults,
    DiffusionLimits,
    DiffusionOptions,
    InvalidDiffusionOption,
)
from surelock_vllm.engine.settings import ServerSettings


def resolve(extra=None, max_tokens=64, temperature=0.0, **kw):
    return DiffusionOptions.resolve(extra, max_tokens=max_tokens, temperature=temperature, **kw)


def test_defaults_follow_llada_chat_usage():
    o = resolve(max_tokens=128)
    assert (o.gen_length, o.steps, o.block_length, o.remasking) == (128, 128, 32, "low_confidence")
    assert o.num_blocks == 4 and o.steps_per_block == 32


def test_max_tokens_is_the_generation_length_unless_gen_length_is_given():
    assert resolve(max_tokens=40).gen_length == 40
    assert resolve({"gen_length": 64}, max_tokens=16).gen_length == 64


def test_block_length_falls_back_to_one_block_when_default_does_not_divide():
    o = resolve(max_tokens=40)
    assert o.block_length == 40 and o.num_blocks == 1


def test_server_defaults_apply():
    d = DiffusionDefaults.from_mapping({"block_length": 16, "remasking": "random"})
    o = resolve(max_tokens=64, defaults=d)
    assert (o.block_length, o.remasking) == (16, "random")


@pytest.mark.parametrize(
    "extra,max_tokens,temperature,option",
    [
        ({"block_length": 7}, 32, 0.0, "block_length"),
        ({"block_length": 0}, 32, 0.0, "block_length"),
        ({"steps": 2, "block_length": 8}, 32, 0.0, "steps"),  # 4 blocks, 2 steps
        ({"steps": 6, "block_length": 8}, 32, 0.0, "steps"),  # not a multiple of 4 blocks
        ({"steps": "ten"}, 32, 0.0, "steps"),
        ({"remasking": "lowest"}, 32, 0.0, "remasking"),
        ({"gen_length": -4}, 32, 0.0, "gen_length"),
        ({"gen_lenght": 32}, 32, 0.0, "gen_lenght"),
        ({}, None, 0.0, "gen_length"),
        ({}, 32, -1.0, "temperature"),
        ({}, 32, float("nan"), "temperature"),
        # every step unmasks at least one position: steps <= gen_length
        ({"steps": 33}, 32, 0.0, "steps"),
        ({"steps": 64, "block_length": 16}, 32, 0.0, "steps"),
        ({"steps": 4611686018427387904, "block_length": 8}, 32, 0.0, "steps"),
        # numbers only: JSON booleans and floats are not step counts
        ({"steps": True}, 32, 0.0, "steps"),
        ({"steps": 16.0}, 32, 0.0, "steps"),
        ({"steps": 4e7}, 32, 0.0, "steps"),
        ({"gen_length": True}, 32, 0.0, "gen_length"),
        ({"block_length": False}, 32, 0.0, "block_length"),
        # the server's limits (defaults: 1024 each)
        ({"gen_length": 2048}, 32, 0.0, "gen_length"),
        ({}, 2048, 0.0, "max_tokens"),
        ({}, True, 0.0, "max_tokens"),
        # adaptive unmasking: a fraction; random remasking has no confidence to threshold
        ({"confidence_threshold": 1.5}, 32, 0.0, "confidence_threshold"),
        ({"confidence_threshold": -0.1}, 32, 0.0, "confidence_threshold"),
        ({"confidence_threshold": "high"}, 32, 0.0, "confidence_threshold"),
        ({"confidence_threshold": True}, 32, 0.0, "confidence_threshold"),
        ({"confidence_threshold": 0.9, "remasking": "random"}, 32, 0.0, "confidence_threshold"),
        # LLaDA generate()'s options
        ({"cfg_scale": -1}, 32, 0.0, "cfg_scale"),
        ({"cfg_scale": float("nan")}, 32, 0.0, "cfg_scale"),
        ({"cfg_scale": 1e6}, 32, 0.0, "cfg_scale"),
        ({"cfg_scale": True}, 32, 0.0, "cfg_scale"),
        ({"cfg_scale": "1.5"}, 32, 0.0, "cfg_scale"),
        ({"logits_eos_inf": "on"}, 32, 0.0, "logits_eos_inf"),
        ({"confidence_eos_eot_inf": 2}, 32, 0.0, "confidence_eos_eot_inf"),
    ],
)
def test_invalid_options_name_the_option(extra, max_tokens, temperature, option):
    with pytest.raises(InvalidDiffusionOption) as err:
        resolve(extra, max_tokens=max_tokens, temperature=temperature)
    assert err.value.option == option
    assert f"'{option}'" in str(err.value)


def test_server_limits_bound_steps_and_length():
    limits = DiffusionLimits.from_mapping({"max_gen_length": 64, "max_steps": 16})
    assert resolve({"steps": 16}, max_tokens=64, limits=limits).steps == 16
    with pytest.raises(InvalidDiffusionOption, match="max_steps=16") as err:
        resolve({"steps": 32}, max_tokens=64, limits=limits)
    assert err.value.option == "steps"
    # the default steps (= gen_length) is bounded by the same limit
    with pytest.raises(InvalidDiffusionOption, match="max_steps=16"):
        resolve({}, max_tokens=64, limits=limits)
    with pytest.raises(InvalidDiffusionOption, match="max_gen_length=64") as err:
        resolve({"gen_length": 96, "steps": 3}, max_tokens=None, limits=limits)
    assert err.value.option == "gen_length"
    with pytest.raises(InvalidDiffusionOption, match="max_steps"):
        DiffusionLimits.from_mapping({"max_steps": 0})


def test_bad_server_default_is_refused():
    with pytest.raises(InvalidDiffusionOption, match="remasking"):
        DiffusionDefaults.from_mapping({"remasking": "nope"})
    with pytest.raises(InvalidDiffusionOption, match="confidence_threshold"):
        DiffusionDefaults.from_mapping({"confidence_threshold": 2})
    with pytest.raises(InvalidDiffusionOption, match="confidence_threshold"):
        DiffusionDefaults.from_mapping({"confidence_threshold": 0.9, "remasking": "random"})


def test_paper_preset_defaults_to_one_block_of_gen_length_steps():
    from surelock_vllm.engine.request_options import resolve_request
    from vllm import SamplingParams

    def resolved(extra):
        return resolve_request(SamplingParams(max_tokens=64, extra_args=extra), 10, max_model_len=1024,
                               max_rows_per_step=2048)

    paper = resolved({"surelock_preset": "paper"})
    assert (paper["options"]["block_length"], paper["options"]["steps"]) == (64, 64)
    assert paper["surelock"]["candidates"] == "after_unmask" and paper["surelock"]["kl_test"] == "<="
    # the request's own block_length / steps win
    own = resolved({"surelock_preset": "paper", "block_length": 16, "steps": 32})
    assert (own["options"]["block_length"], own["options"]["steps"]) == (16, 32)
    assert resolved({})["options"]["block_length"] == 32


def test_confidence_threshold_request_and_server_default():
    assert resolve({}, max_tokens=32).confidence_threshold is None
    assert resolve({"confidence_threshold": 0.9}, max_tokens=32).confidence_threshold == 0.9
    # 0 (or null) is off: the fixed schedule
    assert resolve({"confidence_threshold": 0}, max_tokens=32).confidence_threshold is None
    server = DiffusionDefaults.from_mapping({"confidence_threshold": 0.8})
    assert resolve({}, max_tokens=32, defaults=server).confidence_threshold == 0.8
    assert resolve({"confidence_threshold": 0}, max_tokens=32, defaults=server).confidence_threshold is None
    # a request that asks for random remasking gets the fixed schedule, not an error
    random = resolve({"remasking": "random"}, max_tokens=32, defaults=server)
    assert (random.remasking, random.confidence_threshold) == ("random", None)


@pytest.mark.parametrize("n,steps", [(32, 32), (32, 5), (8, 3), (7, 7), (3, 3)])
def test_transfer_schedule_is_llada_even_split(n, steps):
    s = transfer_schedule(n, steps)
    assert sum(s) == n and len(s) == steps
    assert max(s) - min(s) <= 1 and s == sorted(s, reverse=True)


def test_server_settings_parse_once_and_refuse_unknown_keys():
    from surelock_vllm.engine.settings import SERVER_SETTING_KEYS, ServerSettings

    settings = ServerSettings.from_mapping({"block_length": 16, "max_steps": 64, "eps": 0.1, "enabled": True})
    assert settings.diffusion.block_length == 16 and settings.limits.max_steps == 64
    assert settings.limits.max_gen_length == DiffusionLimits.max_gen_length
    assert settings.surelock.enabled and settings.surelock.eps == 0.1
    assert {"max_gen_length", "max_steps", "block_length", "eps", "trace"} <= set(SERVER_SETTING_KEYS)
    with pytest.raises(ValueError, match="max_step"):
        ServerSettings.from_mapping({"max_step": 64})
    with pytest.raises(InvalidDiffusionOption, match="max_gen_length"):
        ServerSettings.from_mapping({"max_gen_length": -1})


@pytest.mark.parametrize("key", ["_surelock_resolved", "_anything"])
def test_internal_keys_are_refused(key):
    from vllm import SamplingParams

    from surelock_vllm.engine.request_options import resolve_request

    params = SamplingParams(max_tokens=32, extra_args={key: {"options": {"steps": 1}}})
    with pytest.raises(InvalidDiffusionOption, match="internal key") as err:
        resolve_request(params, 8, max_model_len=1024, max_rows_per_step=2048)
    assert err.value.option == key


def test_guidance_and_surelock():
    """A request asking for both is refused naming cfg_scale; a server whose default is SureLock
    serves a guided request without locking; guidance's two canvases must fit the context."""
    from vllm import SamplingParams

    from surelock_vllm.engine.request_options import resolve_request

    def resolved(extra, settings=ServerSettings(), prompt_len=8, max_model_len=1024, kv_block_size=1):
        params = SamplingParams(max_tokens=32, extra_args=extra)
        return resolve_request(params, prompt_len, max_model_len=max_model_len, max_rows_per_step=2048,
                               settings=settings, kv_block_size=kv_block_size)

    for extra in ({"cfg_scale": 1.0, "surelock": True}, {"cfg_scale": 0.5, "surelock_preset": "paper"}):
        with pytest.raises(InvalidDiffusionOption) as err:
            resolved(extra)
        assert err.value.option == "cfg_scale"
    server_lock = ServerSettings.from_mapping({"enabled": True})
    assert resolved({"cfg_scale": 1.0}, server_lock)["surelock"]["enabled"] is False
    assert resolved({}, server_lock)["surelock"]["enabled"] is True
    assert resolved({"cfg_scale": 1.5, "logits_eos_inf": "true"})["options"] == {
        **resolved({})["options"], "cfg_scale": 1.5, "logits_eos_inf": True}
    # a canvas of 40: guidance needs 40 + 40 slots (block 1), or 64 + 40 with 32-slot blocks
    assert resolved({"cfg_scale": 1.0}, max_model_len=80)["options"]["cfg_scale"] == 1.0
    with pytest.raises(InvalidDiffusionOption, match="second canvas") as err:
        resolved({"cfg_scale": 1.0}, max_model_len=100, kv_block_size=32)
    assert err.value.option == "cfg_scale"
