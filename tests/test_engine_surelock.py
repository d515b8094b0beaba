"""SureLock inside the real vLLM engine: real skipping, exact agreement with the
plain-torch SureLock reference, no-lock equivalence, accounting, mixed batches."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from conftest import CHECKPOINT, PROMPTS, chat_prompt_ids, make_llm, shutdown_llm
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.diffusion.flops import ModelShape
from surelock_vllm.reference.modeling import LLaDAReferenceLM
from surelock_vllm.reference.sampler import reference_generate
from surelock_vllm.reference.surelock import reference_generate_surelock

pytestmark = pytest.mark.engine

BUDGET = 640  # max_num_batched_tokens: rows one step may compute


@pytest.fixture(scope="module")
def llm():
    engine = make_llm(max_num_batched_tokens=BUDGET, additional_config={"surelock": {"trace": True}})
    yield engine
    shutdown_llm(engine)


@pytest.fixture(scope="module")
def ref_model():
    return LLaDAReferenceLM.from_pretrained(CHECKPOINT, torch.float32)


def params(extra, temperature=0.0, seed=0):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=extra["gen_length"], temperature=temperature, seed=seed,
        ignore_eos=True, extra_args=dict(extra),
    )


def run(llm, prompts, sps):
    """Generate and return (outputs, trace grouped by request)."""
    llm.collective_rpc("take_trace")  # drop earlier records
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
    trace = defaultdict(list)
    for rec in llm.collective_rpc("take_trace")[0]:
        # the engine core's id is the frontend's id plus a random suffix
        trace[rec["req_id"].rsplit("-", 1)[0]].append(rec)
    return outs, [trace[o.request_id] for o in outs]


def diffusion_options(extra):
    keys = {"gen_length", "steps", "block_length", "remasking"}
    return DiffusionOptions.resolve({k: v for k, v in extra.items() if k in keys}, max_tokens=None, temperature=0.0)


def locked_steps(trace, canvas_len):
    """The step each canvas position locked at (-1: never), from the engine's trace."""
    lock_step = [-1] * canvas_len
    for rec in trace:
        for pos in rec["locked"]:
            if lock_step[pos] < 0:
                lock_step[pos] = rec["step"]
    return lock_step


LOCKED = {"gen_length": 64, "steps": 64, "block_length": 32, "surelock": True, "surelock_eps": 1e-3}


def test_surelock_matches_plain_torch_surelock(llm, ref_model, tokenizer, mask_id):
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS[:4]]
    outs, traces = run(llm, prompts, params(LOCKED))
    lock = SureLockOptions(enabled=True, eps=1e-3)
    for prompt, out, trace in zip(prompts, outs, traces):
        ref = reference_generate_surelock(ref_model, prompt, diffusion_options(LOCKED), lock, mask_id)
        assert list(out.outputs[0].token_ids) == ref.tokens
        assert [len(t["query_positions"]) for t in trace] == ref.rows_per_step
        # same lock decisions: the step each position locked at
        lock_step = locked_steps(trace, len(ref.lock_step))
        assert lock_step == ref.lock_step
        assert sum(s >= 0 for s in lock_step) > len(prompt)  # locking really happened


THRESHOLD_CASES = [
    # (prompt, options, temperature): confidence-threshold decoding stacked with SureLock
    ("Hi", {"gen_length": 64, "steps": 64, "block_length": 32, "confidence_threshold": 0.65,
            "surelock": True, "surelock_eps": 1e-3}, 0.0),
    ("What is 2+3?", {"gen_length": 32, "steps": 32, "block_length": 8, "confidence_threshold": 0.3,
                      "surelock": True, "surelock_eps": 5e-2, "surelock_confidence_gate": 0.2}, 0.0),
    ("Count to five", {"gen_length": 48, "steps": 24, "block_length": 16, "confidence_threshold": 0.6,
                       "surelock": True, "surelock_eps": 5e-3}, 0.7),
    ("Okay", {"gen_length": 32, "steps": 32, "block_length": 16, "confidence_threshold": 0.6,
              "surelock": False}, 0.0),
]


