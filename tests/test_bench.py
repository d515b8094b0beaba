"""`surelock-bench` end to end through the vLLM plugin, on the tiny checkpoint and one small cell."""

from __future__ import annotations

import json

import pytest

from conftest import CHECKPOINT
from surelock_vllm import bench


@pytest.mark.engine
def test_benchmark_cell_with_thresholds_passes_its_correctness_gate(tmp_path, monkeypatch):
    # the CLI binds the worker to every core for its own process; undo that after the test
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    out = tmp_path / "bench"
    # exit 0: eps=0 == no-lock, every run == its plain-torch reference (threshold runs included)
    assert bench.main(["--model", str(CHECKPOINT), "--gen-lengths", "32", "--batch-sizes", "2", "--eps", "5e-3",
                       "--thresholds", "0.6", "--threshold-eps", "5e-3", "--block-length", "16",
                       "--repeats", "2", "--out-dir", str(out), "--no-plots"]) == 0
    cell = json.loads((out / "bench.json").read_text())["cells"][0]
    # the reference is timed once per repeat, side by side with the engine's runs; its time is their median
    by_repeat = cell["reference"]["s_per_request_by_repeat"]
    assert len(by_repeat) == 2 and all(t > 0 for t in by_repeat)
    assert cell["reference"]["s_per_request"] == pytest.approx(sum(by_repeat) / 2)
    assert all(len(run["wall_s"]) == (1 if label == "eps=0" else 2) for label, run in cell["runs"].items())
    runs = cell["runs"]
    assert list(runs) == ["no-lock", "eps=0", "eps=0.005", "thr=0.6 no-lock", "thr=0.6 eps=0.005"]
    assert runs["no-lock"]["steps"] == runs["no-lock"]["steps_fixed"] == 2 * 32
    for label in ("thr=0.6 no-lock", "thr=0.6 eps=0.005"):
        assert runs[label]["steps"] < runs[label]["steps_fixed"]  # fewer steps than the fixed schedule
        assert runs[label]["flops_speedup"] > 1  # LM head included, against fixed-step no-lock
    # SureLock on top of the threshold computes fewer rows than the threshold alone
    assert runs["thr=0.6 eps=0.005"]["rows"] < runs["thr=0.6 no-lock"]["rows"]
    # each repeat's speedups, paired with that repeat's no-lock run and reference timing
    lock = runs["eps=0.005"]
    assert lock["speedup_vs_nolock_by_repeat"] == pytest.approx(
        [n / w for n, w in zip(runs["no-lock"]["wall_s"], lock["wall_s"])])
    assert lock["speedup_vs_reference_by_repeat"] == pytest.approx(
        [ref * 2 / w for ref, w in zip(by_repeat, lock["wall_s"])])
    assert len(runs["eps=0"]["speedup_vs_nolock_by_repeat"]) == 1
    table = (out / "bench.md").read_text()
    assert "| thr=0.6 eps=0.005 |" in table and "| steps |" in table
    paired = " ".join(f"{x:.2f}" for x in lock["speedup_vs_nolock_by_repeat"])
    assert f"- eps=0.005: {paired};" in table


def test_gate_message_names_the_eps0_control_only_where_it_ran():
    full = bench.gate_passed_message(None, control_ran=True)
    assert full.startswith("correctness gate passed: SureLock eps=0 == no-lock, SureLock == plain-torch")
    assert "(cells up to batch 8)" in bench.gate_passed_message(8, control_ran=True)
    # --control-max-batch below every cell: no cell ran the control, so the gate does not claim it
    none = bench.gate_passed_message(0, control_ran=False)
    assert "eps=0" not in none and "SureLock == plain-torch SureLock reference" in none
