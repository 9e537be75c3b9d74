"""TP4159 controller migration: Suspend / Resume, Get / Set Controller State, CNS 20h (spec notes §9-12).

The key flow moves a running guest from a VF on one emulated SSD to a VF on another: a command
queued after Suspend (recorded, never fetched) completes exactly once, at the destination; the
guest driver continues with the same queues, CIDs, phases and outstanding AER.
"""

from __future__ import annotations

import os
import struct
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from nvme_lm.device import migration_state as ms
from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.host import commands as cmd
from nvme_lm.host import migration as hm
from nvme_lm.host import virtualization as hv
from nvme_lm.host.driver import NvmeDriver
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.controller_state import (
    VENDOR_UUID,
    ControllerState,
    CqState,
    NvmeState,
    SqState,
)
from nvme_lm.spec.identify import CNS, OACS, IdentifyController, IdentifyNamespace, encode_ctrl_list
from nvme_lm.spec.opcodes import AdminOpcode as A
from nvme_lm.spec.registers import sq_tail_doorbell
from tests.device.lm_setup import LBA, driver_on, guest_on, migrate_guest_ram

NVQ, NVI = 3, 3  # admin + 2 I/O queue pairs, 3 vectors per VF
NS_BLOCKS = 2048


def setup_side(dev: EmulatedSsd) -> tuple[NvmeDriver, int, int]:
    """PF driver, one namespace, VF 1 brought up and attached; returns (pf, nsid, vf cntlid)."""
    pf = driver_on(dev.pf)
    data = IdentifyNamespace(nsze=NS_BLOCKS, ncap=NS_BLOCKS, flbas=0).encode()
    nsid = pf.admin(cmd.ns_create(), data=data)[0].dw0
    entry = hv.bring_up_vf(pf, 1, NVQ, NVI)
    pf.admin(cmd.ns_attach(nsid), data=encode_ctrl_list([entry.scid]))
    return pf, nsid, entry.scid


def copy_namespace(src: EmulatedSsd, dst: EmulatedSsd, nsid: int) -> None:
    s, d = src.subsystem.namespaces[nsid], dst.subsystem.namespaces[nsid]
    size = NS_BLOCKS * LBA
    os.pwrite(d.fd, os.pread(s.fd, size, 0), 0)


def ns_bytes(dev: EmulatedSsd, nsid: int) -> bytes:
    return os.pread(dev.subsystem.namespaces[nsid].fd, NS_BLOCKS * LBA, 0)


