"""LLaDA-8B-Instruct's chat behaviour and LLaDA generate()'s options, at the real ids.

One engine on the shipped trained model re-laid on LLaDA-8B's vocabulary
(126,464 ids; `<|endoftext|>` 126081, `<|eot_id|>` 126348, [MASK] 126336)
with LLaDA-8B-Instruct's generation_config, which lists only 126081 as EOS.
The trained model ends an answer with `<|eot_id|>` and pads with
`<|endoftext|>`, as LLaDA-8B-Instruct does, so these tests see what a user of
the real checkpoint sees: the stop at end of turn, the default temperature,
classifier-free guidance and the EOS options, each against the plain-torch
reference sampler.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SHIPPED_MODEL, chat_prompt_ids, make_llm, shutdown_llm
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.evaluate import _first_per_task
from surelock_vllm.reference.modeling import LLaDAReferenceLM
from surelock_vllm.reference.sampler import reference_generate
from surelock_vllm.reference.surelock import reference_generate_surelock
from surelock_vllm.tasks import heldout_problems
from surelock_vllm.tools.make_checkpoint import write_on_llada_vocab

pytestmark = pytest.mark.engine

EOS, EOT, MASK = 126081, 126348, 126336
GEN = {"gen_length": 32, "steps": 32, "block_length": 8}  # the setting the model was trained for


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_on_llada_vocab(SHIPPED_MODEL, tmp_path_factory.mktemp("ckpt") / "llada-trained-126k")


@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = make_llm(model=str(checkpoint), max_num_seqs=16, max_num_batched_tokens=4096)
    yield engine
    shutdown_llm(engine)


@pytest.fixture(scope="module")
def ref_model(checkpoint):
    return LLaDAReferenceLM.from_pretrained(checkpoint, torch.float32)


@pytest.fixture(scope="module")
def prompts(llm):
    tokenizer = llm.get_tokenizer()
    return [chat_prompt_ids(tokenizer, p.prompt) for p in _first_per_task(heldout_problems(), 2)]


def params(extra, temperature=0.0, seed=None, ignore_eos=True):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=extra["gen_length"], temperature=temperature, seed=seed,
                          ignore_eos=ignore_eos, extra_args=dict(extra))


def reference(ref_model, prompt, extra, temperature=0.0, seed=0):
    options = DiffusionOptions.resolve(extra, max_tokens=None, temperature=temperature,
                                       ignore_keys=frozenset({"surelock"}))
    if extra.get("surelock"):
        return reference_generate_surelock(ref_model, prompt, options, SureLockOptions(enabled=True), MASK, seed,
                                           eos_id=EOS, eot_id=EOT).tokens
    return reference_generate(ref_model, prompt, options, MASK, seed, eos_id=EOS, eot_id=EOT)


def test_checkpoint_has_llada_8b_ids_and_generation_config(checkpoint, llm):
    tokenizer = llm.get_tokenizer()
    assert len(tokenizer) == 126464
    assert tokenizer.eos_token_id == EOS and tokenizer.convert_tokens_to_ids("<|eot_id|>") == EOT
    assert json.loads((checkpoint / "config.json").read_text())["mask_token_id"] == MASK
    # as LLaDA-8B-Instruct's: end of turn is not an EOS id, so vLLM alone would not stop there
    assert json.loads((checkpoint / "generation_config.json").read_text())["eos_token_id"] == EOS


def test_chat_stops_at_end_of_turn(llm, ref_model, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params(GEN, ignore_eos=False), use_tqdm=False)
    at_eot = 0
    for prompt, out in zip(prompts, outs):
        full = reference(ref_model, prompt, GEN)
        cut = next(i for i, t in enumerate(full) if t in (EOS, EOT))  # every answer ends in one
        completion = out.outputs[0]
        assert list(completion.token_ids) == full[: cut + 1]
        assert completion.finish_reason == "stop"
        if full[cut] == EOT:
            at_eot += 1
            assert completion.stop_reason == EOT
    assert at_eot >= len(prompts) - 1  # the model ends its turns with <|eot_id|>
    # ignore_eos turns the end-of-turn stop off as well: the whole canvas comes back
    whole = llm.generate([{"prompt_token_ids": prompts[0]}], params(GEN, ignore_eos=True), use_tqdm=False)[0]
    assert list(whole.outputs[0].token_ids) == reference(ref_model, prompts[0], GEN)
    assert whole.outputs[0].finish_reason == "length"


def test_a_request_without_temperature_samples_greedily(llm, prompts):
    defaults = llm.get_default_sampling_params()
    assert defaults.temperature == 0.0  # vLLM's own default would be 1.0
    defaults.max_tokens, defaults.ignore_eos, defaults.seed = GEN["gen_length"], True, 3
    defaults.extra_args = dict(GEN)
    batch = [{"prompt_token_ids": p} for p in prompts[:4]]
    omitted = llm.generate(batch, defaults, use_tqdm=False)
    greedy = llm.generate(batch, params(GEN, temperature=0.0, seed=3), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in omitted] == [list(o.outputs[0].token_ids) for o in greedy]


def test_classifier_free_guidance_matches_the_reference(llm, ref_model, prompts):
    cases = [  # (prompt, options, temperature, seed), in one batch with unguided and SureLock requests
        (0, {**GEN, "cfg_scale": 0.5}, 0.0, 0),
        (1, {**GEN, "cfg_scale": 2.0}, 0.7, 5),
        (2, {"gen_length": 32, "steps": 16, "block_length": 16, "cfg_scale": 1.0, "remasking": "random"}, 0.0, 2),
        (3, {**GEN, "cfg_scale": 3.0, "confidence_threshold": 0.9}, 0.0, 0),
        (4, dict(GEN), 0.0, 0),
        (5, {**GEN, "surelock": True}, 0.0, 0),
    ]
    sps = [params(extra, temperature=t, seed=s) for _, extra, t, s in cases]
    outs = llm.generate([{"prompt_token_ids": prompts[i]} for i, *_ in cases], sps, use_tqdm=False)
    changed = 0
    for (i, extra, t, s), out in zip(cases, outs):
        expected = reference(ref_model, prompts[i], extra, temperature=t, seed=s)
        assert list(out.outputs[0].token_ids) == expected, extra
        stats = out.kv_transfer_params["surelock"]
        if extra.get("cfg_scale"):
            unguided = reference(ref_model, prompts[i], {**extra, "cfg_scale": 0}, temperature=t, seed=s)
            changed += expected != unguided
            # both canvases every step, counted against the same guided sampler
            assert stats["rows"] == stats["rows_nolock"] == 2 * stats["steps"] * (len(prompts[i]) + extra["gen_length"])
    assert changed >= 2, "guidance changed no answer: the comparison above was vacuous"


def test_eos_options_match_the_reference(llm, ref_model, prompts):
    cases = [
        (0, {**GEN, "logits_eos_inf": True}, 0.0),
        (1, {**GEN, "confidence_eos_eot_inf": True}, 0.0),
        (2, {**GEN, "logits_eos_inf": True, "confidence_eos_eot_inf": True}, 0.8),
        (3, {**GEN, "confidence_eos_eot_inf": True, "confidence_threshold": 0.9}, 0.0),
        (4, {**GEN, "logits_eos_inf": True, "confidence_eos_eot_inf": True, "surelock": True}, 0.0),
        (5, {**GEN, "confidence_eos_eot_inf": True, "cfg_scale": 1.0}, 0.0),
    ]
    outs = llm.generate([{"prompt_token_ids": prompts[i]} for i, *_ in cases],
                        [params(extra, temperature=t, seed=1) for _, extra, t in cases], use_tqdm=False)
    for (i, extra, t), out in zip(cases, outs):
        tokens = list(out.outputs[0].token_ids)
        assert tokens == reference(ref_model, prompts[i], extra, temperature=t, seed=1), extra
        if extra.get("logits_eos_inf"):
            # the model pads its answers with <|endoftext|>; with its logit at -inf it never appears
            assert EOS not in tokens and EOS in reference(ref_model, prompts[i], GEN)


@pytest.mark.parametrize(("extra", "option"), [
    ({"cfg_scale": -1}, "cfg_scale"),
    ({"cfg_scale": "2"}, "cfg_scale"),
    ({"cfg_scale": float("inf")}, "cfg_scale"),
    ({"cfg_scale": 1.0, "surelock": True}, "cfg_scale"),
    # two canvases exceed the 1024-token context
    ({"cfg_scale": 1.0, "gen_length": 512, "steps": 512, "block_length": 32}, "cfg_scale"),
    ({"logits_eos_inf": "maybe"}, "logits_eos_inf"),
    ({"confidence_eos_eot_inf": 2}, "confidence_eos_eot_inf"),
])
def test_invalid_generate_options_fail_alone_naming_the_option(llm, ref_model, prompts, extra, option):
    bad = params({**GEN, **extra})
    outs = llm.generate([{"prompt_token_ids": prompts[0]}] * 2, [bad, params(GEN)], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error"
    assert f"'{option}'" in str(outs[0].outputs[0].stop_reason)
    assert list(outs[1].outputs[0].token_ids) == reference(ref_model, prompts[0], GEN)
