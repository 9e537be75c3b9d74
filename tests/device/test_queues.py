"""I/O queue management and the queue engine as NVMe Base §3.3 and §5 define them: creation and
deletion with every error code, PC=0 queues, phase/wrap rules, SQ head reporting, a full CQ,
round-robin arbitration with burst, per-queue interrupt vectors and doorbell errors."""

from __future__ import annotations

import os
import threading
import time

import pytest

from nvme_lm.device.events import AsyncEvent, AsyncEventType, ErrorEventInfo
from nvme_lm.host import commands as cmd
from nvme_lm.host.qpair import NvmeCommandError
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.opcodes import AdminOpcode
from nvme_lm.spec.registers import CC, CSTS, Reg, cq_head_doorbell, sq_tail_doorbell
from tests.device.rawq import RawCq, RawSq
from tests.device.test_registers import manual_enable, wait_csts

FID_ARBITRATION = 0x01


def _status(driver, sqe: SQE) -> st.Status:
    comp, _ = driver.admin(sqe, check=False)
    return comp.st


@pytest.fixture
def nq(driver):
    """Number of Queues set to 4 SQs / 4 CQs."""
    assert driver.set_number_of_queues(4, 4) == (4, 4)
    return driver


# ----------------------------------------------------------------------------------- creation errors
def test_create_cq_errors(ssd, mem, nq):
    d = nq
    ctrl = ssd.primary
    addr = mem.alloc(64 * 1024)
    mqes = ctrl.cap.mqes
    nvec = ssd.pf.msix.nvectors
    cases = [
        (cmd.create_io_cq(0, 16, addr), st.INVALID_QID),  # the admin queue's id
        (cmd.create_io_cq(5, 16, addr), st.INVALID_QID),  # beyond Number of Queues
        (cmd.create_io_cq(1, 1, addr), st.INVALID_QUEUE_SIZE),  # QSIZE 0h: a one-entry queue
        (cmd.create_io_cq(1, mqes + 2, addr), st.INVALID_QUEUE_SIZE),  # beyond MQES
        (cmd.create_io_cq(1, 0x10000, addr), st.INVALID_QUEUE_SIZE),
        (cmd.create_io_cq(1, 16, addr, vector=nvec), st.INVALID_INTERRUPT_VECTOR),
        (cmd.create_io_cq(1, 16, addr, vector=0xFFFF), st.INVALID_INTERRUPT_VECTOR),
    ]
    for sqe, want in cases:
        assert _status(d, sqe) == want, sqe
    assert set(ctrl.cqs) == {0}
    assert _status(d, cmd.create_io_cq(1, mqes + 1, addr)) == st.SUCCESS  # exactly MQES+1 entries
    assert _status(d, cmd.create_io_cq(1, 16, addr + 16 * 1024)) == st.INVALID_QID  # exists
    # queue memory the device cannot reach, or misaligned, is refused, never created
    assert not _status(d, cmd.create_io_cq(2, 16, 0x7F00_0000_0000)).ok
    assert not _status(d, cmd.create_io_cq(2, 16, addr + 16)).ok
    assert not _status(d, cmd.create_io_cq(2, 16, mem.end - 64)).ok  # runs off the mapping
    assert set(ctrl.cqs) == {0, 1}


def test_create_sq_errors(ssd, mem, nq):
    d = nq
    ctrl = ssd.primary
    addr = mem.alloc(128 * 1024)
    mqes = ctrl.cap.mqes
    d.admin(cmd.create_io_cq(1, 16, addr))
    sq_addr = addr + 64 * 1024
    cases = [
        (cmd.create_io_sq(0, 16, sq_addr, 1), st.INVALID_QID),
        (cmd.create_io_sq(5, 16, sq_addr, 1), st.INVALID_QID),
        (cmd.create_io_sq(1, 1, sq_addr, 1), st.INVALID_QUEUE_SIZE),
        (cmd.create_io_sq(1, mqes + 2, sq_addr, 1), st.INVALID_QUEUE_SIZE),
        (cmd.create_io_sq(1, 16, sq_addr, 0), st.INVALID_CQ),  # CQID 0 is the admin CQ
        (cmd.create_io_sq(1, 16, sq_addr, 2), st.INVALID_CQ),  # no such CQ
        (cmd.create_io_sq(1, 16, sq_addr, 9), st.INVALID_CQ),
    ]
    for sqe, want in cases:
        assert _status(d, sqe) == want, sqe
    assert set(ctrl.sqs) == {0}
    assert _status(d, cmd.create_io_sq(1, 16, sq_addr, 1)) == st.SUCCESS
    assert _status(d, cmd.create_io_sq(1, 16, sq_addr + 4096, 1)) == st.INVALID_QID  # exists
    assert _status(d, cmd.create_io_sq(2, 16, sq_addr + 4096, 1)) == st.SUCCESS  # two SQs, one CQ
    assert not _status(d, cmd.create_io_sq(3, 16, 0x7F00_0000_0000, 1)).ok
    assert set(ctrl.sqs) == {0, 1, 2}


