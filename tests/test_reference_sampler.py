"""The step-by-step denoiser (used inside vLLM) reproduces the reference sampler.

Both run on the plain-torch model here; the engine tests then hold the vLLM
path to the same reference.
"""

import pytest
import torch

from conftest import CHECKPOINT, PROMPTS, chat_prompt_ids
from surelock_vllm.diffusion.denoiser import CanvasDenoiser
from surelock_vllm.diffusion.options import DiffusionOptions
from surelock_vllm.reference.modeling import LLaDAReferenceLM
from surelock_vllm.reference.sampler import reference_generate


@pytest.fixture(scope="module")
def model():
    return LLaDAReferenceLM.from_pretrained(CHECKPOINT)


def run_denoiser(model, prompt, options, mask_id, seed):
    den = CanvasDenoiser(prompt, options, mask_id, seed)
    out, blocks = [], 0
    while not den.finished:
        logits = model(den.canvas)[den.logit_positions()]
        block = den.step(logits)
        if block is not None:
            out += block
            blocks += 1
    assert blocks == options.num_blocks
    assert den.num_steps_done <= options.steps
    return out


@pytest.mark.parametrize(
    "extra,temperature",
    [
        ({"gen_length": 32, "steps": 32, "block_length": 8}, 0.0),
        ({"gen_length": 32, "steps": 8, "block_length": 16}, 0.0),
        ({"gen_length": 24, "steps": 6, "block_length": 24}, 0.0),
        ({"gen_length": 32, "steps": 16, "block_length": 8}, 0.8),
        ({"gen_length": 32, "steps": 16, "block_length": 8, "remasking": "random"}, 0.5),
        # confidence-threshold decoding: blocks end early; with few steps, steps bound it
        ({"gen_length": 32, "steps": 32, "block_length": 8, "confidence_threshold": 0.65}, 0.0),
        ({"gen_length": 32, "steps": 4, "block_length": 16, "confidence_threshold": 0.9}, 0.7),
    ],
)
def test_denoiser_matches_reference(model, tokenizer, mask_id, extra, temperature):
    options = DiffusionOptions.resolve(extra, max_tokens=None, temperature=temperature)
    for i, text in enumerate(PROMPTS[:3]):
        prompt = chat_prompt_ids(tokenizer, text)
        ref = reference_generate(model, prompt, options, mask_id, seed=i)
        assert run_denoiser(model, prompt, options, mask_id, seed=i) == ref
        assert len(ref) == options.gen_length


def test_every_position_is_unmasked_once(model, tokenizer, mask_id):
    options = DiffusionOptions.resolve({"steps": 8, "block_length": 16}, max_tokens=32, temperature=0.0)
    den = CanvasDenoiser(chat_prompt_ids(tokenizer, "Hi"), options, mask_id, 0)
    masked_before = int((den.canvas == mask_id).sum())
    unmasked_per_step = []
    while not den.finished:
        before = int((den.canvas == mask_id).sum())
        den.step(model(den.canvas)[den.logit_positions()])
        unmasked_per_step.append(before - int((den.canvas == mask_id).sum()))
    assert masked_before == 32
    assert unmasked_per_step == [4] * 8  # 16 per block over 4 steps


def test_threshold_unmasks_every_sure_position_and_stays_within_steps(model, tokenizer, mask_id):
    """Fast-dLLM's rule: every masked position of the block at least `threshold` confident
    (at least one); `steps` is an upper bound per block."""
    prompt = chat_prompt_ids(tokenizer, "Hi")
    for threshold, steps in ((0.65, 32), (0.99, 32), (0.99, 8), (0.01, 32)):
        options = DiffusionOptions.resolve(
            {"steps": steps, "block_length": 16, "confidence_threshold": threshold}, max_tokens=32, temperature=0.0)
        den = CanvasDenoiser(prompt, options, mask_id, 0)
        while not den.finished:
            start, end = den.block_bounds()
            logits = model(den.canvas)[den.logit_positions()]
            confidence = torch.softmax(logits.float(), -1).max(-1).values
            sure = int((confidence >= threshold).sum())
            masked = int(den.masked[start:end].sum())
            steps_left = options.steps_per_block - den.step_in_block
            den.step(logits)
            unmasked = masked - int(den.masked[start:end].sum())
            assert unmasked == max(sure, -(-masked // steps_left), 1)
        assert den.num_steps_done <= steps
        if threshold == 0.01:  # everything is sure: one step per block
            assert den.num_steps_done == options.num_blocks


def test_sampling_is_seeded(model, tokenizer, mask_id):
    options = DiffusionOptions.resolve({"steps": 16}, max_tokens=32, temperature=1.0)
    prompt = chat_prompt_ids(tokenizer, "Hi")
    a = reference_generate(model, prompt, options, mask_id, seed=1)
    b = reference_generate(model, prompt, options, mask_id, seed=1)
    c = reference_generate(model, prompt, options, mask_id, seed=2)
    assert a == b and a != c
