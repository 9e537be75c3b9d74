"""The pure parts of the migration engine: range merging, page runs, the convergence policy."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as s

from nvme_lm.hypervisor.policy import ConvergencePolicy, PassFigures, make_policy
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


MIB = 1 << 20


def figures(pass_no=1, remaining=10 * MIB, copy=100 * MIB, lba=0.0, ram=0.0, elapsed=1.0, limit=None,
            ram_rest=0, reads=None):
    return PassFigures(pass_no, remaining, float(copy), float(lba), float(ram), elapsed, limit, ram_rest, reads)


def test_predictive_policy_switches_when_the_rest_fits_the_target_or_the_budget_is_spent():
    p = ConvergencePolicy(downtime_target_ms=50, max_passes=5)
    assert p.decide(figures(remaining=2 * MIB)).switch  # 20 ms of data + 25 ms of switchover at 100 MiB/s
    assert not p.decide(figures(remaining=3 * MIB)).switch  # 30 + 25 ms: over the target
    assert not p.decide(figures(pass_no=0, remaining=1 * MIB)).switch  # pass 0's rate says nothing of the rest
    d = p.decide(figures(remaining=10 * MIB, lba=10 * MIB))  # 100 ms left, shrinking: go on
    assert not d.switch and not d.give_up and "125 ms" in d.why  # 100 ms of data + the switchover
    assert ConvergencePolicy(50, 5).decide(figures(pass_no=4, remaining=10 * MIB)).switch  # last pass
    assert not ConvergencePolicy(50, 5, throttle=False).decide(figures(remaining=1, copy=0)).switch  # no rate yet
    assert ConvergencePolicy(50, 5).decide(figures(remaining=0, copy=0)).switch  # nothing left


def test_predictive_policy_throttles_writes_just_enough_and_keeps_a_limit_that_works():
    p = ConvergencePolicy(downtime_target_ms=50, max_passes=20)
    d = p.decide(figures(remaining=60 * MIB, copy=100 * MIB, lba=80 * MIB, ram=10 * MIB))
    assert d.write_limit_mib_s == 40  # half the copy rate minus what RAM dirties: each pass halves the rest
    d = p.decide(figures(remaining=30 * MIB, copy=100 * MIB, lba=35 * MIB, ram=10 * MIB, limit=40))
    assert d.write_limit_mib_s == 40 and not d.switch  # converging under the limit: keep it
    assert ConvergencePolicy(50, 20, throttle=False).decide(
        figures(remaining=60 * MIB, lba=80 * MIB)).write_limit_mib_s is None  # throttling off


def test_predictive_policy_limits_reads_only_when_ram_dma_is_what_is_left():
    kib = 1 << 10
    p = ConvergencePolicy(downtime_target_ms=50, max_passes=20)
    # 6 MiB/s link, writes at 1 MiB/s: 96 KiB of blocks (16 ms) fit the 25 ms room; 256 KiB of read buffers (42 ms)
    # do not
    d = p.decide(figures(remaining=352 * kib, copy=6 * MIB, lba=1 * MIB, ram=4 * MIB, limit=1, ram_rest=256 * kib))
    assert not d.switch and not d.give_up
    assert d.read_limit_mib_s == 2 and "reads limited" in d.why  # half the copy rate, less the writes' 1 MiB/s
    assert d.write_limit_mib_s == 1
    kept = p.decide(figures(remaining=200 * kib, copy=6 * MIB, lba=1 * MIB, limit=1, ram_rest=150 * kib, reads=2))
    assert kept.read_limit_mib_s == 2  # squeezing to the end
    # the namespace's part does not fit yet: reads are left alone (the write limit works on that first)
    d = ConvergencePolicy(50, 20).decide(figures(remaining=512 * kib, copy=6 * MIB, lba=1 * MIB, ram=1 * MIB,
                                                 limit=1, ram_rest=256 * kib))
    assert d.read_limit_mib_s is None
    # RAM's part fits: nothing on reads
    d = ConvergencePolicy(50, 20).decide(figures(remaining=300 * kib, copy=6 * MIB, lba=1 * MIB, limit=1,
                                                 ram_rest=32 * kib))
    assert d.read_limit_mib_s is None
    # no write limit yet: one comes with the read limit (a read limit is the total-bandwidth bucket)
    d = ConvergencePolicy(50, 20).decide(figures(remaining=300 * kib, copy=6 * MIB, lba=512 * kib, ram_rest=256 * kib))
    assert d.read_limit_mib_s == 3 and d.write_limit_mib_s == 1
    assert ConvergencePolicy(50, 20, throttle=False).decide(
        figures(remaining=300 * kib, copy=6 * MIB, ram_rest=256 * kib)).read_limit_mib_s is None


def test_predictive_policy_gives_up_when_ram_alone_outruns_the_copy_or_time_runs_out():
    p = ConvergencePolicy(downtime_target_ms=50, max_passes=50)
    for i in range(5):  # RAM dirtied at the copy rate: no write limit can help, and the rest does not shrink
        d = p.decide(figures(pass_no=i, remaining=60 * MIB, copy=100 * MIB, ram=100 * MIB))
    assert d.give_up and "RAM" in d.why
    late = ConvergencePolicy(50, 50, give_up_s=10).decide(figures(remaining=60 * MIB, lba=10 * MIB, elapsed=11))
    assert late.give_up and "10 s" in late.why


def test_simple_policies_behave_as_their_users_know():
    fixed = make_policy("fixed", downtime_target_ms=50, max_passes=3)
    assert not fixed.decide(figures(pass_no=1, remaining=0)).switch  # even with nothing left it waits
    assert fixed.decide(figures(pass_no=2)).switch
    auto = make_policy("auto-converge", downtime_target_ms=50, max_passes=10)
    first = auto.decide(figures(remaining=60 * MIB, lba=50 * MIB))
    second = auto.decide(figures(remaining=60 * MIB, lba=40 * MIB, limit=first.write_limit_mib_s))
    assert (first.write_limit_mib_s, second.write_limit_mib_s) == (40, 35)  # 20%, then 30% off 50 MiB/s
    lm = make_policy("local-minimum", downtime_target_ms=50, max_passes=10)
    assert not lm.decide(figures(remaining=60 * MIB)).switch
    assert not lm.decide(figures(remaining=40 * MIB)).switch
    assert lm.decide(figures(remaining=45 * MIB)).switch  # the rest grew: that was the minimum
    with pytest.raises(ValueError, match="predictive"):
        make_policy("magic", downtime_target_ms=1, max_passes=1)
