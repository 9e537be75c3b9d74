"""The pure parts of the migration engine: range merging, page runs, the convergence policy."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from hypothesis import given
from hypothesis import strategies as s

from nvme_lm.hypervisor.policy import ConvergencePolicy
from nvme_lm.hypervisor.precopy import merge_ranges, page_runs, split_ranges


def covered(ranges: list[tuple[int, int]]) -> set[int]:
    return {lba for slba, n in ranges for lba in range(slba, slba + n)}


@given(s.lists(s.tuples(s.integers(0, 500), s.integers(1, 40)), max_size=40))
def test_merge_ranges_covers_the_same_blocks_without_overlap(ranges):
    merged = merge_ranges(ranges)
    assert covered(merged) == covered(ranges)
    for (a, n), (b, _) in pairwise(merged):
        assert a + n < b  # sorted, disjoint and not even touching
    assert sum(n for _, n in merged) == len(covered(ranges))


def test_merge_ranges_joins_touching_and_nested_ranges():
    assert merge_ranges([(10, 5), (0, 10), (3, 2), (20, 1)]) == [(0, 15), (20, 1)]
    assert merge_ranges([]) == []


@given(s.sets(s.integers(0, 300), max_size=80))
def test_page_runs_are_the_contiguous_runs(pages):
    arr = np.array(sorted(pages), dtype=np.int64)
    runs = page_runs(arr)
    assert sorted(p for f, n in runs for p in range(f, f + n)) == sorted(pages)
    for (a, n), (b, _) in pairwise(runs):
        assert a + n < b


def test_split_ranges_respects_the_limit():
    assert split_ranges([(0, 10), (100, 3)], 4) == [(0, 4), (4, 4), (8, 2), (100, 3)]


def test_policy_switches_when_the_rest_fits_the_target_or_the_budget_is_spent():
    p = ConvergencePolicy(downtime_target_ms=50, max_passes=5)
    rate = 100 << 20  # 100 MiB/s
    assert p.switch_now(1, 4 << 20, rate)[0]  # 40 ms of data left
    go, why = p.switch_now(1, 10 << 20, rate)  # 100 ms left
    assert not go and "100.0 ms" in why
    assert p.switch_now(4, 10 << 20, rate)[0]  # last pass allowed
    assert not p.switch_now(1, 1, 0.0)[0]  # nothing measured yet: no basis to switch
    assert p.switch_now(1, 0, 0.0)[0]  # nothing left
