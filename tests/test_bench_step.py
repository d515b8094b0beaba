"""`bench_step` (the GPU measurement of the engine's batched step) checked on CPU at a tiny shape.

Its forward computes only the rows a step plans and keeps every request's
canvas K/V, so its tokens must be the plain-torch reference samplers' for the
same model: no-lock LLaDA's loop (full canvas every step), SureLock the
one-request SureLock reference.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from surelock_vllm import bench_step
from surelock_vllm.diffusion.batch import DiffusionBatch
from surelock_vllm.diffusion.flops import ModelShape
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.reference.sampler import reference_generate
from surelock_vllm.reference.surelock import reference_generate_surelock


@pytest.fixture(scope="module")
def model():
    return bench_step.build_model("tiny", None, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("eps", [None, 5e-2])
def test_batched_step_with_row_forward_matches_the_reference_samplers(model, eps):
    mask_id = model.config.mask_token_id
    options = DiffusionOptions.resolve({"steps": 16, "block_length": 8}, max_tokens=16, temperature=0.0)
    lock = SureLockOptions() if eps is None else SureLockOptions(enabled=True, eps=eps)
    # prompts of different lengths: canvases of different lengths in one step (key mask, padded queries)
    prompts = [p[: 4 + 3 * i] for i, p in enumerate(bench_step.random_prompts(3, 10, 262, torch.Generator().manual_seed(1)))]
    forward = bench_step.RowsForward(model, 3, 10 + 16)
    batch = DiffusionBatch(max_requests=3, max_canvas_len=10 + 16, mask_id=mask_id)
    tokens, ledgers = bench_step.denoise(forward, batch, prompts, options, lock, ModelShape.from_config(model.config))
    for i, prompt in enumerate(prompts):
        if eps is None:
            expected = reference_generate(model, prompt, options, mask_id, seed=i)
        else:
            expected = reference_generate_surelock(model, prompt, options, lock, mask_id, seed=i).tokens
        assert tokens[i] == expected
        assert ledgers[i].steps == 16
        if eps is None:
            assert ledgers[i].rows == ledgers[i].rows_nolock == 16 * (len(prompt) + 16)
        else:
            assert ledgers[i].rows < ledgers[i].rows_nolock  # something locked
    assert len(batch) == 0  # every finished request gave its slot back


def test_main_writes_speedups_and_flops_per_batch_size(tmp_path):
    out = tmp_path / "step.json"
    assert bench_step.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--gen-length", "16",
                            "--block-length", "8", "--prompt-length", "6", "--batch-sizes", "1", "2",
                            "--eps", "5e-2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["batch"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        nolock, lock = row["runs"]["no-lock"], row["runs"]["eps=0.05"]
        assert nolock["rows"] == row["batch"] * 16 * (6 + 16)
        assert lock["rows"] < nolock["rows"] and 0 < lock["flops_ratio"] < 1
        assert lock["speedup"] == pytest.approx(nolock["s"] / lock["s"])
        assert lock["efficiency"] == pytest.approx(lock["speedup"] * lock["flops_ratio_with_lm_head"])


def test_forwards_keep_every_tensor_on_the_models_device():
    """The GPU path on CPU: a model on the meta device (shapes only) mixed with any CPU
    tensor fails as a CUDA model would ("not on the expected device")."""
    meta = torch.device("meta")
    model = bench_step.build_model("tiny", None, meta, torch.float32)
    # bench_rows: the reference forward over some rows with its per-layer canvas caches
    caches = model.new_kv_caches(12)
    logits = model.forward_rows(torch.zeros(5, dtype=torch.long, device=meta), torch.arange(7, 12, device=meta), caches)
    assert logits.device == meta and caches[0].keys.device == meta
    # bench_step: a plan of the batched step (built on CPU, its tensors moved) through RowsForward
    batch = DiffusionBatch(max_requests=2, max_canvas_len=12, mask_id=model.config.mask_token_id)
    options = DiffusionOptions.resolve({"steps": 4, "block_length": 4}, max_tokens=4, temperature=0.0)
    slots = [batch.add([1, 2, 3, 4, 5, 6, 7, 8], options, 0), batch.add([1, 2, 3], options, 1)]
    plan = batch.plan(slots)
    moved = {f.name: getattr(plan, f.name).to(meta) for f in dataclasses.fields(plan)
             if isinstance(getattr(plan, f.name), torch.Tensor)}
    hidden = bench_step.RowsForward(model, 2, 12)(dataclasses.replace(plan, **moved), [12, 7])
    assert hidden.device == meta and hidden.shape == (plan.read_rows.shape[0], model.config.d_model)


def test_main_keeps_the_batch_sizes_measured_before_a_failure(tmp_path, monkeypatch):
    """A device run cut short (time limit, out of memory) still leaves the batch sizes it finished."""
    out = tmp_path / "step.json"
    denoise = bench_step.denoise

    def denoise_until_batch_2(forward, batch, prompts, *args, **kwargs):
        if len(prompts) == 2:
            raise torch.cuda.OutOfMemoryError("batch 2")
        return denoise(forward, batch, prompts, *args, **kwargs)

    monkeypatch.setattr(bench_step, "denoise", denoise_until_batch_2)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        bench_step.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--gen-length", "16",
                         "--block-length", "8", "--prompt-length", "6", "--batch-sizes", "1", "2",
                         "--eps", "5e-2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [row["batch"] for row in report["results"]] == [1]
    assert report["shape"] == "tiny" and "bench_step" in report["command"]