def test_threshold_decoding_with_surelock_matches_plain_torch(llm, ref_model, tokenizer, mask_id):
    prompts = [chat_prompt_ids(tokenizer, c[0]) for c in THRESHOLD_CASES]
    sps = [params(extra, temperature=t, seed=i) for i, (_, extra, t) in enumerate(THRESHOLD_CASES)]
    outs, traces = run(llm, prompts, sps)
    for i, (prompt, (_, extra, t), out, trace) in enumerate(zip(prompts, THRESHOLD_CASES, outs, traces)):
        options = DiffusionOptions.resolve(
            {k: v for k, v in extra.items() if not k.startswith("surelock")}, max_tokens=None, temperature=t
        )
        stats = out.kv_transfer_params["surelock"]
        assert stats["steps"] == len(trace) < stats["steps_fixed"] == extra["steps"]
        if not extra["surelock"]:
            assert list(out.outputs[0].token_ids) == reference_generate(ref_model, prompt, options, mask_id, seed=i)
            continue
        lock = SureLockOptions().resolve(extra)
        ref = reference_generate_surelock(ref_model, prompt, options, lock, mask_id, seed=i)
        assert list(out.outputs[0].token_ids) == ref.tokens
        assert [len(rec["query_positions"]) for rec in trace] == ref.rows_per_step
        lock_step = locked_steps(trace, len(ref.lock_step))
        assert lock_step == ref.lock_step
        assert sum(s >= 0 for s in lock_step) > 0


RULE_CASES = [
    # (prompt, options): both lock rules, with and without the gate, several eps, one batch
    ("Hi", {"gen_length": 64, "steps": 64, "block_length": 32, "surelock": True, "surelock_eps": 1e-3}),
    ("Hello", {"gen_length": 64, "steps": 64, "block_length": 32, "surelock": True, "surelock_eps": 1e-3,
               "surelock_candidates": "after_unmask", "surelock_kl_test": "<="}),
    ("What is 2+3?", {"gen_length": 32, "steps": 32, "block_length": 32, "surelock_preset": "paper",
                      "surelock_eps": 5e-2}),
    ("Count to five", {"gen_length": 48, "steps": 48, "block_length": 16, "surelock": True, "surelock_eps": 5e-3,
                       "surelock_candidates": "after_unmask", "surelock_confidence_gate": 0.5}),
    ("Okay", {"gen_length": 32, "steps": 16, "block_length": 16, "surelock": True, "surelock_eps": 0.0,
              "surelock_kl_test": "<=", "surelock_confidence_gate": 0.2}),
]


def test_both_lock_rules_match_plain_torch_in_one_batch(llm, ref_model, tokenizer, mask_id):
    from surelock_vllm.engine.request_options import resolve_request

    prompts = [chat_prompt_ids(tokenizer, c[0]) for c in RULE_CASES]
    sps = [params(extra, seed=i) for i, (_, extra) in enumerate(RULE_CASES)]
    # the options each request resolves to (the paper preset's included), before the engine sees them
    resolved = [resolve_request(sp, len(p), max_model_len=4096, max_rows_per_step=4096) for sp, p in zip(sps, prompts)]
    outs, traces = run(llm, prompts, sps)
    same_step_locks = 0
    for prompt, res, out, trace in zip(prompts, resolved, outs, traces):
        options, lock = DiffusionOptions(**res["options"]), SureLockOptions(**res["surelock"])
        ref = reference_generate_surelock(ref_model, prompt, options, lock, mask_id)
        assert list(out.outputs[0].token_ids) == ref.tokens
        assert [len(rec["query_positions"]) for rec in trace] == ref.rows_per_step
        assert locked_steps(trace, len(ref.lock_step)) == ref.lock_step
        if lock.after_unmask:
            # a generated token that locked at the step that unmasked it (Algorithm 1's timing)
            unmasked_at = {}
            for rec in trace:
                still = set(rec["masked"])
                for pos in range(len(prompt), len(ref.lock_step)):
                    if pos not in still:
                        unmasked_at.setdefault(pos, rec["step"])
            same_step_locks += sum(ref.lock_step[p] == s for p, s in unmasked_at.items())
    assert same_step_locks > 0


