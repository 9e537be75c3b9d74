"""Track Send SEL 1 (Track Memory Changes) and Track Receive (TP4159, docs/tracking.md): the PF learns which
guest memory a VF wrote by DMA (read data, CQEs), at the granted granularity, drained on each read."""

from __future__ import annotations

import os

import pytest

from nvme_lm.device.cdq import tracking
from nvme_lm.host import commands as cmd
from nvme_lm.host import tracking as ht
from nvme_lm.spec import cdq as c
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.opcodes import AdminOpcode as A
from tests.device.lm_setup import GUEST_MB, LBA, setup


@pytest.fixture
def lm(tmp_path):
    s = setup(tmp_path)
    yield s
    s.dev.power_off()


def start(lm, gran: int = 12, ranges=None) -> int:
    ranges = ranges or [(lm.guest.mem.base, GUEST_MB)]
    comp, _ = lm.pf.admin(ht.track_memory_changes(lm.vf_cntlid, True), data=ht.track_memory_data(gran, ranges))
    return comp.dw0


def receive(lm, nbytes: int = 4096) -> ht.TrackedChanges:
    _, data = lm.pf.admin(ht.track_receive(lm.vf_cntlid, nbytes), read=nbytes)
    return ht.parse_track_receive(data)


def read_into(lm, buf: int, slba: int, nlb: int) -> None:
    cid = lm.q.qp.submit(_with_prp(lm, cmd.read(lm.nsid, slba, nlb), buf, nlb * LBA))
    assert lm.q.qp.wait(cid, 2.0).ok


def _with_prp(lm, sqe: SQE, buf: int, length: int) -> SQE:
    sqe.prp1, sqe.prp2, _ = lm.guest.prp.build(buf, length)
    return sqe


def covered(ranges: list[tuple[int, int]], addr: int, length: int) -> bool:
    return any(a <= addr and addr + length <= a + n for a, n in ranges)


def refused(lm, sqe: SQE, status: st.Status, *, data: bytes | None = None, read: int = 0) -> None:
    t = tracking(lm.dev.subsystem)
    before = {k: (v.shift, tuple(v.ranges), frozenset(v.dirty)) for k, v in t.memory.items()}
    comp, _ = lm.pf.admin(sqe, data=data, read=read, check=False)
    assert comp.st == status
    assert {k: (v.shift, tuple(v.ranges), frozenset(v.dirty)) for k, v in t.memory.items()} == before


def test_read_data_and_cqes_are_reported_then_cleared(lm):
    assert start(lm) == 12
    assert lm.q.write(lm.nsid, 0, os.urandom(8 * LBA), LBA).ok  # write: device reads memory, writes a CQE
    buf = lm.guest.mem.alloc(3 * 4096)
    read_into(lm, buf + 4096, 0, 8)  # read data: device writes the middle page only
    r = receive(lm)
    assert (r.cntlid, r.granularity, r.more, r.suspended) == (lm.vf_cntlid, 12, False, False)
    assert covered(r.ranges, buf + 4096, 4096)
    assert not covered(r.ranges, buf, 4096) and not covered(r.ranges, buf + 8192, 4096)
    assert covered(r.ranges, lm.q.qp.cq_addr, 16)  # the CQEs
    assert all(a % 4096 == 0 and n % 4096 == 0 for a, n in r.ranges)
    starts = [a for a, _ in r.ranges]
    assert starts == sorted(starts)
    assert all(a + n < b for (a, n), b in zip(r.ranges, starts[1:], strict=False))  # coalesced: gaps between
    assert receive(lm).ranges == []  # a successful read cleared them


def test_small_buffer_sets_mtr_and_ranges_outside_the_descriptors_are_ignored(lm):
    bufs = [lm.guest.mem.alloc(4096) for _ in range(6)]
    start(lm, 12, [(b, 4096) for b in bufs[::2]])  # track only every other buffer
    for b in bufs:
        read_into(lm, b, 0, 8)
    r = receive(lm, 16 + 2 * 16)
    assert r.more and r.ranges == [(bufs[0], 4096), (bufs[2], 4096)]
    r = receive(lm)
    assert not r.more and r.ranges == [(bufs[4], 4096)]