def test_delete_errors(ssd, mem, nq):
    d = nq
    ctrl = ssd.primary
    q = d.create_io_queue(1, 16)
    assert _status(d, cmd.delete_io_sq(0)) == st.INVALID_QID
    assert _status(d, cmd.delete_io_sq(2)) == st.INVALID_QID
    assert _status(d, cmd.delete_io_cq(0)) == st.INVALID_QID
    assert _status(d, cmd.delete_io_cq(2)) == st.INVALID_QID
    assert _status(d, cmd.delete_io_cq(1)) == st.INVALID_QUEUE_DELETION  # SQ 1 still uses it
    assert set(ctrl.cqs) == {0, 1}
    assert _status(d, cmd.delete_io_sq(1)) == st.SUCCESS
    assert _status(d, cmd.delete_io_sq(1)) == st.INVALID_QID
    assert _status(d, cmd.delete_io_cq(1)) == st.SUCCESS
    assert set(ctrl.sqs) == {0} and set(ctrl.cqs) == {0}
    q.qp.release()
    d.io_queues.clear()


def test_queues_need_number_of_queues(ssd, mem, driver):
    addr = mem.alloc(4096)
    assert _status(driver, cmd.create_io_cq(1, 16, addr)) == st.INVALID_QID  # 0 allocated so far
    driver.set_number_of_queues(1, 1)
    assert _status(driver, cmd.create_io_cq(1, 16, addr)) == st.SUCCESS
    assert _status(driver, cmd.set_features(0x07, 3 | 3 << 16)) == st.COMMAND_SEQUENCE_ERROR


@pytest.mark.parametrize("which", ["iosqes", "iocqes"])
def test_entry_sizes_must_be_configured(ssd, mem, which):
    fn = ssd.pf
    cc = CC.make(en=True, iosqes=0 if which == "iosqes" else 6, iocqes=0 if which == "iocqes" else 4)
    sq, cq = manual_enable(fn, mem, cc)
    wait_csts(fn, CSTS.RDY, CSTS.RDY)
    sq.put(cmd.set_features(0x07, 0))
    sq.ring_doorbell()
    assert cq.wait(1)[0].status == 0
    a = mem.alloc(8192)
    sq.put(cmd.create_io_cq(1, 16, a))
    sq.ring_doorbell()
    (e,) = cq.wait(1)
    if which == "iocqes":
        assert e.st == st.INVALID_FIELD
        return
    assert e.status == 0
    sq.put(cmd.create_io_sq(1, 16, a + 4096, 1))
    sq.ring_doorbell()
    assert cq.wait(1)[0].st == st.INVALID_FIELD


def test_cqr_is_off_but_pc0_list_must_be_reachable(ssd, mem, nq):
    assert _status(nq, cmd.create_io_cq(1, 1024, 0x7F00_0000_0000, contiguous=False)) != st.SUCCESS
    lst = mem.alloc(4096)
    mem.view(lst, 16)[:] = (0x7F00_0000_0000).to_bytes(8, "little") * 2  # entries outside memory
    assert _status(nq, cmd.create_io_cq(1, 512, lst, contiguous=False)) != st.SUCCESS
    mem.view(lst, 8)[:] = (mem.base + 12).to_bytes(8, "little")  # an entry with a page offset
    assert _status(nq, cmd.create_io_cq(1, 16, lst, contiguous=False)) != st.SUCCESS
    assert set(ssd.primary.cqs) == {0}