def test_skipping_is_real(llm, tokenizer):
    """Rows fed = unlocked rows; locked rows' paged K/V never change again."""
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS[:2]]
    outs, traces = run(llm, prompts, params(LOCKED))
    for out, trace in zip(outs, traces):
        canvas_len = len(out.prompt_token_ids) + LOCKED["gen_length"]
        locked_before: set[int] = set()
        frozen: dict[int, list] = {}  # position -> its K/V (all layers) when first seen locked
        for rec in trace:
            fed = set(rec["query_positions"])
            assert len(fed) == canvas_len - len(locked_before)
            assert fed.isdisjoint(locked_before)
            for i, pos in enumerate(rec["locked"]):
                kv = [layer[i] for layer in rec["locked_kv"]]
                if pos in frozen:
                    assert kv == frozen[pos], f"K/V of locked position {pos} changed at step {rec['step']}"
                else:
                    frozen[pos] = kv
            locked_before = set(rec["locked"])
        assert len(frozen) > canvas_len // 4  # many positions locked and were checked
        assert sum(len(t["query_positions"]) for t in trace) < canvas_len * len(trace)


@pytest.mark.parametrize("lock_args", [{"surelock": False}, {"surelock": True, "surelock_eps": 0.0}])
def test_no_lock_and_unreachable_eps_equal_reference(llm, ref_model, tokenizer, mask_id, lock_args):
    base = {"gen_length": 32, "steps": 16, "block_length": 8}
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    outs, traces = run(llm, prompts, params({**base, **lock_args}))
    options = diffusion_options(base)
    for prompt, out, trace in zip(prompts, outs, traces):
        assert list(out.outputs[0].token_ids) == reference_generate(ref_model, prompt, options, mask_id)
        assert all(not rec["locked"] for rec in trace)
        assert out.kv_transfer_params["surelock"]["flops_ratio"] == 1.0


def test_accounting_at_gen_256(llm, tokenizer):
    """FLOPs by formula, reported per request; reduction grows with eps."""
    prompt = chat_prompt_ids(tokenizer, PROMPTS[2])
    shape = ModelShape.from_config(LLaDAReferenceLM.from_pretrained(CHECKPOINT).config)
    ratios = {}
    for eps in (5e-4, 5e-3, 5e-2):
        extra = {"gen_length": 256, "steps": 256, "block_length": 32, "surelock": True, "surelock_eps": eps}
        (out,), (trace,) = run(llm, [prompt], params(extra))
        stats = out.kv_transfer_params["surelock"]
        canvas = len(prompt) + 256
        rows = [len(t["query_positions"]) for t in trace]
        assert stats["steps"] == len(rows) == 256
        assert stats["rows"] == sum(rows) and stats["rows_nolock"] == 256 * canvas
        assert stats["dense_flops"] == sum(shape.dense_flops(r) for r in rows)
        assert stats["attention_flops"] == sum(shape.attention_flops(r, canvas) for r in rows)
        assert stats["attention_flops_nolock"] == 256 * shape.attention_flops(canvas, canvas)
        assert len(stats["locked_fraction"]) == 256
        assert stats["locked_fraction"] == sorted(stats["locked_fraction"])  # locks are permanent
        ratios[eps] = stats["flops_ratio"]
    assert ratios[5e-2] <= ratios[5e-3] <= ratios[5e-4] < 1.0


