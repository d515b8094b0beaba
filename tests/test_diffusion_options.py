"""Diffusion options: defaults, max_tokens mapping, and errors that name the option."""

import pytest

from surelock_vllm.diffusion.denoiser import transfer_schedule
from surelock_vllm.diffusion.options import (
    DiffusionDefaults,
    DiffusionOptions,
    InvalidDiffusionOption,
)


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
    ],
)
def test_invalid_options_name_the_option(extra, max_tokens, temperature, option):
    with pytest.raises(InvalidDiffusionOption) as err:
        resolve(extra, max_tokens=max_tokens, temperature=temperature)
    assert err.value.option == option
    assert f"'{option}'" in str(err.value)


def test_bad_server_default_is_refused():
    with pytest.raises(InvalidDiffusionOption, match="remasking"):
        DiffusionDefaults.from_mapping({"remasking": "nope"})


@pytest.mark.parametrize("n,steps", [(32, 32), (32, 5), (8, 3), (7, 7), (3, 5)])
def test_transfer_schedule_is_llada_even_split(n, steps):
    s = transfer_schedule(n, steps)
    assert sum(s) == n and len(s) == steps
    assert max(s) - min(s) <= 1 and s == sorted(s, reverse=True)
