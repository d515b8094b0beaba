"""`surelock-eval` end to end through the vLLM plugin, on the tiny checkpoint and a few problems."""

from __future__ import annotations

import json

import pytest

from conftest import CHECKPOINT
from surelock_vllm import evaluate
from surelock_vllm.tasks import TASKS


@pytest.mark.engine
def test_evaluation_writes_table_json_and_plots(tmp_path, monkeypatch):
    # the CLI binds the worker to every core for its own process; undo that after the test
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(CHECKPOINT), "--per-task", "2", "--eps", "5e-3", "0.5",
                          "--repeats", "1", "--gen-length", "32", "--steps", "32", "--block-length", "16",
                          "--rule-eps", "5e-3", "--thresholds", "0.6", "--out-dir", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["problems"] == 2 * len(TASKS)
    labels = [r["label"] for r in report["runs"]]
    assert labels == ["no-lock", "eps=0.005", "eps=0.5", "Alg.1 eps=0.005", "eps=0.005 gate 0.2",
                      "Alg.1 eps=0.005 gate 0.2", "no-lock, one block", "paper preset eps=0.005",
                      "thr=0.6 no-lock", "thr=0.6 eps=0.005"]
    runs = dict(zip(labels, report["runs"]))
    nolock, small, large = runs["no-lock"], runs["eps=0.005"], runs["eps=0.5"]
    thr_nolock, thr_lock = runs["thr=0.6 no-lock"], runs["thr=0.6 eps=0.005"]
    # Algorithm 1 locks tokens a step earlier: it computes fewer rows than the default rule
    assert runs["Alg.1 eps=0.005"]["rows"] <= small["rows"]
    assert runs["paper preset eps=0.005"]["rows"] < runs["no-lock, one block"]["rows"]
    assert nolock["agreement_with_nolock"] == 1.0 and nolock["flops_ratio"] == 1.0
    assert nolock["rows"] == nolock["rows_nolock"]
    # locking computes fewer rows, more so with the larger eps
    assert large["rows_ratio"] <= small["rows_ratio"] < 1
    assert 0 < large["flops_ratio"] <= small["flops_ratio"] < 1
    assert set(small["accuracy_per_task"]) == set(TASKS)
    table = (out / "eval.md").read_text()
    assert "| eps=0.5 |" in table and "exact match" in table and "| paper preset eps=0.005 |" in table
    assert (out / "stepwise_flops_ratio.png").stat().st_size > 0
    assert (out / "accuracy_vs_flops.png").stat().st_size > 0
    # the fewer-steps grid: the threshold takes fewer steps than the fixed schedule, and
    # SureLock on top computes fewer rows still; both measured against fixed-step no-lock
    assert nolock["steps"] == nolock["steps_fixed"] and nolock["rows_vs_baseline"] == 1.0
    assert thr_nolock["steps"] < thr_nolock["steps_fixed"] and thr_nolock["steps_per_position"] < 1
    assert thr_lock["rows_vs_baseline"] < thr_nolock["rows_vs_baseline"] < 1
    assert thr_lock["flops_vs_baseline"] < thr_nolock["flops_vs_baseline"] < 1
    assert "## Fewer steps" in table and "| thr=0.6 eps=0.005 |" in table
    assert (out / "accuracy_vs_speedup.png").stat().st_size > 0


def test_default_model_missing_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(evaluate, "DEFAULT_MODEL", tmp_path / "not-trained")
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(tmp_path / "not-trained")])
    assert "make train" in capsys.readouterr().err


def test_stepwise_locked_fraction_averages_the_requests_still_running():
    from surelock_vllm.bench import aggregate

    def stats(fractions):
        return {"rows": 1, "rows_nolock": 2, "dense_flops": 1, "dense_flops_nolock": 2, "attention_flops": 1,
                "attention_flops_nolock": 2, "lm_head_flops": 0, "steps": len(fractions), "steps_fixed": len(fractions),
                "locked_fraction": fractions}

    # a request that stopped after 2 steps (its answer ended in the first block) does not cut the curve short
    total = aggregate([stats([0.0, 0.5]), stats([0.0, 0.3, 0.6, 0.8])])
    assert total["locked_fraction_per_step"] == [0.0, 0.4, 0.6, 0.8]


def test_token_accuracy_counts_positions_and_the_end_of_turn():
    from surelock_vllm.evaluate import token_accuracy

    assert token_accuracy("abcd", "abcd") == 1.0
    assert token_accuracy("abcd", " abcd\n") == 1.0  # read as is_correct reads it
    assert token_accuracy("abcd", "abxd") == 4 / 5
    assert token_accuracy("abcd", "abc") == 3 / 5  # the missing token, and the end of turn too early
    assert token_accuracy("abcd", "abcde") == 4 / 5  # every answer token, but no end of turn after them
    assert token_accuracy("abcd", "") == 0.0


@pytest.mark.engine
def test_long_suite_evaluation_reports_tasks_token_accuracy_and_the_cache_grid(tmp_path, monkeypatch):
    from surelock_vllm.tasks import COUNT_TASKS

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    out = tmp_path / "eval-long"
    # the tiny random checkpoint through the long suite's plumbing, at a short canvas to keep it quick
    assert evaluate.main(["--suite", "count", "--model", str(CHECKPOINT), "--per-task", "1", "--eps", "0.5",
                          "--gen-length", "64", "--rule-eps", "--thresholds", "0.9", "--kv-caches", "dual",
                          "--repeats", "1", "--out-dir", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["suite"] == "count" and report["tasks"] == sorted(COUNT_TASKS)
    assert (report["gen_length"], report["steps"], report["block_length"]) == (64, 64, 32)
    assert report["answer_tokens_mean"] > 64
    for run in report["runs"]:
        assert set(run["accuracy_per_task"]) == set(COUNT_TASKS) == set(run["token_accuracy_per_task"])
        assert 0 <= run["token_accuracy"] <= 1
    # the block cache's grid: fixed steps and the threshold, SureLock off and on
    cached = [r for r in report["runs"] if r["kv_cache"] == "dual"]
    assert {(r["threshold"], r["eps"] is not None) for r in cached} == {(None, False), (None, True), (0.9, False),
                                                                      (0.9, True)}
    # fixed steps with the dual cache: a refresh per block, then the block's rows only
    fixed = next(r for r in cached if r["threshold"] is None and r["eps"] is None)
    assert fixed["rows_vs_baseline"] < 0.75 and fixed["steps"] == report["runs"][0]["steps"]
    table = (out / "eval.md").read_text()
    assert "| by_five |" in table and "dual cache" in table and "Fastest run within 1 point" in table
    assert "token acc." in table and "count suite" in table
    assert "| up | " in table.split("Per task")[1]  # the per-task table
    assert (out / "accuracy_vs_speedup.png").exists()