def test_mixed_batch_matches_single_requests(llm, tokenizer):
    cases = [
        ("Hi", {"gen_length": 32, "steps": 16, "block_length": 8, "surelock": False}),
        ("What is 2+3?", {"gen_length": 64, "steps": 32, "block_length": 32, "surelock": True, "surelock_eps": 1e-3}),
        ("Count to five", {"gen_length": 48, "steps": 48, "block_length": 16, "surelock": True, "surelock_eps": 5e-2}),
        ("Okay, thanks!", {"gen_length": 32, "steps": 32, "block_length": 32, "surelock": True,
                           "surelock_eps": 5e-3, "surelock_confidence_gate": 0.2}),
        ("Reverse 'abc'", {"gen_length": 40, "steps": 20, "block_length": 8, "surelock": True,
                           "surelock_eps": 1e-2, "surelock_lock_prompt": False}),
    ]
    prompts = [chat_prompt_ids(tokenizer, c[0]) for c in cases]
    together, _ = run(llm, prompts, [params(extra, temperature=0.5, seed=i) for i, (_, extra) in enumerate(cases)])
    for i, (prompt, (_, extra)) in enumerate(zip(prompts, cases)):
        (alone,), (trace,) = run(llm, [prompt], params(extra, temperature=0.5, seed=i))
        assert together[i].outputs[0].token_ids == alone.outputs[0].token_ids
        mine, theirs = together[i].kv_transfer_params["surelock"], alone.kv_transfer_params["surelock"]
        for key in mine.keys() | theirs.keys():
            assert mine.get(key) == theirs.get(key), (i, key)
        if not extra.get("surelock_lock_prompt", True):
            assert all(set(range(len(prompt))) <= set(t["query_positions"]) for t in trace)


def test_budget_counts_computed_rows(llm, tokenizer):
    """With locking, a step's token budget fits more requests."""
    prompts = [chat_prompt_ids(tokenizer, p) for p in ("Hi", "Hey", "Hello", "Yo!")]
    base = {"gen_length": 160, "steps": 160, "block_length": 32}

    def max_requests_per_step(extra):
        _, traces = run(llm, prompts, params(extra))
        per_step = defaultdict(int)
        rows = defaultdict(int)
        for trace in traces:
            for rec in trace:
                per_step[rec["engine_step"]] += 1
                rows[rec["engine_step"]] += len(rec["query_positions"])
        assert max(rows.values()) <= BUDGET
        return max(per_step.values())

    canvas = min(len(p) for p in prompts) + 160
    assert 4 * canvas > BUDGET  # four full canvases never fit in one step
    assert max_requests_per_step({**base, "surelock": False}) == BUDGET // canvas
    assert max_requests_per_step({**base, "surelock": True, "surelock_eps": 5e-2}) == 4


def test_most_aggressive_locking_still_computes_every_step(llm, ref_model, tokenizer, mask_id):
    # An eps that locks every unmasked position at its first measured KL. Steps
    # never outnumber positions (steps <= gen_length is enforced), so every
    # step still computes the current block's masked rows: no step is idle.
    extra = {"gen_length": 32, "steps": 32, "block_length": 16, "surelock": True, "surelock_eps": 10.0}
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS[:2]]
    outs, traces = run(llm, prompts, params(extra))
    options = diffusion_options(extra)
    for prompt, out, trace in zip(prompts, outs, traces):
        ref = reference_generate_surelock(ref_model, prompt, options, SureLockOptions(enabled=True, eps=10.0), mask_id)
        assert list(out.outputs[0].token_ids) == ref.tokens
        rows = [len(r["query_positions"]) for r in trace]
        assert rows == ref.rows_per_step and len(rows) == 32
        assert min(rows) >= 1 and rows[-1] < len(prompt) // 2  # the prompt is locked by the end


def test_cpu_worker_bounds_onednn_primitive_cache(llm):
    """SureLock's row counts change every step; oneDNN's process-wide primitive cache
    (1024 entries by default) kept ~250 MB of primitives for them at the 126k vocabulary.
    The CPU worker bounds it unless the user set their own value."""
    import os

    from surelock_vllm.engine.worker_cpu import ONEDNN_PRIMITIVE_CACHE_CAPACITY

    expected = int(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_PRIMITIVE_CACHE_CAPACITY))
    report = llm.collective_rpc("memory_report")[0]
    assert report["onednn_primitive_cache_capacity"] == expected
