"""Workload patterns in fio's vocabulary: each does what its name says, trims read back as zeroes, every
kind of bad block is caught with a reason that names it, and a rate cap holds without spinning."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from nvme_lm.vm.timeline import Timeline
from nvme_lm.vm.workload import HEADER_SIZE, Workload, WorkloadConfig, fill_block, trim_op_for

BS = 4096


@pytest.fixture
def ioq(driver):
    driver.set_number_of_queues(1, 1)
    return driver.create_io_queue(1, 64)


def make(ioq, mem, ns, *, qd: int = 4, nblocks: int = 64, **kw) -> Workload:
    cfg = WorkloadConfig(nsid=ns.nsid, lba_size=ns.lba_size, block_size=BS, nblocks=nblocks, qd=qd, seed=11, **kw)
    return Workload(ioq, mem, cfg)


def media(ns, lba: int) -> bytes:
    return os.pread(ns.fd, BS, lba * ns.lba_size)


def gens(w: Workload) -> np.ndarray:
    return np.frombuffer(w.generations, dtype=np.uint64).copy()


# ============================================================================ patterns
def test_randread_only_reads_and_randwrite_only_writes(ioq, mem, ns1):
    with make(ioq, mem, ns1, pattern="randread", read_fraction=0.0) as w:  # rwmixread is ignored by randread
        s = w.run(ios=400)
        assert (s.reads, s.writes, s.trims) == (400, 0, 0)
        assert s.verified_reads == 400 and s.verify_failure_count == 0  # never-written blocks read as zeroes
    with make(ioq, mem, ns1, pattern="randwrite", read_fraction=1.0) as w:
        s = w.run(ios=400)
        assert (s.reads, s.writes, s.trims) == (0, 400, 0)
        assert int(gens(w).sum()) == 400 and s.errors == 0


def test_randrw_follows_rwmixread(ioq, mem, ns1):
    with make(ioq, mem, ns1, nblocks=256, pattern="randrw", read_fraction=0.7) as w:
        s = w.run(ios=2000)
        assert s.ios == 2000 and s.errors == 0 and s.verify_failure_count == 0
        assert 0.64 <= s.reads / s.ios <= 0.76
        assert s.submitted == s.ios


def test_write_is_sequential_and_wraps(ioq, mem, ns1):
    with make(ioq, mem, ns1, nblocks=64, pattern="write") as w:
        w.run(ios=40)
        g = gens(w)
        assert g[:40].tolist() == [1] * 40 and not g[40:].any()  # the first 40 blocks, in order
        w.run(ios=34)  # 74 in all: the region once, then 10 more from its start
        g = gens(w)
        assert g[:10].tolist() == [2] * 10 and g[10:].tolist() == [1] * 54
        assert w.verify_all().verify_failure_count == 0


def test_hot_set_concentrates_random_io(ioq, mem, ns1):
    with make(ioq, mem, ns1, nblocks=1000, pattern="randwrite", hot_set=0.1, hot_share=0.9) as w:
        w.run(ios=3000)
        g = gens(w)
        share = g[:100].sum() / g.sum()  # writes per block = generation: the hot set is the first 10 %
        assert 0.85 <= share <= 0.94
        assert g[100:].any()  # the cold 90 % still gets some


def test_trim_mix_counts_and_zeroes(ioq, mem, ns1):
    with make(ioq, mem, ns1, nblocks=128, pattern="trim", read_fraction=0.5, trim_fraction=0.5) as w:
        w.prefill()
        before = gens(w)
        s = w.run(ios=2000)
        assert s.errors == 0 and s.verify_failure_count == 0
        assert 0.44 <= s.reads / s.ios <= 0.56
        assert 0.19 <= s.trims / s.ios <= 0.31 and 0.19 <= s.writes / s.ios <= 0.31
        after = gens(w)
        assert (after >= before).all()  # a trim never moves a generation back
        zeroed = [b for b in range(128) if w.zeroed[b]]
        assert zeroed
        for b in zeroed[:5]:
            assert media(ns1, w.lba_of(b)) == bytes(BS)  # deallocated blocks read as zeroes (DLFEAT 09h)
        sweep = w.verify_all()
        assert sweep.verified_blocks == 128 and sweep.verify_failure_count == 0
        # a trimmed block written again continues at generation + 1
        b = zeroed[0]
        g = w.generations[b]
        while w.zeroed[b]:
            w.run(ios=200)
        assert w.generations[b] > g
        assert w.verify_all().verify_failure_count == 0


def test_trim_with_write_zeroes_deac(ioq, mem, ns1, driver):
    from nvme_lm.spec.identify import IdentifyController

    oncs = IdentifyController.decode(driver.identify(1)).oncs
    assert trim_op_for(oncs) in ("dsm", "write_zeroes")
    assert trim_op_for(1 << 3) == "write_zeroes" and trim_op_for(1 << 2 | 1 << 3) == "dsm"
    with pytest.raises(ValueError):
        trim_op_for(0)
    with make(ioq, mem, ns1, pattern="trim", trim_op="write_zeroes", trim_fraction=1.0) as w:
        w.prefill()
        s = w.run(ios=600)
        assert s.trims > 100 and s.writes == 0 and s.errors == 0 and s.verify_failure_count == 0
        assert w.verify_all().verify_failure_count == 0


# ============================================================================ corruption behind the workload's back
def test_every_kind_of_bad_block_is_caught_with_its_reason(ioq, mem, ns1):
    with make(ioq, mem, ns1, nblocks=32, pattern="trim", trim_fraction=0.5) as w:
        w.prefill()
        while sum(w.zeroed) < 2 or int(gens(w).max()) < 2:
            w.run(ios=64)
        trimmed = [b for b in range(32) if w.zeroed[b]]
        rewritten = [b for b in range(32) if w.generations[b] >= 2 and not w.zeroed[b] and b not in trimmed]
        t1, t2, stale = trimmed[0], trimmed[1], rewritten[0]
        others = [b for b in range(32) if b not in (t1, t2, stale) and not w.zeroed[b]]
        misdirected, flipped = others[0], others[1]
        pool = memoryview(os.urandom(1 << 16))

        def put(block: int, data: bytes | bytearray) -> None:
            os.pwrite(ns1.fd, data, w.lba_of(block) * ns1.lba_size)

        old = bytearray(BS)
        fill_block(memoryview(old), w.lba_of(stale), w.generations[stale] - 1, pool)
        put(stale, old)  # a lost write: the previous generation is back
        put(misdirected, media(ns1, w.lba_of(others[2])))  # another block's data
        data = bytearray(media(ns1, w.lba_of(flipped)))
        data[HEADER_SIZE + 7] ^= 0x10
        put(flipped, data)  # one bit of the payload
        put(t1, b"\x01" + bytes(BS - 1))  # garbage where a deallocated block must read zeroes
        lost = bytearray(BS)
        fill_block(memoryview(lost), w.lba_of(t2), w.generations[t2], pool)
        put(t2, lost)  # the trim never happened: the last generation is still there

        sweep = w.verify_all()
        reasons = {f.lba: f.reason for f in sweep.verify_failures}
        assert set(reasons) == {w.lba_of(b) for b in (stale, misdirected, flipped, t1, t2)}
        assert "stale" in reasons[w.lba_of(stale)]
        assert "header LBA" in reasons[w.lba_of(misdirected)]
        assert "CRC-32" in reasons[w.lba_of(flipped)]
        assert "non-zero after trim" in reasons[w.lba_of(t1)]
        assert "deallocate lost" in reasons[w.lba_of(t2)]
        assert {f.lba for f in sweep.verify_failures if f.expected_zero} == {w.lba_of(t1), w.lba_of(t2)}
        assert w.stats.verify_failure_count == 5  # sweeps count into the workload's cumulative stats


def test_a_bad_block_is_caught_by_the_random_reads_too(ioq, mem, ns1):
    with make(ioq, mem, ns1, nblocks=16, pattern="randread") as w:
        w.prefill()
        off = w.lba_of(3) * ns1.lba_size + 2000
        os.pwrite(ns1.fd, bytes([os.pread(ns1.fd, 1, off)[0] ^ 1]), off)
        s = w.run(ios=300)
        assert s.verify_failure_count > 0
        assert {f.lba for f in s.verify_failures} == {w.lba_of(3)}
        assert "CRC-32" in s.verify_failures[0].reason


# ============================================================================ prefill and sweep in large commands
def test_partial_prefill_uses_large_commands(ioq, mem, ns1):
    with make(ioq, mem, ns1, nblocks=1000) as w:
        before = ioq.qp.sq_tail
        s = w.prefill(0.25)
        assert s.writes == 250 and s.errors == 0
        assert (ioq.qp.sq_tail - before) % ioq.qp.depth == 8  # 250 blocks in 128 KiB (32-block) commands
        g = gens(w)
        assert g[:250].tolist() == [1] * 250 and not g[250:].any()
        sweep = w.verify_all()
        assert sweep.verified_blocks == 1000 and sweep.verify_failure_count == 0
        assert w.stats.verified_blocks == 1000


# ============================================================================ rate cap
def test_rate_iops_holds_without_spinning(ioq, mem, ns1):
    tl = Timeline(time.monotonic_ns())
    with make(ioq, mem, ns1, nblocks=256, qd=8, rate_iops=400) as w:
        w.timeline = tl
        stop = threading.Event()
        timer = threading.Timer(0.6, stop.set)
        wall, cpu = time.monotonic(), time.thread_time()
        timer.start()
        s = w.run_until(stop)
        wall, cpu = time.monotonic() - wall, time.thread_time() - cpu
        assert s.errors == 0 and s.fatal is None
        assert 0.5 * 400 * wall <= s.ios <= 1.1 * 400 * wall + 4  # loose below: a loaded 2-core CI machine
        assert cpu < 0.4 * wall  # paced by timed waits, not a busy loop
        per_bin = tl.summary()["iops"][1:-1]  # 10 ms bins: 4 I/Os each at 400 IOPS
        assert max(per_bin) <= 1200  # smooth: no bin carries more than 3x the rate


def test_config_is_checked():
    for bad in ({"pattern": "randtrim"}, {"hot_set": 0.0}, {"hot_set": 1.5}, {"hot_share": 2.0},
                {"trim_op": "unmap"}, {"rate_iops": -1}, {"trim_fraction": 1.5}, {"max_transfer": 512}):
        with pytest.raises(ValueError):
            WorkloadConfig(nsid=1, lba_size=512, **bad)


def test_a_slow_rate_idles_longer_than_the_timeout_without_a_false_hang(ioq, mem, ns1):
    with make(ioq, mem, ns1, rate_iops=5, timeout=0.1) as w:
        stop = threading.Event()
        threading.Timer(0.65, stop.set).start()
        s = w.run_until(stop)  # 200 ms between I/Os, twice the timeout, with nothing in flight
        assert s.fatal is None and s.timeouts == 0
        assert 3 <= s.ios <= 5
