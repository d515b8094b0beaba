"""A KV cache too small for all requests at once: requests queue, none is lost,
and every answer is the one an unconstrained run gives."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from conftest import CHECKPOINT, RemoteServer
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.reference.modeling import LLaDAReferenceLM
from surelock_vllm.reference.surelock import reference_generate_surelock

pytestmark = pytest.mark.engine
NUM_BLOCKS = 12  # of 32 tokens; block 0 is vLLM's null block: 11 usable


@pytest.fixture(scope="module")
def server():
    # vLLM requires the cache to hold one max-length request: 11 x 32 = 352
    srv = RemoteServer("--num-gpu-blocks-override", str(NUM_BLOCKS), "--max-model-len", "352")
    yield srv
    srv.stop()


def test_requests_beyond_kv_capacity_all_complete_correctly(server, tokenizer, mask_id):
    ref_model = LLaDAReferenceLM.from_pretrained(CHECKPOINT, torch.float32)
    jobs = [dict(prompt=f"Item {i}: spell {i * 7}", max_tokens=64, temperature=0.0 if i % 2 else 0.6, seed=i,
                 ignore_eos=True, return_token_ids=True,
                 vllm_xargs={"steps": 32, "block_length": 16, "surelock_eps": 5e-3}) for i in range(12)]
    canvas_blocks = [-(-(len(tokenizer(j["prompt"])["input_ids"]) + 64) // 32) for j in jobs]
    assert sum(canvas_blocks) > 3 * (NUM_BLOCKS - 1)  # far more than fits at once

    waiting_seen = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            metrics = server.metrics()
            waiting_seen.append(next(v for k, v in metrics.items() if k.startswith("vllm:num_requests_waiting")))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()

    def send(job):
        resp = requests.post(server.url + "/v1/completions", json={"model": str(CHECKPOINT), **job}, timeout=600)
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]

    try:
        with ThreadPoolExecutor(max_workers=12) as pool:
            results = list(pool.map(send, jobs))
    finally:
        done.set()
        watcher.join()
    assert max(waiting_seen) > 0  # the cache was the bottleneck: requests queued
    options = DiffusionOptions.resolve({"steps": 32, "block_length": 16}, max_tokens=64, temperature=0.0)
    for job, got in zip(jobs, results):
        opts = DiffusionOptions(**{**options.as_dict(), "temperature": job["temperature"]})
        want = reference_generate_surelock(
            ref_model, got["prompt_token_ids"], opts, SureLockOptions(enabled=True, eps=5e-3), mask_id, job["seed"]
        ).tokens
        assert got["token_ids"] == want
    # whole canvases are admitted at once, so the engine never had to preempt
    metrics = server.metrics()
    assert next(v for k, v in metrics.items() if k.startswith("vllm:num_preemptions_total")) == 0
    assert next(v for k, v in metrics.items() if k.startswith("vllm:kv_cache_usage_perc")) == 0


def test_canvas_larger_than_the_whole_cache_is_refused(server):
    resp = requests.post(server.url + "/v1/completions", json={
        "model": str(CHECKPOINT), "prompt": "Hi", "max_tokens": 512, "vllm_xargs": {"steps": 16, "block_length": 32}}, timeout=60)
    # beyond the context the cache was sized for: refused, naming the option
    body = resp.json()
    assert resp.status_code != 200 or body["choices"][0]["finish_reason"] == "error", body
    assert "max_tokens" in resp.text
    ok = requests.post(server.url + "/v1/completions", json={"model": str(CHECKPOINT), "prompt": "Hi", "max_tokens": 16}, timeout=60)
    assert ok.status_code == 200
