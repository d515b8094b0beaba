"""Fast-dLLM's block caches in plain torch: the row rule, and the reference sampler
against the no-cache references (no engine)."""

from __future__ import annotations

import pytest
import torch

from conftest import CHECKPOINT, PROMPTS, chat_prompt_ids
from surelock_vllm.diffusion.block_cache import rows_for
from surelock_vllm.diffusion.options import DiffusionOptions, InvalidDiffusionOption, SureLockOptions
from surelock_vllm.reference.block_cache import reference_generate_cached
from surelock_vllm.reference.modeling import LLaDAReferenceLM
from surelock_vllm.reference.sampler import reference_generate
from surelock_vllm.reference.surelock import reference_generate_surelock


def test_policy_rows():
    # canvas of 12, block [4, 8)
    assert rows_for("none", 12, 4, 4, refresh=False).all()
    for policy in ("prefix", "dual"):
        assert rows_for(policy, 12, 4, 4, refresh=True).all()  # the refresh computes everything
    assert rows_for("prefix", 12, 4, 4, refresh=False).nonzero().squeeze(-1).tolist() == list(range(4, 12))
    assert rows_for("dual", 12, 4, 4, refresh=False).nonzero().squeeze(-1).tolist() == [4, 5, 6, 7]


def test_kv_cache_option_is_validated_by_name():
    resolve = DiffusionOptions.resolve
    assert resolve({"kv_cache": "dual"}, max_tokens=32, temperature=0.0).kv_cache == "dual"
    assert resolve({}, max_tokens=32, temperature=0.0).kv_cache == "none"
    for bad in ({"kv_cache": "triple"}, {"kv_cache": True}, {"kv_cache": "prefix", "cfg_scale": 1.0}):
        with pytest.raises(InvalidDiffusionOption) as err:
            resolve(bad, max_tokens=32, temperature=0.0)
        assert err.value.option == "kv_cache"
    from surelock_vllm.diffusion.options import DiffusionDefaults

    assert DiffusionDefaults.from_mapping({"kv_cache": "prefix"}).kv_cache == "prefix"
    assert resolve({}, max_tokens=32, temperature=0.0, defaults=DiffusionDefaults(kv_cache="prefix")).kv_cache == "prefix"
    with pytest.raises(InvalidDiffusionOption, match="kv_cache"):
        DiffusionDefaults.from_mapping({"kv_cache": "both"})


@pytest.fixture(scope="module")
def model():
    return LLaDAReferenceLM.from_pretrained(CHECKPOINT, torch.float32)


def test_no_cache_is_the_reference_sampler_and_surelock(model, tokenizer, mask_id):
    prompt = chat_prompt_ids(tokenizer, PROMPTS[0])
    options = DiffusionOptions.resolve({"gen_length": 32, "steps": 32, "block_length": 8}, max_tokens=None,
                                       temperature=0.0)
    run = reference_generate_cached(model, prompt, options, mask_id)
    assert run.tokens == reference_generate(model, prompt, options, mask_id)
    assert run.rows_per_step == [len(prompt) + 32] * 32 and run.refresh_steps == [0, 8, 16, 24]
    lock = SureLockOptions(enabled=True, eps=5e-3)
    locked = reference_generate_cached(model, prompt, options, mask_id, lock_options=lock)
    plain = reference_generate_surelock(model, prompt, options, lock, mask_id)
    assert (locked.tokens, locked.rows_per_step, locked.lock_step) == (plain.tokens, plain.rows_per_step,
                                                                       plain.lock_step)


@pytest.mark.parametrize("policy", ["prefix", "dual"])
def test_cached_rows_per_step(model, tokenizer, mask_id, policy):
    prompt = chat_prompt_ids(tokenizer, PROMPTS[1])
    options = DiffusionOptions.resolve({"gen_length": 32, "steps": 16, "block_length": 8, "kv_cache": policy},
                                       max_tokens=None, temperature=0.0)
    run = reference_generate_cached(model, prompt, options, mask_id)
    canvas = len(prompt) + 32
    # 4 blocks of 4 steps: a refresh, then the block (dual) or the block and the rest (prefix)
    expected = []
    for block in range(4):
        after = 8 if policy == "dual" else 32 - 8 * block
        expected += [canvas] + [after] * 3
    assert run.rows_per_step == expected and run.refresh_steps == [0, 4, 8, 12]
    assert len(run.tokens) == 32 and mask_id not in run.tokens
