"""`surelock-bench` end to end through the vLLM plugin, on the tiny checkpoint and one small cell."""

from __future__ import annotations

import json

import pytest

from conftest import CHECKPOINT, SHIPPED_MODEL
from surelock_vllm import bench
from surelock_vllm.tasks import is_correct


@pytest.mark.engine
def test_benchmark_cell_with_thresholds_passes_its_correctness_gate(tmp_path, monkeypatch):
    # the CLI binds the worker to every core for its own process; undo that after the test
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    out = tmp_path / "bench"
    # exit 0: eps=0 == no-lock, every run == its plain-torch reference (threshold runs included)
    assert bench.main(["--model", str(CHECKPOINT), "--gen-lengths", "32", "--batch-sizes", "2", "--eps", "5e-3",
                       "--thresholds", "0.6", "--threshold-eps", "5e-3", "--block-length", "16", "--kv-caches", "dual",
                       "--repeats", "2", "--out-dir", str(out), "--no-plots"]) == 0
    cell = json.loads((out / "bench.json").read_text())["cells"][0]
    # the reference is timed once per repeat, side by side with the engine's runs; its time is their median
    by_repeat = cell["reference"]["s_per_request_by_repeat"]
    assert len(by_repeat) == 2 and all(t > 0 for t in by_repeat)
    assert cell["reference"]["s_per_request"] == pytest.approx(sum(by_repeat) / 2)
    assert all(len(run["wall_s"]) == (1 if label == "eps=0" else 2) for label, run in cell["runs"].items())
    runs = cell["runs"]
    dual = ["dual no-lock", "dual eps=0.005", "dual thr=0.6 no-lock", "dual thr=0.6 eps=0.005"]
    assert list(runs) == ["no-lock", "eps=0", "eps=0.005", "thr=0.6 no-lock", "thr=0.6 eps=0.005", *dual]
    # the policy axis: the dual cache computes a refresh per block, then only the block's rows,
    # and passed the gate against plain-torch Fast-dLLM (exit 0), timed against it
    assert runs["dual no-lock"]["rows"] < 0.8 * runs["no-lock"]["rows"]
    assert runs["dual eps=0.005"]["rows"] <= runs["dual no-lock"]["rows"]
    assert all(runs[label]["speedup_vs_same_algorithm_reference"] > 0 for label in dual)
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
    assert "| thr=0.6 eps=0.005 |" in table and "| steps |" in table and "| dual thr=0.6 eps=0.005 |" in table
    paired = " ".join(f"{x:.2f}" for x in lock["speedup_vs_nolock_by_repeat"])
    assert f"- eps=0.005: {paired};" in table
    # random weights: no task to be right on, and the table says so rather than leaving it out
    assert "exact_match" not in lock and "| n/a (random) |" in table


@pytest.mark.engine
def test_trained_model_runs_report_exact_match_computed_from_their_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    out = tmp_path / "bench"
    # the shipped trained model in its trained range (gen 32, block 8), a tiny slice: 3 problems
    assert bench.main(["--model", str(SHIPPED_MODEL), "--gen-lengths", "32", "--batch-sizes", "3", "--eps", "5e-3",
                       "--thresholds", "0.9", "--block-length", "8", "--repeats", "1", "--control-max-batch", "0",
                       "--out-dir", str(out), "--no-plots"]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["trained_suite"] == "short"
    problems = bench.build_problems(3, "short")
    table = (out / "bench.md").read_text()
    assert "| run | exact match |" in table
    for label, run in report["cells"][0]["runs"].items():
        outputs = run["outputs"]
        assert [o["answer"] for o in outputs] == [p.answer for p in problems]
        correct = [is_correct(p, o["output"]) for p, o in zip(problems, outputs)]
        assert [o["correct"] for o in outputs] == correct
        assert run["exact_match"] == sum(correct) / 3
        assert f"| {label} | {run['exact_match']:.0%} |" in table
    # the shipped model answers its held-out problems in its range (not a column of zeros)
    assert report["cells"][0]["runs"]["no-lock"]["exact_match"] > 0


def test_a_trained_run_without_exact_match_is_not_printed():
    run = {"median_s": 1.0}
    with pytest.raises(ValueError, match="exact match"):
        bench.exact_match_cell(run, trained=True)
    assert bench.exact_match_cell({"exact_match": 2 / 3}, trained=True) == "67%"
    assert bench.exact_match_cell(run, trained=False) == "n/a (random)"


def test_trained_suite_comes_from_the_training_log(tmp_path):
    assert bench.trained_suite(str(CHECKPOINT)) is None  # random weights
    assert bench.trained_suite(str(SHIPPED_MODEL)) == "short"  # trained before the long suite existed
    (tmp_path / "training_log.json").write_text(json.dumps({"suite": "long"}))
    assert bench.trained_suite(str(tmp_path)) == "long"


def test_gate_message_names_the_eps0_control_only_where_it_ran():
    full = bench.gate_passed_message(None, control_ran=True)
    assert full.startswith("correctness gate passed: SureLock eps=0 == no-lock, SureLock == plain-torch")
    assert "(cells up to batch 8)" in bench.gate_passed_message(8, control_ran=True)
    # --control-max-batch below every cell: no cell ran the control, so the gate does not claim it
    none = bench.gate_passed_message(0, control_ran=False)
    assert "eps=0" not in none and "SureLock == plain-torch SureLock reference" in none
