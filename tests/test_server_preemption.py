"""Preemption under KV pressure (`--scheduling-policy priority`): a higher-priority
request that does not fit preempts a running one, which restarts later and
still returns exactly the answer an unconstrained run gives, with no token
sent twice."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from conftest import CHECKPOINT, RemoteServer
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.reference.block_cache import reference_generate_cached
from surelock_vllm.reference.modeling import LLaDAReferenceLM
from surelock_vllm.reference.sampler import reference_generate
from surelock_vllm.reference.surelock import reference_generate_surelock

pytestmark = pytest.mark.engine
NUM_BLOCKS = 20  # of 32 tokens; block 0 is vLLM's null block: 19 usable
LOW_GEN, HIGH_GEN = 256, 64


@pytest.fixture(scope="module")
def server():
    srv = RemoteServer("--num-gpu-blocks-override", str(NUM_BLOCKS), "--max-model-len", "512",
                       "--scheduling-policy", "priority")
    yield srv
    srv.stop()


def _stream(server, body, first_block: threading.Event):
    """Streamed completion: (prompt ids, generated ids, text), setting `first_block` on the first tokens."""
    prompt_ids, ids, text = None, [], ""
    with requests.post(server.url + "/v1/completions", json={**body, "stream": True}, stream=True, timeout=600) as resp:
        assert resp.status_code == 200, resp.text
        for line in resp.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            choice = json.loads(line[len(b"data: "):])["choices"][0]
            prompt_ids = choice.get("prompt_token_ids") or prompt_ids
            ids += choice.get("token_ids") or []
            text += choice.get("text") or ""
            if ids:
                first_block.set()
    return prompt_ids, ids, text


def test_higher_priority_request_preempts_and_all_answers_are_right(server, tokenizer, mask_id):
    lock_xargs = {"steps": LOW_GEN, "block_length": 32, "surelock_eps": 5e-3}
    # the second one also decodes by confidence threshold (its blocks end at data-dependent steps),
    # with the dual block cache (restarted, it refreshes again)
    low_xargs = [lock_xargs, {**lock_xargs, "confidence_threshold": 0.7, "kv_cache": "dual"}]
    low = [dict(model=str(CHECKPOINT), prompt=f"Low priority story number {i}", max_tokens=LOW_GEN, temperature=0.0,
                ignore_eos=True, priority=10, return_token_ids=True, vllm_xargs=low_xargs[i]) for i in range(2)]
    high = dict(model=str(CHECKPOINT), prompt="Urgent!", max_tokens=HIGH_GEN, temperature=0.0, ignore_eos=True,
                priority=0, return_token_ids=True, vllm_xargs={"steps": HIGH_GEN, "block_length": 32, "surelock": 0})
    blocks = [-(-(len(tokenizer(j["prompt"])["input_ids"]) + j["max_tokens"]) // 32) for j in (*low, high)]
    # both low-priority canvases fit, the high-priority one does not fit beside them
    assert blocks[0] + blocks[1] <= NUM_BLOCKS - 1 < sum(blocks)

    started = [threading.Event() for _ in low]
    with ThreadPoolExecutor(max_workers=3) as pool:
        low_futures = [pool.submit(_stream, server, job, ev) for job, ev in zip(low, started)]
        assert all(ev.wait(300) for ev in started), "low-priority requests did not start"
        # both are mid-generation (a block already sent): the urgent one must preempt
        high_resp = pool.submit(requests.post, server.url + "/v1/completions", json=high, timeout=600).result()
        low_results = [f.result() for f in low_futures]

    assert high_resp.status_code == 200, high_resp.text
    metrics = server.metrics()
    assert next(v for k, v in metrics.items() if k.startswith("vllm:num_preemptions_total")) >= 1

    model = LLaDAReferenceLM.from_pretrained(CHECKPOINT, torch.float32)
    for (prompt_ids, ids, text), xargs in zip(low_results, low_xargs):
        options = {k: v for k, v in xargs.items() if not k.startswith("surelock")}
        low_options = DiffusionOptions.resolve(options, max_tokens=LOW_GEN, temperature=0.0)
        lock = SureLockOptions(enabled=True, eps=5e-3)
        if low_options.kv_cache != "none":
            want = reference_generate_cached(model, prompt_ids, low_options, mask_id, lock_options=lock).tokens
        else:
            want = reference_generate_surelock(model, prompt_ids, low_options, lock, mask_id).tokens
        assert ids == want  # the whole answer, every token once, in order
    got = high_resp.json()["choices"][0]
    high_options = DiffusionOptions.resolve({"steps": HIGH_GEN, "block_length": 32}, max_tokens=HIGH_GEN, temperature=0.0)
    assert got["token_ids"] == reference_generate(model, got["prompt_token_ids"], high_options, mask_id)
    # everything freed afterwards
    assert next(v for k, v in server.metrics().items() if k.startswith("vllm:kv_cache_usage_perc")) == 0