def pattern(lba: int, n: int = 8) -> bytes:
    return b"".join(struct.pack("<I", lba + i) * (LBA // 4) for i in range(n))


# ============================================================================ the key flow
@pytest.mark.parametrize("shadow", [False, True], ids=["mmio-doorbells", "shadow-doorbells"])
def test_live_migration_of_a_vf_with_a_queued_command_and_outstanding_aer(devices, shadow):
    src, dst = devices
    pf_s, nsid, cntlid_s = setup_side(src)
    pf_d, nsid_d, cntlid_d = setup_side(dst)
    assert nsid_d == nsid
    fmt = hm.supported_state_formats(pf_s)
    assert fmt.versions == [0] and fmt.uuids == [VENDOR_UUID]

    g, mem_s = guest_on(src.vf(1))
    if shadow:
        g.enable_shadow_doorbells()
    g.set_number_of_queues(2, 2)
    q = g.create_io_queue(1, 16)
    g.set_features(0x08, 0x0203)  # interrupt coalescing: a feature value the guest will look at later
    for lba in range(0, 64, 8):
        q.write(nsid, lba, pattern(lba), LBA)
    aer_cid = g.submit_aer()
    deadline = time.monotonic() + 2
    while not src.secondary(1).aers and time.monotonic() < deadline:  # fetched: outstanding at the source
        time.sleep(0.001)

    # a burst in flight when the Suspend arrives: each command completes exactly once, somewhere
    done: Counter[int] = Counter()
    bufs = []
    for i in range(6):
        buf = g.mem.alloc(4096)
        g.mem.view(buf, 4096)[:] = pattern(200 + 8 * i)
        bufs.append(buf)
        q.submit(cmd.write(nsid, 200 + 8 * i, 8), buf, 4096, lambda c, i=i: done.update([i]) if c.ok else None)
    hm.suspend_controller(pf_s, cntlid_s)
    src_ctrl = src.secondary(1)
    assert src_ctrl.suspended and ms._fetched_not_done(src_ctrl) == 0
    assert len(src_ctrl.aers) == 1  # the AER stays outstanding

    # queued after Suspend: the doorbell is recorded, nothing is fetched
    late = g.mem.alloc(4096)
    g.mem.view(late, 4096)[:] = pattern(500)
    late_done: list = []
    q.submit(cmd.write(nsid, 500, 8), late, 4096, late_done.append)
    time.sleep(0.05)
    sq = src_ctrl.sqs[1]
    if not shadow:  # with shadow doorbells the new tail may sit only in the shadow page (guest memory)
        assert (sq.tail - sq.head) % sq.size >= 1
    completed_at_source = src_ctrl.commands_completed

    blob, csup = hm.read_state(pf_s, cntlid_s, chunk=256)  # paged with offsets
    assert csup
    cs, nvme = hm.parse_state(blob)
    assert cs.suspended and nvme is not None
    assert [s.qid for s in nvme.sqs] == [1] and [c.qid for c in nvme.cqs] == [1]
    assert nvme.sqs[0].tail == sq.tail and nvme.sqs[0].head == sq.head

    # destination: suspend the fresh VF, move RAM and data, set state, resume
    hm.suspend_controller(pf_d, cntlid_d)
    mem_d = migrate_guest_ram(g, mem_s, dst.vf(1))
    copy_namespace(src, dst, nsid)
    hm.write_state(pf_d, cntlid_d, blob, chunk=128)  # SEQIND first / middle / last segments
    hm.resume_controller(pf_d, cntlid_d)

    deadline = time.monotonic() + 5
    while (not late_done or sum(done.values()) < 6) and time.monotonic() < deadline:
        q.qp.wait_any(1.0) if q.qp.outstanding else time.sleep(0.01)
    assert len(late_done) == 1 and late_done[0].ok
    assert done == Counter(range(6))  # each burst command once, whichever side ran it
    time.sleep(0.05)
    assert src_ctrl.commands_completed == completed_at_source  # the source never ran it
    assert len(late_done) == 1
    image = ns_bytes(dst, nsid)
    assert image[500 * LBA : 508 * LBA] == pattern(500)
    assert ns_bytes(src, nsid)[500 * LBA : 508 * LBA] == bytes(8 * LBA)
    for lba in list(range(0, 64, 8)) + [200 + 8 * i for i in range(6)]:
        assert image[lba * LBA : (lba + 8) * LBA] == pattern(lba)

    # the guest goes on: CQ phase wraps more than once, admin queue and features continue
    for i in range(40):
        q.write(nsid, 1000 + i, pattern(1000 + i, 1), LBA)
    assert q.read(nsid, 1000, 40, LBA) == b"".join(pattern(1000 + i, 1) for i in range(40))
    assert g.get_features(0x08) == 0x0203
    assert g.identify(CNS.CTRL)[:2] != b""
    assert mem_d is g.mem
    # counters the guest watches stay monotonic across the move
    assert dst.subsystem.smart.host_write_commands >= src.subsystem.smart.host_write_commands + 40

    # the outstanding AER survives and completes on an event at the destination, with its CID
    g.fn.bar0.write32(sq_tail_doorbell(1, g.cap.dstrd), 0xFFFF)  # invalid doorbell value -> error event
    comp = g.admin_q.wait(aer_cid, 5.0)
    assert comp.ok and comp.dw0 & 0x7 == 0 and (comp.dw0 >> 16) & 0xFF == 0x01
    assert len(src_ctrl.aers) == 1  # never completed at the source


# ============================================================================ state machine
def test_state_machine_table(devices):
    src, _ = devices
    pf, _nsid, cntlid = setup_side(src)
    g, _ = guest_on(src.vf(1))
    garbage = bytes(64)
    NS, SUSP = ms.CONTROLLER_NOT_SUSPENDED, st.SUCCESS
    table = [
        # (target suspended?, command, expected)
        (False, hm.suspend(cntlid, stype=hm.STYPE_NOTIFICATION), SUSP),
        (False, hm.resume(cntlid), NS),
        (False, hm.get_state(cntlid, 4096), NS),
        (False, hm.set_state(cntlid, len(garbage)), NS),
        (False, hm.suspend(cntlid), SUSP),
        (True, hm.suspend(cntlid), SUSP),  # again: not an error
        (True, hm.get_state(cntlid, 4096), SUSP),
        (True, hm.get_state(cntlid, 4096, csvi=2), st.INVALID_FIELD),
        (True, hm.get_state(cntlid, 4096, offset=2), st.INVALID_FIELD),
        (True, hm.get_state(cntlid, 4096, offset=1 << 20), st.INVALID_FIELD),
        (True, hm.set_state(cntlid, len(garbage)), st.INVALID_FIELD),
        (True, hm.set_state(cntlid, len(garbage), seqind=hm.SEQ_MIDDLE, offset=64), st.COMMAND_SEQUENCE_ERROR),
        (True, hm.set_state(cntlid, len(garbage), seqind=hm.SEQ_FIRST), SUSP),
        (True, hm.resume(cntlid), st.COMMAND_SEQUENCE_ERROR),  # sequence not committed
        (True, hm.set_state(cntlid, len(garbage), seqind=hm.SEQ_MIDDLE, offset=8), st.INVALID_FIELD),
        (True, hm.resume(cntlid), SUSP),  # the broken sequence was dropped
        (False, hm.resume(cntlid), NS),
        (False, hm.suspend(cntlid, stype=2), st.INVALID_FIELD),
        (False, hm.suspend(0), st.INVALID_CONTROLLER_IDENTIFIER),  # the MMC itself
        (False, hm.suspend(999), st.INVALID_CONTROLLER_IDENTIFIER),
        (False, hm.get_state(999, 4096), st.INVALID_CONTROLLER_IDENTIFIER),
        (False, SQE(opcode=A.MIGRATION_SEND, cdw10=3, cdw11=cntlid), st.INVALID_FIELD),
        (False, SQE(opcode=A.MIGRATION_RECEIVE, cdw10=1, cdw11=cntlid), st.INVALID_FIELD),
    ]
    ctrl = src.secondary(1)
    for i, (suspended, sqe, want) in enumerate(table):
        assert ctrl.suspended == suspended, i
        data = garbage if sqe.opcode == A.MIGRATION_SEND and sqe.cdw10 & 0xFF == 2 else None
        comp, _ = pf.admin(sqe, data=data, read=4096 if sqe.opcode == A.MIGRATION_RECEIVE else 0, check=False)
        assert comp.st == want, (i, comp.st, want)
    # a VF has none of it
    for sqe in (hm.suspend(cntlid), hm.get_state(cntlid, 4096)):
        comp, _ = g.admin(sqe, check=False, read=4096 if sqe.opcode == A.MIGRATION_RECEIVE else 0)
        assert comp.st == st.INVALID_OPCODE
    comp, _ = g.admin(cmd.identify(CNS.SUPPORTED_CTRL_STATE_FORMATS), read=4096, check=False)
    assert comp.st == st.INVALID_FIELD
    pf_id, vf_id = IdentifyController.decode(pf.identify(CNS.CTRL)), IdentifyController.decode(g.identify(CNS.CTRL))
    assert pf_id.oacs & OACS.HMLMS and not vf_id.oacs & OACS.HMLMS
    assert pf_id.hmpre == 0 and vf_id.hmpre == 0  # no Host Memory Buffer where an MMC exists
    # while suspended, guest commands wait; Resume lets them run
    hm.suspend_controller(pf, cntlid)
    cid = g.admin_q.submit(cmd.keep_alive())
    time.sleep(0.05)
    assert g.admin_q.reap() == 0
    hm.resume_controller(pf, cntlid)
    assert g.admin_q.wait(cid, 5.0).ok
    # a CLR (FLR) clears suspension
    hm.suspend_controller(pf, cntlid)
    src.vf(1).flr()
    assert not ctrl.suspended


# ============================================================================ hostile Set Controller State
def _snapshot(ctrl) -> tuple:
    return (ctrl.cc, ctrl.csts, ctrl.aqa, ctrl.asq, ctrl.acq, sorted(ctrl.sqs), sorted(ctrl.cqs),
            dict(ctrl.features.current), len(ctrl.aers), ctrl.error_log.count, ctrl.nsqa, ctrl.ncqa,
            ctrl.suspended, ctrl.shadow)


def _with_nvme(blob: bytes, nvme: NvmeState) -> bytes:
    cs = ControllerState.decode(blob)
    return ControllerState(cs.suspended, nvme.encode(), cs.vendor).encode()


def test_set_controller_state_refuses_hostile_blobs(devices):
    src, dst = devices
    pf_s, _nsid, cntlid_s = setup_side(src)
    pf_d, _nsid_d, cntlid_d = setup_side(dst)
    g, mem_s = guest_on(src.vf(1))
    g.set_number_of_queues(2, 2)
    g.create_io_queue(1, 16)
    hm.suspend_controller(pf_s, cntlid_s)
    blob, _ = hm.read_state(pf_s, cntlid_s)
    _, nvme = hm.parse_state(blob)
    assert nvme is not None
    hm.suspend_controller(pf_d, cntlid_d)
    migrate_guest_ram(g, mem_s, dst.vf(1))
    target = dst.secondary(1)
    sq, cq = nvme.sqs[0], nvme.cqs[0]

    def rep(obj, **kw):
        return type(obj)(**{**{f: getattr(obj, f) for f in obj.__slots__}, **kw})

    hostile = hs.one_of(
        hs.integers(0, len(blob) - 4).map(lambda n: blob[: n & ~3]),  # truncated
        hs.binary(min_size=4, max_size=64).map(lambda x: blob + x[: len(x) & ~3]),  # oversized
        hs.integers(1, 0xFFFF).map(lambda v: struct.pack("<H", v) + blob[2:]),  # outer version
        hs.integers(1, 0xFFFF).map(lambda v: blob[:48] + struct.pack("<H", v) + blob[50:]),  # NVMe VER
        hs.integers(target.max_io_queues + 1, 0xFFFF).map(
            lambda q: _with_nvme(blob, NvmeState([rep(sq, qid=q)], [cq]))),  # SQ id beyond resources
        hs.integers(target.max_io_queues + 1, 0xFFFF).map(
            lambda q: _with_nvme(blob, NvmeState([rep(sq, cqid=q)], [rep(cq, qid=q)]))),
        hs.just(_with_nvme(blob, NvmeState([sq], []))),  # CQ missing
        hs.integers(1, 0xFFF).map(lambda o: _with_nvme(blob, NvmeState([rep(sq, prp1=sq.prp1 + o)], [cq]))),
        hs.integers(1, 0xFFF).map(lambda o: _with_nvme(blob, NvmeState([sq], [rep(cq, prp1=cq.prp1 + o)]))),
        hs.integers(target.fn.msix.nvectors, 0xFFFF).map(lambda v: _with_nvme(blob, NvmeState([sq], [rep(cq, iv=v)]))),
        hs.integers(target.cap.mqes + 1, 0xFFFF).map(lambda s: _with_nvme(blob, NvmeState([rep(sq, qsize=s)], [cq]))),
        hs.integers(16, 0xFFFF).map(lambda t: _with_nvme(blob, NvmeState([rep(sq, tail=t)], [cq]))),
        hs.just(_with_nvme(blob, NvmeState([sq], [rep(cq, prp1=0x7000_0000)]))),  # not mapped for the VF
        hs.binary(min_size=0, max_size=256).map(lambda x: x[: len(x) & ~3]),  # noise
    )
    before = _snapshot(target)

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(bad=hostile, chunk=hs.sampled_from([64, 4096]))
    def refused(bad: bytes, chunk: int) -> None:
        comp = None
        for off in range(0, max(len(bad), 1), chunk):
            part = bad[off : off + chunk]
            last = off + chunk >= len(bad)
            seq = (hm.SEQ_ONLY if off == 0 else hm.SEQ_LAST) if last else (hm.SEQ_FIRST if off == 0 else hm.SEQ_MIDDLE)
            comp, _ = pf_d.admin(hm.set_state(cntlid_d, len(part), seqind=seq, offset=off), data=part or None,
                                 check=False)
            if not comp.ok:
                break
        assert comp is not None and comp.st in (st.INVALID_FIELD, st.INVALID_CONTROLLER_IDENTIFIER), comp.st
        assert _snapshot(target) == before

    refused()
    # and the genuine state still commits afterwards
    hm.write_state(pf_d, cntlid_d, blob)
    assert sorted(target.sqs) == [0, 1] and target.sqs[1].tail == sq.tail
    # a target that already has I/O queues is not in a condition to take a state
    comp, _ = pf_d.admin(hm.set_state(cntlid_d, len(blob)), data=blob, check=False)
    assert comp.st == st.INVALID_CONTROLLER_IDENTIFIER


def test_get_state_parts_follow_csvi_and_csuuidi(devices):
    src, _ = devices
    pf, _nsid, cntlid = setup_side(src)
    g, _ = guest_on(src.vf(1))
    g.set_number_of_queues(1, 1)
    g.create_io_queue(1, 8)
    hm.suspend_controller(pf, cntlid)
    only_nvme, _ = hm.read_state(pf, cntlid, csuuidi=0)
    only_vendor, _ = hm.read_state(pf, cntlid, csvi=0)
    a, b = ControllerState.decode(only_nvme), ControllerState.decode(only_vendor)
    assert a.nvme and not a.vendor and b.vendor and not b.nvme
    n = NvmeState.decode(a.nvme)
    assert n.cqs[0] == CqState(n.cqs[0].prp1, 7, 1, 0, 0, True, True, 0, 1)
    assert n.sqs[0] == SqState(n.sqs[0].prp1, 7, 1, 1, True, 0, 0, 0)
    # NUMDL beyond the state returns the real amount (rest zero here) and CSUP stays set
    comp, data = pf.admin(hm.get_state(cntlid, 8192), read=8192)
    assert comp.dw0 & 1 and len(data) == 8192


def test_keep_alive_timer_pauses_while_suspended(devices):
    src, _ = devices
    pf, _nsid, cntlid = setup_side(src)
    g, _ = guest_on(src.vf(1))
    g.set_features(0x0F, 300)  # KATO 300 ms
    g.keep_alive()
    hm.suspend_controller(pf, cntlid)
    time.sleep(0.45)  # the paused guest sends nothing; the controller must not declare it dead
    assert not g.fn.bar0.read32(0x1C) & 0x2  # CSTS.CFS
    hm.resume_controller(pf, cntlid)
    g.keep_alive()
    assert src.secondary(1).keep_alive_deadline is not None


def test_suspend_writes_the_udmq_suspended_entry_and_dudmq_deletes_it(devices):
    from nvme_lm.host import tracking as ht
    from nvme_lm.spec.cdq import ESA_LAST_SUSPENDED, INVALID_CDQ

    src, _ = devices
    pf, nsid, cntlid = setup_side(src)
    g, _ = guest_on(src.vf(1))
    g.set_number_of_queues(1, 1)
    q = g.create_io_queue(1, 8)
    nbytes = 64 * 32
    addr = pf.mem.alloc(nbytes)
    pf.mem.view(addr, nbytes)[:] = bytes(nbytes)
    cdqid = pf.admin(ht.cdq_create(addr, nbytes, cntlid))[0].dw0
    pf.admin(ht.log_user_data_changes(cdqid, True))
    q.write(nsid, 8, pattern(8), LBA)
    hm.suspend_controller(pf, cntlid)
    entries = ht.CdqReader(lambda off, n: pf.mem.view(addr + off, n), 64).poll()
    assert entries and entries[-1]["esa"] == ESA_LAST_SUSPENDED
    assert any(e["slba"] == 8 for e in entries)
    hm.resume_controller(pf, cntlid)
    pf.admin(ht.log_user_data_changes(cdqid, True))
    pf.admin(hm.suspend(cntlid, dudmq=True))
    comp, _ = pf.admin(ht.cdq_delete(cdqid), check=False)
    assert comp.st == INVALID_CDQ  # already deleted by the Suspend


def test_suspended_controller_refuses_virtualization_changes_with_39h(devices):
    """Offlining, re-assigning or onlining a suspended VF would reset the state a migration is
    capturing: Controller Suspended (39h), and the VF stays online, suspended and unchanged."""
    src, _ = devices
    pf, _, cntlid = setup_side(src)
    hm.suspend_controller(pf, cntlid)
    before = [(s.scid, s.scs, s.nvq, s.nvi) for s in hv.secondary_controllers(pf)]
    for act, rt, nr in ((0x7, 0, 0), (0x8, 0, 2), (0x9, 0, 0)):
        comp, _ = pf.admin(hv.virt_mgmt(act, cntlid=cntlid, rt=rt, nr=nr), check=False)
        assert comp.st == st.CONTROLLER_SUSPENDED, (act, comp.st)
    assert [(s.scid, s.scs, s.nvq, s.nvi) for s in hv.secondary_controllers(pf)] == before
    assert src.subsystem.controllers[cntlid].suspended
    hm.resume_controller(pf, cntlid)
    assert hv.offline(pf, cntlid) == 0  # once resumed, the same action is allowed again
