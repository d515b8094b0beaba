"""`vllm serve <checkpoint> --plugin surelock`: the OpenAI-compatible server."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from conftest import CHECKPOINT, RemoteServer, chat_prompt_ids, make_llm, shutdown_llm
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.reference.modeling import LLaDAReferenceLM
from surelock_vllm.reference.sampler import reference_generate
from surelock_vllm.reference.surelock import reference_generate_surelock

pytestmark = pytest.mark.engine
MODEL = str(CHECKPOINT)


@pytest.fixture(scope="module")
def server():
    srv = RemoteServer()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ref_model():
    return LLaDAReferenceLM.from_pretrained(CHECKPOINT, torch.float32)


def post(server, path, body, **kw):
    return requests.post(server.url + path, json={"model": MODEL, **body}, timeout=300, **kw)


def stream_chunks(server, path, body):
    """The data chunks of a streamed response, parsed."""
    with post(server, path, {**body, "stream": True}, stream=True) as resp:
        assert resp.status_code == 200, resp.text
        chunks = []
        for line in resp.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def expected_tokens(ref_model, prompt_ids, xargs, mask_id, max_tokens, temperature=0.0, seed=0, server_lock=True):
    """What the sampler must produce: the plain-torch reference, with or without SureLock."""
    keys = {"gen_length", "steps", "block_length", "remasking", "confidence_threshold"}
    options = DiffusionOptions.resolve({k: v for k, v in xargs.items() if k in keys}, max_tokens=max_tokens, temperature=temperature)
    lock = SureLockOptions(enabled=server_lock).resolve(xargs)
    if lock.enabled:
        return reference_generate_surelock(ref_model, prompt_ids, options, lock, mask_id, seed).tokens
    return reference_generate(ref_model, prompt_ids, options, mask_id, seed)


def test_completion_and_chat(server, ref_model, tokenizer, mask_id):
    xargs = {"steps": 16, "block_length": 8}
    resp = post(server, "/v1/completions", {"prompt": "Hello there", "max_tokens": 32, "temperature": 0,
                                            "ignore_eos": True, "return_token_ids": True, "vllm_xargs": xargs})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    choice = body["choices"][0]
    prompt_ids = tokenizer("Hello there")["input_ids"]
    assert choice["prompt_token_ids"] == prompt_ids
    assert choice["token_ids"] == expected_tokens(ref_model, prompt_ids, xargs, mask_id, 32)
    assert body["usage"] == {**body["usage"], "prompt_tokens": len(prompt_ids), "completion_tokens": 32,
                             "total_tokens": len(prompt_ids) + 32}
    assert body["kv_transfer_params"]["surelock"]["steps"] == 16  # --plugin surelock: locking on

    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                 "temperature": 0, "return_token_ids": True})
    assert chat.status_code == 200, chat.text
    choice = chat.json()["choices"][0]
    prompt_ids = chat_prompt_ids(tokenizer, "Hi")
    assert chat.json()["prompt_token_ids"] == prompt_ids
    # no max_tokens: the served default generation length, 128 (LLaDA's chat default)
    full = expected_tokens(ref_model, prompt_ids, {}, mask_id, 128)
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")}
    cut = next((i + 1 for i, t in enumerate(full) if t in stops), len(full))
    assert choice["token_ids"] == full[:cut]
    assert chat.json()["usage"]["completion_tokens"] == cut


def test_a_request_without_temperature_is_greedy(server):
    """LLaDA's chat and generate default to temperature 0; vLLM's default is 1.0."""
    body = {"prompt": "Tell me about locks", "max_tokens": 32, "seed": 5, "ignore_eos": True,
            "return_token_ids": True, "vllm_xargs": {"steps": 16, "block_length": 8}}
    omitted = post(server, "/v1/completions", body).json()["choices"][0]["token_ids"]
    greedy = post(server, "/v1/completions", {**body, "temperature": 0}).json()["choices"][0]["token_ids"]
    hot = post(server, "/v1/completions", {**body, "temperature": 1.0}).json()["choices"][0]["token_ids"]
    assert omitted == greedy
    assert hot != greedy  # an explicit temperature still wins


def test_stream_equals_non_stream_equals_offline(server, tokenizer):
    body = {"prompt": "Write a story about a lock", "max_tokens": 64, "temperature": 0.8, "seed": 1234,
            "ignore_eos": True, "return_token_ids": True,
            "vllm_xargs": {"steps": 32, "block_length": 16, "surelock_eps": 0.01, "kv_cache": "prefix"}}
    whole = post(server, "/v1/completions", body).json()["choices"][0]
    chunks = stream_chunks(server, "/v1/completions", body)
    streamed_ids = [t for c in chunks for t in (c["choices"][0].get("token_ids") or [])]
    streamed_text = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed_ids == whole["token_ids"]
    assert streamed_text == whole["text"]
    # text arrives block by block (4 blocks of 16), not all at the end
    sizes = [len(c["choices"][0].get("token_ids") or []) for c in chunks]
    assert [s for s in sizes if s] == [16, 16, 16, 16]

    chat = {"messages": [{"role": "user", "content": "Name three colours"}], "max_tokens": 32,
            "temperature": 0.5, "seed": 7, "vllm_xargs": {"steps": 32, "block_length": 8}}
    chat_whole = post(server, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    chat_stream = "".join(c["choices"][0]["delta"].get("content") or "" for c in stream_chunks(server, "/v1/chat/completions", chat))
    assert chat_stream == chat_whole

    # offline LLM.generate with the same settings (SureLock on, as --plugin surelock sets it)
    from vllm import SamplingParams

    llm = make_llm(additional_config={"surelock": {"enabled": True}})
    try:
        out = llm.generate(
            ["Write a story about a lock"],
            SamplingParams(max_tokens=64, temperature=0.8, seed=1234, ignore_eos=True,
                           extra_args={"steps": 32, "block_length": 16, "surelock_eps": 0.01, "kv_cache": "prefix"}),
            use_tqdm=False,
        )[0]
        assert list(out.outputs[0].token_ids) == whole["token_ids"]
        assert out.outputs[0].text == whole["text"]
        chat_out = llm.chat([[{"role": "user", "content": "Name three colours"}]],
                            SamplingParams(max_tokens=32, temperature=0.5, seed=7,
                                           extra_args={"steps": 32, "block_length": 8}), use_tqdm=False)[0]
        assert chat_out.outputs[0].text == chat_whole
    finally:
        shutdown_llm(llm)


def test_64_concurrent_requests(server, ref_model, tokenizer, mask_id):
    jobs = []
    for i in range(64):
        gen = (16, 24, 32)[i % 3]
        xargs = {"steps": gen // 2, "block_length": gen // 2 if i % 2 else gen}
        if i % 4 == 1:
            xargs["surelock"] = False
        elif i % 4 == 2:
            xargs["surelock_eps"] = (5e-4, 5e-3, 5e-2)[i % 3]
        if i % 5 == 0:
            xargs["remasking"] = "random"
        elif i % 6 == 1:  # streamed (i % 3 == 1): blocks sent as they end, at different steps
            xargs["confidence_threshold"] = 0.65  # fewer steps
        temperature = 0.7 if i % 3 == 0 else 0.0
        jobs.append(dict(prompt=f"Question {i}: what is {i} + {i}?", max_tokens=gen, temperature=temperature,
                         seed=i, ignore_eos=True, return_token_ids=True, vllm_xargs=xargs, stream=i % 3 == 1))

    def send(job):
        if job["stream"]:
            chunks = stream_chunks(server, "/v1/completions", {k: v for k, v in job.items() if k != "stream"})
            return [t for c in chunks for t in (c["choices"][0].get("token_ids") or [])]
        resp = post(server, "/v1/completions", {k: v for k, v in job.items() if k != "stream"})
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["token_ids"]

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(send, jobs))
    assert len(results) == 64
    for job, got in zip(jobs, results):
        prompt_ids = tokenizer(job["prompt"])["input_ids"]
        want = expected_tokens(ref_model, prompt_ids, job["vllm_xargs"], mask_id, job["max_tokens"],
                               job["temperature"], job["seed"])
        assert got == want, job


BAD_REQUESTS = [
    ({"vllm_xargs": {"block_length": 7}}, "block_length"),
    ({"vllm_xargs": {"block_length": 8, "steps": 2}}, "steps"),
    ({"vllm_xargs": {"remasking": "top_k"}}, "remasking"),
    ({"vllm_xargs": {"gen_lenght": 32}}, "gen_lenght"),
    ({"vllm_xargs": {"surelock_eps": -0.1}}, "surelock_eps"),
    ({"vllm_xargs": {"surelock_confidence_gate": 2.0}}, "surelock_confidence_gate"),
    ({"vllm_xargs": {"confidence_threshold": 1.5}}, "confidence_threshold"),
    ({"vllm_xargs": {"confidence_threshold": 0.9, "remasking": "random"}}, "confidence_threshold"),
    ({"top_p": 0.9, "temperature": 0.7}, "top_p"),  # (at the default temperature 0 vLLM drops top_p itself)
    ({"logprobs": 2}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"min_tokens": 4}, "min_tokens"),
    ({"vllm_xargs": {"kv_cache": "triple"}}, "kv_cache"),
    ({"vllm_xargs": {"kv_cache": "dual", "cfg_scale": 1.0}}, "kv_cache"),
    ({"vllm_xargs": {"gen_length": 1100}}, "gen_length"),  # canvas beyond the context
    ({"prompt": "x" * 1100}, None),  # prompt longer than the context
]


@pytest.mark.parametrize("bad,param", BAD_REQUESTS, ids=[p or "prompt_too_long" for _, p in BAD_REQUESTS])
def test_bad_request_gets_400_and_server_keeps_serving(server, bad, param):
    body = {"prompt": "Hello", "max_tokens": 32, **bad}
    resp = post(server, "/v1/completions", body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    if param is None:
        assert "context length" in error["message"] or "maximum" in error["message"]
    else:
        assert error["param"] == param and f"'{param}'" in error["message"]
    good = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 16, "vllm_xargs": {"steps": 8}})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] <= 16


def test_disconnect_mid_stream_frees_kv_blocks(server):
    def kv_usage():
        return next(v for k, v in server.metrics().items() if k.startswith("vllm:kv_cache_usage_perc"))

    # idle value after a completed request
    assert post(server, "/v1/completions", {"prompt": "warm", "max_tokens": 16}).status_code == 200
    idle = kv_usage()
    body = {"model": MODEL, "prompt": "A very long story", "max_tokens": 512, "stream": True, "ignore_eos": True,
            "vllm_xargs": {"steps": 512, "block_length": 32, "surelock": False}}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=300) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith(b"data: "))
        assert json.loads(first[6:])["choices"][0]["text"] is not None  # mid-generation: one block of 16 is out
        busy = kv_usage()
    # the connection is closed: the server aborts the request and frees its blocks
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and kv_usage() != idle:
        time.sleep(0.5)
    assert busy > idle
    assert kv_usage() == idle
    running = next(v for k, v in server.metrics().items() if k.startswith("vllm:num_requests_running"))
    assert running == 0


def test_surelock_metrics_on_metrics_endpoint(server):
    before = server.metrics()
    resp = post(server, "/v1/completions", {"prompt": "Count", "max_tokens": 64, "ignore_eos": True,
                                            "vllm_xargs": {"steps": 64, "block_length": 16, "surelock_eps": 0.05,
                                                           "confidence_threshold": 0.65, "kv_cache": "dual"}})
    stats = resp.json()["kv_transfer_params"]["surelock"]
    after = server.metrics()
    assert after["surelock_requests_total"] == before.get("surelock_requests_total", 0) + 1
    # steps taken (fewer, with the threshold) next to the fixed schedule's
    assert stats["steps"] < stats["steps_fixed"] == 64
    assert after["surelock_steps_total"] - before.get("surelock_steps_total", 0) == stats["steps"]
    assert after["surelock_steps_fixed_total"] - before.get("surelock_steps_fixed_total", 0) == 64
    assert after["surelock_rows_computed_total"] - before.get("surelock_rows_computed_total", 0) == stats["rows"]
    assert after["surelock_rows_nolock_total"] - before.get("surelock_rows_nolock_total", 0) == stats["rows_nolock"]
    # the dual block cache's frozen rows are not counted as computed
    assert stats["rows"] < stats["rows_nolock"]
    saved = stats["dense_flops_nolock"] + stats["attention_flops_nolock"] - stats["dense_flops"] - stats["attention_flops"]
    assert after["surelock_flops_saved_total"] - before.get("surelock_flops_saved_total", 0) == pytest.approx(saved)
    assert 0 < after["surelock_locked_row_fraction"] < 1
    assert any(k.startswith("vllm:") for k in after)  # next to vLLM's own
