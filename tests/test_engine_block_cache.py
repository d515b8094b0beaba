"""Fast-dLLM's block caches (`kv_cache` prefix / dual) inside the real vLLM engine:
token for token, row for row and lock for lock equal to the plain-torch Fast-dLLM
reference, alone and stacked with threshold decoding and SureLock, in batches
mixed with `none` requests."""

from __future__ import annotations

import pytest

from conftest import CHECKPOINT, PROMPTS, chat_prompt_ids, make_llm, shutdown_llm
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.reference.block_cache import reference_generate_cached
from surelock_vllm.reference.modeling import LLaDAReferenceLM
from test_engine_surelock import locked_steps, params, run

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm():
    engine = make_llm(max_num_batched_tokens=2048, additional_config={"surelock": {"trace": True}})
    yield engine
    shutdown_llm(engine)


@pytest.fixture(scope="module")
def ref_model():
    import torch

    return LLaDAReferenceLM.from_pretrained(CHECKPOINT, torch.float32)


BASE = {"gen_length": 64, "steps": 64, "block_length": 16}
CASES = [
    # (options, temperature): every policy, with and without threshold and SureLock (both rules)
    ({**BASE, "kv_cache": "prefix"}, 0.0),
    ({**BASE, "kv_cache": "dual"}, 0.0),
    ({**BASE, "kv_cache": "none"}, 0.0),
    ({**BASE, "kv_cache": "dual", "confidence_threshold": 0.5}, 0.0),
    ({**BASE, "kv_cache": "prefix", "confidence_threshold": 0.5, "surelock": True, "surelock_eps": 5e-3}, 0.0),
    ({**BASE, "kv_cache": "dual", "surelock": True, "surelock_eps": 5e-2}, 0.0),
    ({**BASE, "kv_cache": "dual", "steps": 32, "surelock": True, "surelock_eps": 5e-2,
      "surelock_candidates": "after_unmask", "surelock_kl_test": "<="}, 0.7),
    ({**BASE, "kv_cache": "prefix", "surelock_preset": "paper", "surelock_eps": 5e-2}, 0.0),
    ({**BASE, "kv_cache": "none", "surelock": True, "surelock_eps": 5e-3}, 0.0),
]


def test_block_caches_match_plain_torch_fast_dllm_in_one_mixed_batch(llm, ref_model, tokenizer, mask_id):
    from surelock_vllm.engine.request_options import resolve_request

    prompts = [chat_prompt_ids(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(len(CASES))]
    sps = [params(extra, temperature=t, seed=i) for i, (extra, t) in enumerate(CASES)]
    resolved = [resolve_request(sp, len(p), max_model_len=4096, max_rows_per_step=4096) for sp, p in zip(sps, prompts)]
    outs, traces = run(llm, prompts, sps)
    frozen_locks = 0
    for i, (prompt, res, out, trace) in enumerate(zip(prompts, resolved, outs, traces)):
        options, lock = DiffusionOptions(**res["options"]), SureLockOptions(**res["surelock"])
        ref = reference_generate_cached(ref_model, prompt, options, mask_id, seed=i, lock_options=lock)
        assert list(out.outputs[0].token_ids) == ref.tokens, i
        rows = [len(rec["query_positions"]) for rec in trace]
        assert rows == ref.rows_per_step, i
        canvas = len(prompt) + options.gen_length
        assert locked_steps(trace, canvas) == ref.lock_step, i
        if options.kv_cache == "none":
            continue
        # a refresh computes every unlocked row; other steps only the block (dual) or the
        # block and what follows (prefix): strictly fewer
        refreshes = ref.refresh_steps
        assert len(refreshes) == options.num_blocks and rows[0] == canvas and min(rows) < canvas
        if options.kv_cache == "dual" and not lock.enabled:
            assert all(r == options.block_length for s, r in enumerate(rows) if s not in refreshes)
        if lock.enabled:
            # rows frozen since a refresh and tested at the next one: prompt rows that locked at a refresh
            frozen_locks += sum(ref.lock_step[p] in refreshes[1:] for p in range(len(prompt)))
    assert frozen_locks > 0


def test_kv_cache_errors_name_it_and_spare_the_batch(llm, tokenizer):
    from vllm import SamplingParams

    prompt = {"prompt_token_ids": chat_prompt_ids(tokenizer, "Hi")}
    bad = [SamplingParams(max_tokens=16, temperature=0.0, extra_args=extra)
           for extra in ({"kv_cache": "triple"}, {"kv_cache": "dual", "cfg_scale": 1.0})]
    good = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, extra_args={"kv_cache": "dual"})
    outs = llm.generate([prompt] * 3, [*bad, good], use_tqdm=False)
    for out in outs[:2]:
        assert out.outputs[0].finish_reason == "error" and "'kv_cache'" in str(out.outputs[0].stop_reason)
    # the valid request of the same batch completes
    assert outs[2].outputs[0].finish_reason == "length" and len(outs[2].outputs[0].token_ids) == 16
