"""The verified workload engine: block headers on the media, and every kind of bad block caught."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest

from nvme_lm.vm.latency import LatencyRecorder
from nvme_lm.vm.workload import HEADER, HEADER_SIZE, Workload, WorkloadConfig, check_block, fill_block

BS = 4096


@pytest.fixture
def ioq(driver):
    driver.set_number_of_queues(1, 1)
    return driver.create_io_queue(1, 64)


def make(ioq, mem, ns, *, qd: int = 4, nblocks: int = 64, read_fraction: float = 0.5, **kw) -> Workload:
    cfg = WorkloadConfig(nsid=ns.nsid, lba_size=ns.lba_size, block_size=BS, nblocks=nblocks, qd=qd,
                         read_fraction=read_fraction, seed=7, **kw)
    return Workload(ioq, mem, cfg)


def media(ns, lba: int) -> bytes:
    """What is on the namespace file (the device's media) at `lba`, one workload block."""
    return os.pread(ns.fd, BS, lba * ns.lba_size)


def test_fill_and_check_block_roundtrip():
    pool = memoryview(os.urandom(1 << 16))
    buf = bytearray(BS)
    fill_block(memoryview(buf), 80, 3, pool)
    lba, gen, crc = HEADER.unpack_from(buf, 0)
    assert (lba, gen) == (80, 3)
    assert crc == zlib.crc32(buf[HEADER_SIZE:])
    assert check_block(memoryview(buf), 80, 3) is None
    assert "header LBA" in check_block(memoryview(buf), 88, 3)
    assert "stale" in check_block(memoryview(buf), 80, 4)
    assert check_block(memoryview(bytearray(BS)), 80, 0) is None  # never written: zeroes
    assert "not zero" in check_block(memoryview(buf), 80, 0)
    other = bytearray(BS)
    fill_block(memoryview(other), 80, 4, pool)
    assert other[HEADER_SIZE:] != buf[HEADER_SIZE:]  # every generation writes different data


def test_prefill_writes_a_header_on_every_block(ioq, mem, ns1):
    with make(ioq, mem, ns1) as w:
        stats = w.prefill()
        assert stats.writes == 64 and stats.errors == 0
        for block in (0, 17, 63):
            data = media(ns1, w.lba_of(block))
            lba, gen, crc = struct.unpack_from("<QQI", data)
            assert lba == w.lba_of(block) == block * (BS // ns1.lba_size)
            assert gen == 1
            assert crc == zlib.crc32(data[HEADER_SIZE:])


@pytest.mark.parametrize("qd", [1, 16])
def test_random_workload_verifies_clean(ioq, mem, ns1, qd):
    with make(ioq, mem, ns1, qd=qd) as w:
        stats = w.run(ios=1500)
        assert stats.ios == 1500
        assert stats.reads > 0 and stats.writes > 0
        assert stats.errors == 0 and stats.verify_failures == []
        assert len(stats.read_latency) == stats.reads and len(stats.write_latency) == stats.writes
        assert stats.iops > 0
        sweep = w.verify_all()
        assert sweep.reads == 64 and sweep.verify_failures == []
        # the generations the workload tracked are the ones on the media
        for block in range(64):
            gen = w.generations[block]
            data = media(ns1, w.lba_of(block))
            assert check_block(memoryview(data), w.lba_of(block), gen) is None


def test_corrupted_block_on_the_media_is_a_verify_failure(ioq, mem, ns1):
    with make(ioq, mem, ns1) as w:
        w.prefill()
        lba = w.lba_of(5)
        off = lba * ns1.lba_size + 1000
        byte = os.pread(ns1.fd, 1, off)
        os.pwrite(ns1.fd, bytes([byte[0] ^ 0x01]), off)  # one flipped bit, as a bad media cell would
        stats = w.verify_all()
        assert [f.lba for f in stats.verify_failures] == [lba]
        assert "CRC-32" in stats.verify_failures[0].reason


def test_stale_and_misdirected_blocks_are_verify_failures(ioq, mem, ns1):
    with make(ioq, mem, ns1, read_fraction=0.0) as w:
        w.prefill()
        old = media(ns1, w.lba_of(7))
        while w.generations[7] < 2:  # random writes until block 7 was rewritten
            w.run(ios=64)
        os.pwrite(ns1.fd, old, w.lba_of(7) * ns1.lba_size)  # a lost write: the old block is back
        os.pwrite(ns1.fd, media(ns1, w.lba_of(3)), w.lba_of(4) * ns1.lba_size)  # block 3's data at block 4
        stats = w.verify_all()
        reasons = {f.lba: f.reason for f in stats.verify_failures}
        assert set(reasons) == {w.lba_of(7), w.lba_of(4)}
        assert "stale" in reasons[w.lba_of(7)]
        assert "header LBA" in reasons[w.lba_of(4)]


def test_unwritten_blocks_must_read_as_zero(ioq, mem, ns1):
    with make(ioq, mem, ns1) as w:
        assert w.verify_all().verify_failures == []  # a fresh namespace reads as zeroes
        os.pwrite(ns1.fd, b"\xff", w.lba_of(9) * ns1.lba_size + 4000)
        failures = w.verify_all().verify_failures
        assert [f.lba for f in failures] == [w.lba_of(9)]
        assert failures[0].expected_generation == 0


def test_failed_commands_are_counted_not_verified(ioq, mem, ns1):
    # a region that runs past the end of the namespace: those commands fail with LBA Out of Range
    nblocks = ns1.nsze * ns1.lba_size // BS
    cfg = WorkloadConfig(nsid=ns1.nsid, lba_size=ns1.lba_size, first_lba=ns1.nsze - 8 * (BS // ns1.lba_size),
                         nblocks=16, qd=2, seed=1)
    assert nblocks > 16
    with Workload(ioq, mem, cfg) as w:
        stats = w.run(ios=200)
        assert stats.errors > 0 and sum(stats.error_statuses.values()) == stats.errors
        assert stats.verify_failures == []


def test_config_is_checked():
    with pytest.raises(ValueError):
        WorkloadConfig(nsid=1, lba_size=512, block_size=1000)
    with pytest.raises(ValueError):
        WorkloadConfig(nsid=1, lba_size=512, nblocks=10, qd=8)  # a block would be in flight twice


def test_latency_recorder_percentiles():
    rec = LatencyRecorder()
    for ns in range(1, 1001):
        rec.record(ns * 1000)  # 1..1000 µs
    p = rec.percentiles_us()
    assert set(p) == {"p50", "p90", "p99", "p99.9"}
    assert p["p50"] == pytest.approx(500.5)
    assert p["p99"] == pytest.approx(990.01)
    s = rec.summary_us()
    assert s["count"] == 1000 and s["min"] == 1.0 and s["max"] == 1000.0
    assert np.array_equal(rec.values[:3], [1000, 2000, 3000])
    empty = LatencyRecorder().percentiles_us()
    assert all(v != v for v in empty.values())  # NaN without samples
