"""The guest timeline: bins, completion gaps across all queues, HDR percentiles, many recording threads at
once, and a state that crosses a process boundary (the switchover gap spans the two sides)."""

from __future__ import annotations

import threading

import msgpack
import numpy as np
import pytest

from nvme_lm.vm import timeline as timeline_mod
from nvme_lm.vm.timeline import Timeline

MS = 1_000_000
T0 = 10_000 * MS  # any monotonic origin


def wire(obj):
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False)


def test_bins_count_mean_and_max():
    tl = Timeline(T0, bin_ns=10 * MS)
    for i in range(100):  # 1 completion every 0.1 ms for 10 ms, latencies 100..199 µs
        tl.record(T0 + i * MS // 10, (100 + i) * 1000)
    tl.record(T0 + 25 * MS, 2_000_000)  # one slow completion in bin 2
    s = tl.summary()
    assert s["bin_s"] == 0.01
    assert s["iops"] == [10000.0, 0.0, 100.0]
    assert s["lat_mean_us"][0] == pytest.approx(149.5)
    assert s["lat_max_us"] == [199.0, 0.0, 2000.0]
    assert tl.completions == 101
    before = Timeline(T0)
    before.record(T0 - 5 * MS, 1000)  # before t0: counted in bin 0
    assert before.summary()["iops"] == [100.0]


def test_gaps_are_between_completions_on_any_queue():
    tl = Timeline(T0, gap_ns=1 * MS)
    times = [0.0, 0.5, 1.0, 4.0, 4.2, 4.4, 12.0, 12.5]  # ms: gaps 1->4 (3 ms) and 4.4->12 (7.6 ms)
    for t in times:
        tl.record(T0 + int(t * MS), 50_000)
    assert tl.gaps() == [(T0 + 1 * MS, T0 + 4 * MS), (T0 + int(4.4 * MS), T0 + 12 * MS)]
    assert tl.longest_gap() == (int(7.6 * MS), T0 + int(4.4 * MS), T0 + 12 * MS)
    assert tl.longest_gap(T0, T0 + 3 * MS)[0] == 3 * MS  # only the gaps overlapping the window
    assert tl.longest_gap(T0 + 5 * MS, T0 + 6 * MS)[0] == int(7.6 * MS)  # a window inside a gap
    assert tl.longest_gap(T0 + 13 * MS, None) == (0, 0, 0)
    # another queue's completion inside a gap splits it: the guest was not blacked out
    tl2 = Timeline(T0, gap_ns=1 * MS)
    for t in (0.0, 3.0, 1.5):  # recorded out of order, as racing vCPU threads may
        tl2.record(T0 + int(t * MS), 1000)
    assert tl2.gaps() == [(T0, T0 + int(1.5 * MS)), (T0 + int(1.5 * MS), T0 + 3 * MS)]


def test_percentiles_from_the_hdr_histogram():
    tl = Timeline(T0)
    assert tl.percentiles_us() == {"p50": 0.0, "p99": 0.0, "p99.9": 0.0, "max": 0.0}
    rng = np.random.default_rng(3)
    lat = rng.lognormal(np.log(80_000), 0.6, 50_000).astype(np.int64)
    lat[-1] = 150_000_000_000  # 150 s: beyond the histogram's range, clamped there, exact in max
    for i, v in enumerate(lat.tolist()):
        tl.record(T0 + i * 1000, v)
    p = tl.percentiles_us()
    exact = np.percentile(lat, [50, 99, 99.9]) / 1000
    for key, want in zip(("p50", "p99", "p99.9"), exact, strict=True):
        assert p[key] == pytest.approx(want, rel=0.005, abs=1.0)  # 3 significant digits, µs units
    assert p["max"] == 150_000_000.0
    assert tl.histogram.get_total_count() == 50_000


def test_recording_threads_lose_nothing(monkeypatch):
    monkeypatch.setattr(timeline_mod, "_FOLD_AT_2", 2 * 1000)  # recorders fold while others record
    tl = Timeline(T0, gap_ns=10 * MS)
    n, threads = 20_000, 4

    def vcpu(q: int) -> None:
        for i in range(n):
            tl.record(T0 + (i * threads + q) * 1000, 10_000 + q)

    ts = [threading.Thread(target=vcpu, args=(q,)) for q in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert tl.completions == n * threads
    assert sum(tl.summary()["iops"]) * 0.01 == pytest.approx(n * threads)
    assert tl.histogram.get_total_count() == n * threads
    assert tl.gaps() == []  # interleaved queues: never 10 ms without a completion


def test_state_round_trip_and_the_switchover_gap():
    src = Timeline(T0, bin_ns=5 * MS, gap_ns=1 * MS)
    for i in range(200):
        src.record(T0 + i * 50_000, 40_000 + i)  # 10 ms of completions at the source
    last = T0 + 199 * 50_000
    st = wire(src.state())
    assert st["v"] == 1
    dst = Timeline.restore(st)
    assert dst.summary() == src.summary() and dst.percentiles_us() == src.percentiles_us()
    assert dst.completions == 200 and dst.last_ns == last
    resume = last + 37 * MS  # the VM was paused, moved, resumed
    for i in range(100):
        dst.record(resume + i * 50_000, 45_000)
    assert dst.longest_gap(last - MS, resume + MS) == (37 * MS, last, resume)
    assert dst.completions == 300
    with pytest.raises(ValueError, match="version"):
        Timeline.restore(st | {"v": 2})
    empty = Timeline.restore(wire(Timeline(T0).state()))
    assert empty.summary()["iops"] == [] and empty.longest_gap() == (0, 0, 0)
