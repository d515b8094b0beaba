"""Row padding of a step (engine/rows.py): which row counts the model runs at, and what padding rows carry."""

from __future__ import annotations

import pytest
import torch

from surelock_vllm.engine.rows import PAD_SLOT_ID, RecentRowCounts, pad_rows


def test_a_count_that_repeats_is_never_padded():
    counts = RecentRowCounts(max_padding=1 / 16)
    assert [counts(2387) for _ in range(5)] == [2387] * 5


def test_a_close_smaller_count_reuses_the_smallest_recent_count_that_fits():
    counts = RecentRowCounts(max_padding=1 / 16)
    assert counts(2000) == 2000
    assert counts(1000) == 1000
    assert counts(1010) == 1010  # 1000 is smaller than 1010: never padded down
    assert counts(990) == 1000  # 1000 and 1010 fit; the smaller wins
    assert counts(1900) == 2000  # within 1/16 of 1900 (at most 2018)
    assert counts(1800) == 1800  # 2000 is more than 1/16 above 1800


def test_padding_stays_within_its_bound_and_never_drops_rows():
    counts = RecentRowCounts(max_padding=1 / 16)
    gen = torch.Generator().manual_seed(0)
    for n in torch.randint(1, 3000, (2000,), generator=gen).tolist():
        padded = counts(n)
        assert n <= padded <= n + n // 16


def test_only_the_last_capacity_counts_are_reused():
    counts = RecentRowCounts(max_padding=0.5, capacity=2)
    counts(100)
    counts(300)
    counts(500)  # 100 falls out of the two most recent
    assert counts(280) == 300  # still recent
    assert counts(90) == 90


def test_a_declining_run_of_counts_reuses_few_distinct_counts():
    # SureLock's row count shrinks step by step as rows lock: most steps
    # should run at a count some earlier step already used.
    counts = RecentRowCounts(max_padding=1 / 16)
    run = [counts(n) for n in range(2400, 300, -9)]
    assert len(set(run)) < len(run) / 5


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_padding"):
        RecentRowCounts(max_padding=-0.1)
    with pytest.raises(ValueError, match="capacity"):
        RecentRowCounts(max_padding=0.1, capacity=0)


def test_pad_rows_appends_rows_that_write_no_kv():
    ids, pos, slots = torch.tensor([5, 6, 7]), torch.tensor([3, 4, 9]), torch.tensor([35, 36, 41])
    p_ids, p_pos, p_slots = pad_rows(ids, pos, slots, 5)
    assert p_ids.tolist() == [5, 6, 7, 0, 0]
    assert p_pos.tolist() == [3, 4, 9, 0, 0]
    assert p_slots.tolist() == [35, 36, 41, PAD_SLOT_ID, PAD_SLOT_ID]
    assert pad_rows(ids, pos, slots, 3)[0] is ids
    with pytest.raises(ValueError, match="cannot pad 3 rows to 2"):
        pad_rows(ids, pos, slots, 2)


def test_the_cpu_runner_pads_and_the_shared_runner_does_not():
    from surelock_vllm.engine.runner import DiffusionRunnerMixin
    from surelock_vllm.engine.worker_cpu import DiffusionCPUModelRunner

    assert DiffusionRunnerMixin.row_count_padding == 0
    assert 0 < DiffusionCPUModelRunner.row_count_padding <= 1 / 8
