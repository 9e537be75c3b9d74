"""Device models: loading and validation, and the speeds the emulator applies (device/media.py).

Timing is measured by the host driver (submit to completion through BAR0, DMA and MSI-X) with
short windows and tolerances wide enough for a loaded 2-core machine. Device internals are
read only to wait for the engine to have fetched commands and to check nothing stale is left.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from nvme_lm.device.model import DeviceModel
from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.host import commands as cmd
from nvme_lm.host.driver import IoQueue, NvmeDriver
from nvme_lm.host.qpair import Completion
from nvme_lm.spec import status as st
from nvme_lm.vm.memory import GuestMemory

LBA = 512
NS_BYTES = 64 << 20
SLOW_US = 150_000.0  # a latency no host overhead can hide: commands stay deferred while we act


# ----------------------------------------------------------------------------- helpers
class Host:
    """An SSD of `model` with its PF driver, a 64 MiB namespace and I/O queue 1."""

    def __init__(self, path, model: DeviceModel, depth: int = 64, queues: int = 1) -> None:
        self.ssd = EmulatedSsd(path, model)
        self.mem = GuestMemory(32 << 20)
        self.ssd.pf.iommu.map(self.mem.base, self.mem.buf)
        self.driver = NvmeDriver(self.ssd.pf, self.mem, timeout=5.0)
        self.driver.start()
        self.nsid = self.driver.create_namespace(NS_BYTES // LBA)
        self.driver.attach_namespace(self.nsid, [0])
        self.driver.set_number_of_queues(queues, queues)
        self.qs: list[IoQueue] = [self.driver.create_io_queue(qid, depth) for qid in range(1, queues + 1)]
        self.q = self.qs[0]

    def read_latencies_us(self, n: int, nbytes: int = 4096) -> list[float]:
        out = []
        for i in range(n):
            t = time.perf_counter()
            self.q.run(cmd.read(self.nsid, (i * 8) % (NS_BYTES // LBA - 8), nbytes // LBA), read=nbytes)
            out.append((time.perf_counter() - t) * 1e6)
        return out

    def submit_reads(self, count: int, done: list[Completion], nbytes: int = 4096) -> None:
        for i in range(count):
            buf = self.mem.alloc(nbytes)
            self.q.submit(cmd.read(self.nsid, i * 8, nbytes // LBA), buf, nbytes, done.append)

    def wait_deferred(self, count: int) -> None:
        """Waits until the engine has fetched `count` commands into the pacer (synchronization only)."""
        media = self.ssd.subsystem.media
        deadline = time.monotonic() + 5
        while media.deferred < count:
            assert time.monotonic() < deadline, "the engine never fetched the commands"
            time.sleep(0.0002)

    def close(self) -> None:
        self.ssd.power_off()


@pytest.fixture
def host_factory(tmp_path) -> Iterator:
    hosts: list[Host] = []

    def make(model: DeviceModel, name: str = "ssd", depth: int = 64, queues: int = 1) -> Host:
        h = Host(tmp_path / name, model, depth, queues)
        hosts.append(h)
        return h

    yield make
    for h in hosts:
        h.close()


def run_qd(h: Host, qd: int, nbytes: int, seconds: float) -> list[float]:
    """Random-ish reads of `nbytes` kept at queue depth `qd` for `seconds`; returns completion times."""
    times: list[float] = []
    errors: list[int] = []
    end = time.perf_counter() + seconds
    bufs = [h.mem.alloc(nbytes) for _ in range(qd)]
    span = NS_BYTES // LBA - nbytes // LBA
    outstanding = [0]

    def submit(i: int) -> None:
        slba = (len(times) * 7919 * (nbytes // LBA)) % span
        outstanding[0] += 1
        h.q.submit(cmd.read(h.nsid, slba, nbytes // LBA), bufs[i], nbytes, lambda c, i=i: on_done(i, c))

    def on_done(i: int, c: Completion) -> None:
        outstanding[0] -= 1
        now = time.perf_counter()
        if not c.ok:
            errors.append(c.status)
        times.append(now)
        if now < end:
            submit(i)

    for i in range(qd):
        submit(i)
    while outstanding[0]:
        h.q.qp.wait_any(5.0)
    assert not errors
    return times


# ----------------------------------------------------------------------------- model files
def test_builtin_models_load_with_distinct_personalities():
    names = DeviceModel.builtin_names()
    assert {"vendor-a", "vendor-b"} <= set(names)
    a, b = DeviceModel.builtin("vendor-a"), DeviceModel.builtin("vendor-b")
    assert (a.name, b.name) == ("vendor-a", "vendor-b")
    assert a.vendor_id != b.vendor_id and a.model_number != b.model_number
    assert (a.max_vfs, b.max_vfs, a.mdts, b.mdts) == (16, 8, 8, 5)
    assert b.read_latency_us > a.read_latency_us > 0 and a.bandwidth_mib_s > b.bandwidth_mib_s > 0


def test_unknown_builtin_names_the_choices():
    with pytest.raises(ValueError, match=r"no built-in device model named 'nope' \(built-in: vendor-a, vendor-b"):
        DeviceModel.builtin("nope")


def test_unknown_keys_are_refused_by_name():
    text = 'name = "x"\nmdts = 5\nturbo_mode = true\nread_latncy_us = 3.0\n'
    with pytest.raises(ValueError, match="unknown device model keys: read_latncy_us, turbo_mode"):
        DeviceModel.from_toml(text)


@pytest.mark.parametrize(("line", "message"), [
    ("read_latency_us = -1.0", r"read_latency_us = -1.0: must be a finite number >= 0"),
    ("write_latency_us = nan", r"write_latency_us = nan: must be a finite number >= 0"),
    ("bandwidth_mib_s = -5", r"bandwidth_mib_s = -5: must be a finite number >= 0"),
    ("mdts = 16", r"mdts = 16: must be in 0\.\.15"),
    ("max_vfs = 128", r"max_vfs = 128: must be in 0\.\.127"),
    ("max_vfs = -1", r"max_vfs = -1: must be in 0\.\.127"),
    ('mdts = "big"', r"mdts = 'big': must be an integer"),
    ("vendor_id = 0x10000", r"vendor_id = 65536: must be in 0\.\.65535"),
    ("lba_data_sizes = [512, 1000]", r"lba_data_sizes = \(512, 1000\): must list 1\.\.16 powers of two"),
    ('firmware_revision = "TOO-LONG-FW"', r"firmware_revision = 'TOO-LONG-FW': must be an ASCII string"),
])
def test_bad_values_are_refused_with_the_key_named(line: str, message: str):
    with pytest.raises(ValueError, match=r"device model 'bad': " + message):
        DeviceModel.from_toml(f'name = "bad"\n{line}\n')


def test_models_at_the_limits_load():
    m = DeviceModel(mdts=15, max_vfs=127, read_latency_us=0.0, bandwidth_mib_s=0)
    assert (m.mdts, m.max_vfs) == (15, 127)


# ----------------------------------------------------------------------------- latency
def test_zero_speed_model_has_no_pacer(host_factory):
    h = host_factory(DeviceModel())
    assert h.ssd.subsystem.media is None  # the fast path: completions are never deferred
    assert len(h.read_latencies_us(5)) == 5


def test_qd1_read_latency_follows_the_model(host_factory):
    a = host_factory(DeviceModel.builtin("vendor-a"), "a")
    b = host_factory(DeviceModel.builtin("vendor-b"), "b")
    la: list[float] = []
    lb: list[float] = []
    for _ in range(20):  # interleaved, so a load spike on the machine hits both models alike
        la += a.read_latencies_us(16)
        lb += b.read_latencies_us(16)
    model_a, model_b = a.ssd.model.read_latency_us, b.ssd.model.read_latency_us
    assert min(la) >= model_a  # a command is never faster than the media
    assert min(lb) >= model_b
    # Scheduling noise only ever adds time, so the fastest samples show the path's floor: emulator
    # overhead plus the media latency. They must differ by (most of) the models' difference. (The
    # minimum, not a low percentile: on a loaded 2-core machine even the 10th percentile can be noise.)
    gap = float(min(lb) - min(la))
    assert gap >= 0.5 * (model_b - model_a), f"vendor-b only {gap:.0f} µs slower than vendor-a"


def test_commands_overlap_at_queue_depth(host_factory):
    """Eight 20 ms reads in flight at once complete in about 20 ms, not 160 ms."""
    h = host_factory(DeviceModel(read_latency_us=20_000.0))
    done: list[Completion] = []
    t = time.perf_counter()
    h.submit_reads(8, done)
    while len(done) < 8:
        h.q.qp.wait_any(5.0)
    elapsed = time.perf_counter() - t
    assert all(c.ok for c in done)
    assert 0.020 <= elapsed < 0.080


# ----------------------------------------------------------------------------- bandwidth
def test_bandwidth_converges_at_qd16(host_factory):
    """At 25 MiB/s sixteen 128 KiB reads keep the media busy 80 ms ahead of the host, so the emulator
    being descheduled for less than that on a loaded machine costs no media time."""
    model = DeviceModel(read_latency_us=100.0, bandwidth_mib_s=25.0)
    h = host_factory(model)
    nbytes = 128 << 10
    times = run_qd(h, 16, nbytes, 0.6)
    assert len(times) >= 80
    # skip the first completions (the queue filling), then bytes over time between completions
    steady = times[16:]
    mib_s = (len(steady) - 1) * nbytes / (steady[-1] - steady[0]) / (1 << 20)
    assert mib_s == pytest.approx(model.bandwidth_mib_s, rel=0.15)


def test_bandwidth_bounds_qd1_large_transfers(host_factory):
    """At QD1 a 128 KiB read at 50 MiB/s takes its transfer time (2.5 ms), more than its latency."""
    h = host_factory(DeviceModel(read_latency_us=100.0, bandwidth_mib_s=50.0))
    lat = h.read_latencies_us(10, 128 << 10)
    assert min(lat) >= 2500.0


# ----------------------------------------------------------------------------- deferred vs queue life
@pytest.mark.parametrize("how", ["cc-en", "flr"])
def test_reset_with_deferred_commands_leaves_no_stale_completions(host_factory, how: str):
    h = host_factory(DeviceModel(read_latency_us=SLOW_US), depth=32)
    old: list[Completion] = []
    h.submit_reads(8, old)
    h.wait_deferred(8)
    if how == "flr":
        h.ssd.pf.flr()
    h.driver.start()  # CC.EN 1 -> 0 (or after the FLR), new admin queue, enable
    h.driver.set_number_of_queues(1, 1)
    q = h.driver.create_io_queue(1, 32)  # same QID, new rings
    time.sleep(SLOW_US * 1e-6 + 0.05)  # every deferred completion of the old queue is due by now
    assert q.qp.reap() == 0  # nothing reached the new CQ
    assert old == []  # nor the old one
    assert h.ssd.subsystem.media.outstanding() == 0  # they were dropped, not kept
    c, _ = q.run(cmd.read(h.nsid, 0, 8), read=4096)  # the new queue works, CIDs from 0 again
    assert c.ok


def test_sq_deletion_aborts_deferred_commands(host_factory):
    h = host_factory(DeviceModel(read_latency_us=SLOW_US), depth=32)
    done: list[Completion] = []
    h.submit_reads(5, done)
    h.wait_deferred(5)
    h.driver.admin(cmd.delete_io_sq(1))
    # the aborted CQEs were posted to the I/O CQ before the Delete I/O SQ completion
    assert h.q.qp.reap() == 5
    assert [c.st for c in done] == [st.ABORTED_SQ_DELETION] * 5
    assert sorted(c.cid for c in done) == list(range(5))
    assert h.ssd.subsystem.media.outstanding() == 0
    cq = bytes(h.q.qp.cq)
    h.driver.admin(cmd.delete_io_cq(1))
    time.sleep(SLOW_US * 1e-6 + 0.05)
    assert bytes(h.q.qp.cq) == cq  # nothing more was written when their media time came


def test_sq_deletion_keeps_other_queues_commands(host_factory):
    """Only the deleted SQ's commands are aborted; another SQ's complete normally when due."""
    h = host_factory(DeviceModel(read_latency_us=50_000.0), depth=32, queues=2)
    q1, q2 = h.qs
    d1: list[Completion] = []
    d2: list[Completion] = []
    for i in range(3):
        q1.submit(cmd.read(h.nsid, i * 8, 8), h.mem.alloc(4096), 4096, d1.append)
        q2.submit(cmd.read(h.nsid, i * 8, 8), h.mem.alloc(4096), 4096, d2.append)
    h.wait_deferred(6)
    h.driver.admin(cmd.delete_io_sq(1))
    q1.qp.reap()
    assert [c.st for c in d1] == [st.ABORTED_SQ_DELETION] * 3
    while len(d2) < 3:
        q2.qp.wait_any(5.0)
    assert all(c.ok for c in d2)


def test_writes_and_flush_are_paced_too(host_factory):
    h = host_factory(DeviceModel(write_latency_us=20_000.0))
    t = time.perf_counter()
    assert h.q.write(h.nsid, 0, bytes(4096), LBA).ok
    assert h.q.run(cmd.flush(h.nsid))[0].ok
    assert time.perf_counter() - t >= 0.040
    assert h.q.read(h.nsid, 0, 8, LBA) == bytes(4096)  # reads are not delayed by a write latency


def test_sq_deletion_racing_the_timer_completes_each_command_once(host_factory):
    """Deleting an SQ while its commands come due: each one gets exactly one CQE, success (the timer
    was first) or aborted (the deletion was first), never both and never none."""
    h = host_factory(DeviceModel(read_latency_us=3_000.0), depth=64)
    d = h.driver
    outcomes: list[int] = []
    for round_ in range(8):
        done: list[Completion] = []
        before = h.ssd.subsystem.media.deferred
        h.submit_reads(40, done)
        h.wait_deferred(before + 40)
        time.sleep(round_ * 0.0004)  # from long before to around the moment they come due
        d.admin(cmd.delete_io_sq(1))
        h.q.qp.reap()
        assert sorted(c.cid for c in done) == list(range(40))
        assert {c.st for c in done} <= {st.SUCCESS, st.ABORTED_SQ_DELETION}
        assert h.ssd.subsystem.media.outstanding() == 0
        outcomes.append(sum(c.ok for c in done))
        d.admin(cmd.delete_io_cq(1))
        old = d.io_queues.pop(1).qp
        d._by_vector[old.vector].remove(old)
        old.release()
        h.q = d.create_io_queue(1, 64)
    assert min(outcomes) < 40  # some deletion found commands still waiting for the media