# ----------------------------------------------------------------------------------- PC=0 queues
@pytest.mark.parametrize("sq_depth,cq_depth", [(16, 16), (256, 512), (200, 300)])
def test_pc0_queues_from_a_prp_list(ssd, mem, nq, ns1, sq_depth, cq_depth):
    """Rings scattered over non-adjacent pages, described by hand-built PRP lists, used for I/O."""
    fn = ssd.pf
    cq = RawCq(fn, mem, 1, cq_depth, contiguous=False)
    sq = RawSq(fn, mem, 1, sq_depth, contiguous=False)
    nq.admin(cmd.create_io_cq(1, cq_depth, cq.addr, vector=1, contiguous=False))
    nq.admin(cmd.create_io_sq(1, sq_depth, sq.addr, 1, contiguous=False))
    buf = mem.alloc(600 * 512)
    view = mem.view(buf, 600 * 512)
    view[:] = os.urandom(600 * 512)
    total = 0
    batch = min(sq_depth, cq_depth) - 1
    while total < 600:
        n = min(batch, 600 - total)
        for i in range(n):
            sqe = cmd.write(ns1.nsid, total + i, 1)
            sqe.prp1 = buf + (total + i) * 512
            sq.put(sqe, cid=total + i)
        sq.ring_doorbell()
        got = cq.wait(n)
        assert sorted(e.cid for e in got) == list(range(total, total + n))
        assert all(e.status == 0 and e.sqid == 1 for e in got)
        total += n
    q = nq.create_io_queue(2, 64)
    assert q.read(ns1.nsid, 0, 600 // 2, 512) + q.read(ns1.nsid, 300, 300, 512) == bytes(view)


# ----------------------------------------------------------------------------------- phase, wrap, SQHD
def test_wraparound_on_depth_4_with_phase_and_sqhd(ssd, mem, nq, ns1):
    fn = ssd.pf
    cq, sq = RawCq(fn, mem, 1, 4), RawSq(fn, mem, 1, 4)
    nq.admin(cmd.create_io_cq(1, 4, cq.addr, vector=1))
    nq.admin(cmd.create_io_sq(1, 4, sq.addr, 1))
    buf = mem.alloc(512)
    phases = []
    for i in range(400):
        sqe = cmd.write(ns1.nsid, i % 64, 1)
        sqe.prp1 = buf
        cid = sq.put(sqe)
        sq.ring_doorbell()
        slot = cq.head
        (e,) = cq.wait(1)
        assert e.cid == cid and e.sqid == 1 and e.status == 0
        assert e.sqhd == (i + 1) % 4  # the SQ head right after this command was fetched
        phases.append((slot, e.phase))
    # phase starts at 1 and inverts each time the CQ wraps
    assert phases[:9] == [(0, 1), (1, 1), (2, 1), (3, 1), (0, 0), (1, 0), (2, 0), (3, 0), (0, 1)]
    assert len({p for _, p in phases}) == 2


def test_wraparound_through_the_driver(ssd, nq, ns1):
    q = nq.create_io_queue(1, 4)
    for i in range(300):
        data = bytes([i & 0xFF]) * 512
        assert q.write(ns1.nsid, i, data, 512).ok
        assert q.read(ns1.nsid, i, 1, 512) == data


def test_sqhd_with_batches(ssd, mem, nq, ns1):
    """Three commands at a time on a 4-deep queue: SQHD moves by the number fetched."""
    fn = ssd.pf
    cq, sq = RawCq(fn, mem, 1, 4), RawSq(fn, mem, 1, 4)
    nq.admin(cmd.create_io_cq(1, 4, cq.addr, vector=1))
    nq.admin(cmd.create_io_sq(1, 4, sq.addr, 1))
    head = 0
    for _ in range(50):
        for _ in range(3):
            sq.put(cmd.flush(ns1.nsid))
        sq.ring_doorbell()
        got = cq.wait(3)
        heads = [e.sqhd for e in got]
        assert heads == [(head + k) % 4 for k in (1, 2, 3)]
        head = (head + 3) % 4


# ----------------------------------------------------------------------------------- full CQ
def test_full_cq_is_never_overwritten_and_resumes_on_head_doorbell(ssd, mem, nq, ns1):
    fn = ssd.pf
    cq, sq = RawCq(fn, mem, 1, 4), RawSq(fn, mem, 1, 32)
    nq.admin(cmd.create_io_cq(1, 4, cq.addr, vector=1))
    nq.admin(cmd.create_io_sq(1, 32, sq.addr, 1))
    for i in range(20):
        sq.put(cmd.flush(ns1.nsid), cid=100 + i)
    sq.ring_doorbell()
    cq.wait_available(3)
    nq.get_features(0x07)  # the engine has had whole passes since: it must have stopped at 3
    nq.get_features(0x07)
    assert cq.available() == 3
    assert cq.peek(3).phase == 0 and cq.peek(3).cid == 0  # the fourth slot was never written
    assert [cq.peek(i).cid for i in range(3)] == [100, 101, 102]
    assert cq.peek(2).sqhd == 3  # only what could be completed was fetched
    seen: list[int] = []
    # consume two and ring: two more arrive (one wraps with phase 0), then it stops again
    seen += [e.cid for e in cq.take(2)]
    cq.ring_doorbell()
    deadline = time.monotonic() + 2
    while cq.available() < 3:
        assert time.monotonic() < deadline
        time.sleep(0.0002)
    nq.get_features(0x07)
    nq.get_features(0x07)
    assert cq.available() == 3
    assert cq.peek(0).phase == 0 and cq.peek(0).cid == 104
    # now drain everything normally
    seen += [e.cid for e in cq.wait(18)]
    assert seen == list(range(100, 120))
    assert cq.available() == 0


def test_held_completions_survive_a_full_cq_shared_by_admin_events(ssd, mem, nq, ns1):
    """Several SQs on one small CQ: nothing is lost or duplicated while the host lags."""
    fn = ssd.pf
    cq = RawCq(fn, mem, 1, 8)
    sqs = [RawSq(fn, mem, i, 64) for i in (1, 2, 3)]
    nq.admin(cmd.create_io_cq(1, 8, cq.addr, vector=1))
    for s in sqs:
        nq.admin(cmd.create_io_sq(s.qid, 64, s.addr, 1))
    expect = set()
    for s in sqs:
        for i in range(40):
            s.put(cmd.flush(ns1.nsid), cid=i)
            expect.add((s.qid, i))
        s.ring_doorbell()
    got = cq.wait(120)
    assert {(e.sqid, e.cid) for e in got} == expect and len(got) == 120


# ----------------------------------------------------------------------------------- arbitration
@pytest.mark.parametrize("ab", [0, 1, 2])
def test_round_robin_with_burst(ssd, mem, nq, ns1, ab):
    """Feature 01h AB = n: each SQ gets up to 2^n commands per round, SQs in turn."""
    fn = ssd.pf
    nq.set_features(FID_ARBITRATION, ab)
    assert nq.get_features(FID_ARBITRATION) & 0x7 == ab
    burst = 1 << ab
    cq = RawCq(fn, mem, 1, 128)
    nq.admin(cmd.create_io_cq(1, 128, cq.addr, vector=1))
    filler = RawSq(fn, mem, 4, 128)
    sqs = [RawSq(fn, mem, i, 32) for i in (1, 2, 3)]
    for s in [*sqs, filler]:
        nq.admin(cmd.create_io_sq(s.qid, s.depth, s.addr, 1))
    # fill the CQ (127 entries) from the filler SQ so that nothing else can be fetched
    for i in range(127):
        filler.put(cmd.flush(ns1.nsid), cid=i)
    filler.ring_doorbell()
    cq.wait_available(127)
    for s in sqs:
        for i in range(12):
            s.put(cmd.flush(ns1.nsid), cid=1000 + i)
        s.ring_doorbell()
    nq.get_features(0x07)
    nq.get_features(0x07)
    assert cq.available() == 127
    # free the whole CQ at once: the engine now picks from SQs 1, 2, 3 in bursts
    cq.take(127)
    cq.ring_doorbell()
    order = [e.sqid for e in cq.wait(36)]
    expected = []
    left = {1: 12, 2: 12, 3: 12}
    while any(left.values()):
        for q in (1, 2, 3):
            n = min(burst, left[q])
            expected += [q] * n
            left[q] -= n
    assert order == expected


def test_admin_queue_is_served_while_io_is_blocked(ssd, mem, nq, ns1):
    """An I/O SQ with hundreds of commands pending on a full CQ does not hold admin commands."""
    fn = ssd.pf
    cq, sq = RawCq(fn, mem, 1, 2), RawSq(fn, mem, 1, 1024)
    nq.admin(cmd.create_io_cq(1, 2, cq.addr, vector=1))
    nq.admin(cmd.create_io_sq(1, 1024, sq.addr, 1))
    for _ in range(1000):
        sq.put(cmd.flush(ns1.nsid))
    sq.ring_doorbell()
    cq.wait_available(1)
    for _ in range(20):
        assert nq.get_features(0x07, ) is not None


def test_admin_queue_is_served_under_heavy_io(ssd, mem, nq, ns1):
    """Three I/O queues kept full by another thread; admin commands still complete promptly."""
    qs = [nq.create_io_queue(i, 256) for i in (1, 2, 3)]
    nq.set_features(FID_ARBITRATION, 7)  # no burst limit: the harshest case for the admin SQ
    stop = threading.Event()
    done = [0]
    buf = mem.alloc(4096)

    def load() -> None:
        def cb(_c) -> None:
            done[0] += 1

        while not stop.is_set():
            for q in qs:
                while q.qp.free and not stop.is_set():
                    q.submit(cmd.read(ns1.nsid, 0, 8), buf, 4096, cb, ring=False)
                q.qp.ring()
            for q in qs:
                q.qp.reap()

    t = threading.Thread(target=load, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 5
        while done[0] < 1000:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        worst = 0.0  # bounded by one round: every SQ's burst (here all 255 pending of each)
        for _ in range(8):
            t0 = time.monotonic()
            nq.get_features(0x07)
            worst = max(worst, time.monotonic() - t0)
        assert worst < 1.0
    finally:
        stop.set()
        t.join(5)


# ----------------------------------------------------------------------------------- interrupts
def test_each_cq_fires_its_own_vector(ssd, mem, nq, ns1):
    msix = ssd.pf.msix
    qs = {qid: nq.create_io_queue(qid, 16, vector=qid + 3) for qid in (1, 2, 3)}
    for qid, q in qs.items():
        before = list(msix.delivered)
        for _ in range(5):
            q.run(cmd.flush(ns1.nsid))
        after = msix.delivered
        changed = {v for v in range(msix.nvectors) if after[v] != before[v]}
        assert changed == {qid + 3}, (qid, changed)
        assert 1 <= after[qid + 3] - before[qid + 3] <= 5


def test_ien_0_cq_fires_nothing(ssd, mem, nq, ns1):
    fn = ssd.pf
    msix = fn.msix
    cq, sq = RawCq(fn, mem, 1, 16), RawSq(fn, mem, 1, 16)
    nq.admin(cmd.create_io_cq(1, 16, cq.addr, vector=5, ien=False))
    nq.admin(cmd.create_io_sq(1, 16, sq.addr, 1))
    before = list(msix.delivered)
    for _ in range(30):
        sq.put(cmd.flush(ns1.nsid))
        sq.ring_doorbell()
        cq.wait(1)
    assert msix.delivered[5] == before[5]
    assert all(msix.delivered[v] == before[v] for v in range(1, msix.nvectors))


def test_masked_vector_pends_then_delivers(ssd, nq, ns1):
    msix = ssd.pf.msix
    q = nq.create_io_queue(1, 8, vector=2)
    msix.mask(2, True)
    cid = q.qp.submit(cmd.flush(ns1.nsid))
    deadline = time.monotonic() + 2
    while not msix.is_pending(2):
        assert time.monotonic() < deadline
        time.sleep(0.0002)
    n = msix.delivered[2]
    msix.mask(2, False)
    assert msix.delivered[2] == n + 1
    assert q.qp.wait(cid, 1).ok


# ----------------------------------------------------------------------------------- doorbell errors
def _error_events(ssd) -> set[AsyncEvent]:
    return {e for e in ssd.primary.events.pending if e.type == AsyncEventType.ERROR}


@pytest.mark.parametrize("what", ["sq-unknown", "cq-unknown", "sq-beyond-size", "cq-beyond-size",
                                  "cq-beyond-tail"])
def test_doorbell_errors_raise_an_async_event(ssd, mem, nq, ns1, what):
    fn = ssd.pf
    q = nq.create_io_queue(1, 16)
    bar = fn.bar0
    if what == "sq-unknown":
        bar.write32(sq_tail_doorbell(3, 0), 1)
        info = ErrorEventInfo.INVALID_DOORBELL_REGISTER
    elif what == "cq-unknown":
        bar.write32(cq_head_doorbell(60, 0), 0)
        info = ErrorEventInfo.INVALID_DOORBELL_REGISTER
    elif what == "sq-beyond-size":
        bar.write32(sq_tail_doorbell(1, 0), 16)
        info = ErrorEventInfo.INVALID_DOORBELL_VALUE
    elif what == "cq-beyond-size":
        bar.write32(cq_head_doorbell(1, 0), 0xFFFF)
        info = ErrorEventInfo.INVALID_DOORBELL_VALUE
    else:
        bar.write32(cq_head_doorbell(1, 0), 3)  # nothing was posted: head cannot pass the tail
        info = ErrorEventInfo.INVALID_DOORBELL_VALUE
    assert AsyncEvent(AsyncEventType.ERROR, info, 0x01) in _error_events(ssd)
    assert ssd.primary.error_log  # recorded in the error log too
    csts = bar.read32(Reg.CSTS)
    assert csts & CSTS.RDY and not csts & CSTS.CFS
    # the queue is unharmed: the bad value was not taken
    data = os.urandom(1024)
    q.write(ns1.nsid, 0, data, 512)
    assert q.read(ns1.nsid, 0, 2, 512) == data


def test_doorbell_error_completes_an_outstanding_aer(ssd, nq):
    if AdminOpcode.ASYNC_EVENT_REQUEST not in ssd.primary.admin_handlers:
        pytest.skip("Asynchronous Event Request not implemented yet")
    cid = nq.admin_q.submit(cmd.async_event_request())
    ssd.pf.bar0.write32(sq_tail_doorbell(7, 0), 1)
    c = nq.admin_q.wait(cid, 2.0)
    assert c.ok and c.dw0 & 0x7 == AsyncEventType.ERROR
    assert (c.dw0 >> 8) & 0xFF == ErrorEventInfo.INVALID_DOORBELL_REGISTER and (c.dw0 >> 16) & 0xFF == 0x01


def test_valid_cq_head_doorbells_are_accepted(ssd, mem, nq, ns1):
    """Head may stay put or move up to the tail, including across the wrap."""
    fn = ssd.pf
    cq, sq = RawCq(fn, mem, 1, 4), RawSq(fn, mem, 1, 4)
    nq.admin(cmd.create_io_cq(1, 4, cq.addr, vector=1))
    nq.admin(cmd.create_io_sq(1, 4, sq.addr, 1))
    for _ in range(10):
        sq.put(cmd.flush(ns1.nsid))
        sq.put(cmd.flush(ns1.nsid))
        sq.ring_doorbell()
        cq.wait_available(2)
        cq.ring_doorbell()  # head unchanged: allowed
        cq.take(2)
        cq.ring_doorbell()
    assert not _error_events(ssd)


# ----------------------------------------------------------------------------------- deletion with work queued
def test_delete_sq_drops_unfetched_commands(ssd, mem, nq, ns1):
    fn = ssd.pf
    cq, sq = RawCq(fn, mem, 1, 2), RawSq(fn, mem, 1, 64)
    nq.admin(cmd.create_io_cq(1, 2, cq.addr, vector=1))
    nq.admin(cmd.create_io_sq(1, 64, sq.addr, 1))
    buf = mem.alloc(512)
    mem.view(buf, 512)[:] = b"\xEE" * 512
    for i in range(20):
        sqe = cmd.write(ns1.nsid, i, 1)
        sqe.prp1 = buf
        sq.put(sqe)
    sq.ring_doorbell()
    cq.wait_available(1)
    nq.admin(cmd.delete_io_sq(1))
    nq.admin(cmd.delete_io_cq(1))
    q = nq.create_io_queue(2, 8)
    assert q.read(ns1.nsid, 0, 1, 512) == b"\xEE" * 512
    assert q.read(ns1.nsid, 1, 19, 512) == bytes(19 * 512)
    with pytest.raises(NvmeCommandError):
        nq.admin(cmd.delete_io_sq(1))


def test_a_completion_is_visible_only_after_the_tail_moved_past_it(monkeypatch):
    """A host may reap an entry the instant it lands and ring the CQ head past it: that head must
    already be within the tail, or the doorbell is refused and a queue that just filled stays full."""
    from nvme_lm.device import queues
    from nvme_lm.pcie.function import PcieFunction, PcieIds

    fn = PcieFunction(PcieIds(0x1B36, 0x0010, 0x1AF4, 0x1100), msix_vectors=1)
    fn.enable()
    fn.iommu.map(0x10_0000, bytearray(4096))
    cq = queues.CompletionQueue(fn, 1, 0x10_0000, 4, 4096, True, ien=False, vector=0)
    real = queues.pack_cqe_into
    tails_when_written: list[tuple[int, int]] = []

    def pack(view, off, *fields):
        tails_when_written.append((off // 16, cq.tail))
        return real(view, off, *fields)

    monkeypatch.setattr(queues, "pack_cqe_into", pack)
    for i in range(10):  # wraps the 4-entry ring: every slot, the one that fills it included
        cq.post(0, 0, 0, 1, i, 0)
        cq.head = cq.tail  # the host reaped it
    assert [slot for slot, _ in tails_when_written] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert all(tail == (slot + 1) % 4 for slot, tail in tails_when_written)
