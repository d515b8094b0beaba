"""The GPU benchmark's logic, on CPU at a tiny shape."""

import json

from surelock_vllm.bench_rows import main, rows_per_step


def test_rows_per_step_replays_and_rescales_a_schedule():
    schedule = [0.0, 0.5, 0.5, 0.75]  # 4 steps of some run
    rows = rows_per_step(schedule, canvas=100, steps=8)
    assert rows[0] == 100  # nothing is locked before the first step
    assert rows == sorted(rows, reverse=True)  # locks are permanent
    assert rows == [100, 100, 100, 50, 50, 50, 50, 25]  # each step sees the locks of the one before
    assert len(rows) == 8


def test_bench_runs_at_tiny_shape(tmp_path):
    report = {"cells": [{"gen_length": 64, "runs": {
        "no-lock": {"eps": None, "locked_fraction_per_step": [0.0] * 64},
        "eps=0.005": {"eps": 0.005, "locked_fraction_per_step": [min(0.9, i / 64) for i in range(64)]},
    }}]}
    sched = tmp_path / "bench.json"
    sched.write_text(json.dumps(report))
    out = tmp_path / "rows.json"
    assert main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--gen-lengths", "32",
                 "--schedule", str(sched), "--out", str(out)]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["steps"] == 32 and result["canvas"] == 96
    assert 0.3 < result["rows_ratio"] < 1.0
    assert result["flops_ratio"] < 1.0 and result["full_s"] > 0 and result["surelock_s"] > 0