def test_coarser_granularity_rounds_out(lm):
    assert start(lm, 16) == 16
    buf = lm.guest.mem.alloc(4096)
    read_into(lm, buf, 0, 1)
    r = receive(lm)
    assert r.granularity == 16 and covered(r.ranges, buf, 512) and all(a % 65536 == 0 for a, _ in r.ranges)


def test_refusals_change_nothing_and_stop(lm):
    good = ht.track_memory_data(12, [(lm.guest.mem.base, 4096)])
    ts = ht.track_memory_changes
    refused(lm, ts(0, True), st.INVALID_CONTROLLER_IDENTIFIER, data=good)  # the PF is not migratable
    refused(lm, ts(0x55, True), st.INVALID_CONTROLLER_IDENTIFIER, data=good)
    for bad in (ht.track_memory_data(c.MINMRTG - 1, [(lm.guest.mem.base, 4096)]),
                ht.track_memory_data(c.MAXMRTG + 1, [(lm.guest.mem.base, 1 << 22)]),
                ht.track_memory_data(12, []),
                ht.track_memory_data(12, [(lm.guest.mem.base + 512, 4096)]),
                ht.track_memory_data(12, [(lm.guest.mem.base, 0)]),
                b"\x01" + good[1:]):
        refused(lm, ts(lm.vf_cntlid, True), st.INVALID_FIELD, data=bad)
    refused(lm, ts(lm.vf_cntlid, True), st.INVALID_FIELD,
            data=ht.track_memory_data(12, [(lm.guest.mem.base, 4096)] * (c.CMMRTD + 1)))
    refused(lm, ts(lm.vf_cntlid, False), st.COMMAND_SEQUENCE_ERROR)
    full = ht.track_memory_data(12, [(lm.guest.mem.base + i * 4096, 4096) for i in range(c.CMMRTD)])
    lm.pf.admin(ts(2, True), data=full)
    lm.pf.admin(ts(3, True), data=full)
    refused(lm, ts(lm.vf_cntlid, True), c.NOT_ENOUGH_RESOURCES, data=good)  # NMMRTD for the subsystem
    lm.pf.admin(ts(3, False))
    refused(lm, ht.track_receive(lm.vf_cntlid, 64), st.COMMAND_SEQUENCE_ERROR, read=64)
    start(lm)
    refused(lm, ts(lm.vf_cntlid, True), st.INVALID_CONTROLLER_IDENTIFIER, data=good)  # already tracking
    refused(lm, ht.track_receive(lm.vf_cntlid, 8), st.INVALID_FIELD, read=8)
    refused(lm, ht.track_receive(0x55, 64), st.INVALID_CONTROLLER_IDENTIFIER, read=64)
    refused(lm, SQE(opcode=A.TRACK_RECEIVE, cdw10=1, cdw11=lm.vf_cntlid, cdw12=15), st.INVALID_FIELD, read=64)
    lm.pf.admin(ts(lm.vf_cntlid, False))
    lm.pf.admin(ts(2, False))
    vf = lm.dev.subsystem.controllers[lm.vf_cntlid]
    assert vf.fn.iommu.on_write is None  # the hook is gone with the tracking
    assert tracking(lm.dev.subsystem).memory == {}


def test_suspended_controller_sets_susp(lm, monkeypatch):
    start(lm)
    vf = lm.dev.subsystem.controllers[lm.vf_cntlid]
    assert not receive(lm).suspended
    try:  # stand-in for Migration Send Suspend (another module); Track Receive asks getattr(ctrl, "suspended")
        monkeypatch.setattr(vf, "suspended", True, raising=False)
    except AttributeError:
        monkeypatch.setattr(type(vf), "suspended", property(lambda self: True))
    assert receive(lm).suspended


def test_pf_controller_reset_deletes_udmqs_and_stops_tracking(lm):
    start(lm)
    addr = lm.pf.mem.alloc(4096)
    lm.pf.admin(ht.cdq_create(addr, 4096, lm.vf_cntlid))
    lm.pf.shutdown()
    lm.pf.start()  # CC.EN 1 -> 0 -> 1: a Controller Level Reset of the MMC
    t = tracking(lm.dev.subsystem)
    assert t.cdqs == {} and t.memory == {}
    assert lm.dev.subsystem.controllers[lm.vf_cntlid].fn.iommu.on_write is None
