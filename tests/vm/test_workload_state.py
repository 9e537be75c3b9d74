"""The workload as a vCPU: `run_until` with a gate that pauses or stops it, and its state captured mid-run,
carried as msgpack with the driver's state, and continued by a rebuilt driver and workload: every in-flight
command completes exactly once, nothing is resubmitted, everything still verifies."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest

from nvme_lm.host.driver import NvmeDriver
from nvme_lm.spec.commands import unpack_cqe_from
from nvme_lm.spec.registers import Reg
from nvme_lm.vm.timeline import Timeline
from nvme_lm.vm.workload import VcpuStopped, Workload, WorkloadConfig

BS = 4096


@pytest.fixture
def ioq(driver):
    driver.set_number_of_queues(1, 1)
    return driver.create_io_queue(1, 64)


def make(ioq, mem, ns, *, qd: int = 8, nblocks: int = 256, timeline: Timeline | None = None, **kw) -> Workload:
    cfg = WorkloadConfig(nsid=ns.nsid, lba_size=ns.lba_size, block_size=BS, nblocks=nblocks, qd=qd, seed=5, **kw)
    return Workload(ioq, mem, cfg, timeline=timeline)


def wire(obj):
    """What crossing a process boundary does to plain data."""
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False)


def completion_posted(qp) -> bool:
    """A CQE the host has not reaped yet is waiting at the CQ head (read from guest memory)."""
    *_, sf = unpack_cqe_from(qp.cq, qp.cq_head * 16)
    return sf & 1 == qp.phase


def stop_after(n: int):
    """A gate that lets the vCPU through `n` times, then stops it where it stands."""
    calls = [0]

    def gate() -> None:
        calls[0] += 1
        if calls[0] > n:
            raise VcpuStopped

    return gate


# ============================================================================ pause and stop
def test_a_blocking_gate_pauses_submission_and_completion_counting(ioq, mem, ns1):
    w = make(ioq, mem, ns1, pattern="randrw", timeout=0.3)
    w.prefill()
    paused, at_gate, resume, stop = threading.Event(), threading.Event(), threading.Event(), threading.Event()

    def gate() -> None:
        if paused.is_set():
            at_gate.set()
            resume.wait()

    result: list = []
    vcpu = threading.Thread(target=lambda: result.append(w.run_until(stop, gate=gate)))
    vcpu.start()
    time.sleep(0.1)
    paused.set()
    w.wake()
    assert at_gate.wait(2.0)
    ios, submitted = w.stats.ios, w.stats.submitted
    assert w.inflight > 0
    time.sleep(0.5)  # longer than the workload's timeout: a pause is not a hang
    assert (w.stats.ios, w.stats.submitted) == (ios, submitted)  # the guest is frozen...
    assert completion_posted(ioq.qp)  # ...while the device completed what it had been given
    paused.clear()
    resume.set()
    time.sleep(0.1)
    stop.set()
    vcpu.join(5.0)
    s = result[0]
    assert s is w.stats and s.ios > ios and s.fatal is None and s.timeouts == 0
    assert s.errors == 0 and s.verify_failure_count == 0
    assert s.submitted == s.ios and w.inflight == 0  # drained
    assert w.verify_all().verify_failure_count == 0


def test_vcpu_stopped_leaves_commands_outstanding_and_state_captures_them(ioq, mem, ns1, driver):
    w = make(ioq, mem, ns1)
    with pytest.raises(VcpuStopped):
        w.run_until(threading.Event(), gate=stop_after(20))
    assert w.inflight > 0
    qp = ioq.qp
    assert len(qp.outstanding) == w.inflight  # not drained, not forgotten
    st = w.state()
    assert sorted(s[0] for s in st["slots"]) == sorted(qp.tags.values())
    assert len(st["slots"]) + len(st["free"]) == 8
    io = driver.state()["io"][0]
    assert sorted(tag for _cid, tag, _cleanup in io["outstanding"]) == sorted(s[0] for s in st["slots"])
    assert w.stats.submitted == w.stats.ios + w.inflight
    # the same workload can carry on where it stopped (a rollback: the VM resumes at the source)
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    s = w.run_until(stop)
    assert s.submitted == s.ios and s.errors == 0 and s.verify_failure_count == 0


def test_a_hang_ends_the_run_with_a_timeout_not_a_crash(ioq, mem, ns1, driver):
    w = make(ioq, mem, ns1, timeout=0.3)
    calls = [0]

    def gate() -> None:
        calls[0] += 1
        if calls[0] == 5:
            driver.fn.bar0.write32(Reg.CC, 0)  # the controller drops everything outstanding

    t = time.monotonic()
    s = w.run_until(threading.Event(), gate=gate)
    assert time.monotonic() - t < 3.0
    assert s.timeouts == 1 and s.fatal is not None and "timeout" in s.fatal
    assert w.inflight > 0


# ============================================================================ state and restore
@pytest.mark.parametrize("pattern", ["trim", "write"])
def test_state_restore_continues_with_every_in_flight_command_completed_once(ssd, mem, ns1, driver, ioq, pattern):
    t0 = time.monotonic_ns()
    tl = Timeline(t0)
    w = make(ioq, mem, ns1, qd=16, pattern=pattern, timeline=tl)
    w.prefill(0.5)
    with pytest.raises(VcpuStopped):
        w.run_until(threading.Event(), gate=stop_after(40))
    inflight = w.inflight
    assert inflight > 0
    before = w.stats.ios
    stream = (w._bblocks[w._pos :], w._bkinds[w._pos :])

    wst, dst, tst = wire(w.state()), wire(driver.state()), wire(tl.state())
    time.sleep(0.02)  # the device finishes what was fetched; its CQEs wait in guest memory
    g = NvmeDriver.restore(ssd.pf, mem, dst)  # the same device and memory stand in for the destination
    tl2 = Timeline.restore(tst)
    w2 = Workload.restore(g.io_queues[1], mem, wst, timeline=tl2)
    g.bind(lambda qid, tag: w2.callback_for(tag))
    assert (w2._bblocks[w2._pos :], w2._bkinds[w2._pos :]) == stream  # the op stream continues where it was
    assert w2.inflight == inflight and w2.stats.ios == before

    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    s = w2.run_until(stop)
    assert s.fatal is None and s.timeouts == 0 and s.errors == 0 and s.verify_failure_count == 0
    assert s.ios > before + inflight
    assert s.submitted == s.ios  # each command completed exactly once: none lost, none resubmitted
    assert g.io_queues[1].qp.spurious == 0 and g.spurious_completions == 0
    assert tl2.completions == s.ios  # the timeline moved with the workload and kept counting
    sweep = w2.verify_all()
    assert sweep.verify_failure_count == 0 and sweep.verified_blocks == 256
    w2.close()


def test_state_is_plain_versioned_data(ioq, mem, ns1):
    w = make(ioq, mem, ns1, pattern="randrw", hot_set=0.5)
    with pytest.raises(VcpuStopped):
        w.run_until(threading.Event(), gate=stop_after(10))
    ios = w.stats.ios
    assert ios > 0
    st = w.state()
    assert st["v"] == 2 and "generations" not in st  # per-block bookkeeping is in guest memory, at st["book"]
    assert isinstance(st["book"], int) and mem.base <= st["book"] < mem.base + mem.size
    back = wire(st)
    assert back == st | {"unknown": list(st["unknown"])}
    assert st["qid"] == 1  # which queue it drives: the VM restores it on the same one
    with pytest.raises(ValueError, match="version"):
        Workload.restore(ioq, mem, st | {"v": 99})
    with pytest.raises(ValueError, match="queue 2"):
        Workload.restore(ioq, mem, st | {"qid": 2})
    w2 = Workload.restore(ioq, mem, back)
    assert w2.cfg == w.cfg and w2._bufs == w._bufs  # buffers are not reallocated: they are in guest memory
    assert w2._book == w._book and w2.generations.tolist() == w.generations.tolist()
    assert w2.stats.ios == ios and w2.inflight == w.inflight


def test_bookkeeping_writes_are_cpu_writes_in_the_dirty_log(ioq, mem, ns1):
    """The expected generation of every block is guest data: a pre-copy must resend what completions change."""
    w = make(ioq, mem, ns1, pattern="randwrite", nblocks=4096)
    book_first = (w._book - mem.base) // mem.page_size
    book_pages = set(range(book_first, book_first + -(-9 * 4096 // mem.page_size)))
    mem.log_dirty = True
    mem.take_dirty()
    w.run(ios=200)
    dirty = set(mem.take_dirty().tolist())
    written = {b for b in range(4096) if w.generations[b]}
    assert written
    want = {book_first + (8 * b) // mem.page_size for b in written}  # each written block's generation page
    want |= {book_first + (8 * 4096 + b) // mem.page_size for b in written}  # and its trim-map page
    assert want <= dirty and want <= book_pages
    mem.log_dirty = False
    w.close()
