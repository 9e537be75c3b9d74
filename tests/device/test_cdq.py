"""Controller Data Queues (45h), FID 21h and Log User Data Changes (TP4159, docs/tracking.md), through the
PF and VF host drivers; device state is read only to check that a refusal changed nothing."""

from __future__ import annotations

import os
import struct
import threading

import pytest

from nvme_lm.device.cdq import delete_udmq_of_target, on_controller_suspended, tracking
from nvme_lm.host import commands as cmd
from nvme_lm.host import tracking as ht
from nvme_lm.spec import cdq as c
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.identify import CNS, IdentifyController
from nvme_lm.spec.logs import CommandEffectsLog, FidSupportedEffectsLog, LogId
from nvme_lm.spec.opcodes import AdminOpcode as A
from tests.device.lm_setup import LBA, setup


@pytest.fixture
def lm(tmp_path):
    s = setup(tmp_path)
    yield s
    s.dev.power_off()


def create(lm, nslots: int, *, cntlid: int | None = None, contiguous: bool = True) -> tuple[int, ht.CdqReader]:
    addr = lm.pf.mem.alloc(nslots * 32)
    comp, _ = lm.pf.admin(ht.cdq_create(addr, nslots * 32, lm.vf_cntlid if cntlid is None else cntlid,
                                        contiguous=contiguous))
    return comp.dw0, ht.CdqReader(lambda off, n: lm.pf.mem.view(addr + off, n), nslots)


def refused(lm, sqe, status: st.Status, *, data: bytes | None = None) -> None:
    before = _state(lm)
    comp, _ = lm.pf.admin(sqe, data=data, check=False, read=512 if sqe.opcode == A.GET_FEATURES else 0)
    assert comp.st == status
    assert _state(lm) == before


def _state(lm) -> tuple:
    t = tracking(lm.dev.subsystem)
    return (tuple(sorted((k, q.target, q.head, q.tail, q.logging, q.etpt, q.tpt) for k, q in t.cdqs.items())),
            tuple(sorted(t.memory)))


def sync(lm, cdqid: int) -> tuple[int, int]:
    """Get Features FID 21h: posts held (coalescing) entries and returns (HP, TPT)."""
    _, data = lm.pf.admin(ht.cdq_get(cdqid), read=512)
    return struct.unpack_from("<II", data)


def write(lm, slba: int, nlb: int) -> None:
    assert lm.q.write(lm.nsid, slba, os.urandom(nlb * LBA), LBA).ok


def entry(nsid=0, slba=0, nlb=0, esa=0, dlba=0, lbacir=0, phase=1) -> dict[str, int]:
    return {"nsid": nsid, "nlb": nlb, "slba": slba, "phase": phase, "esa": esa, "dlba": dlba, "lbacir": lbacir}


def test_identify_limits_on_the_pf_only_and_vf_refuses_the_opcodes(lm):
    idc = IdentifyController.decode(lm.pf.identify(CNS.CTRL))
    assert idc.trattr == 0x3 and idc.mcudmq == c.MCUDMQ and idc.mnsudmq == c.MNSUDMQ and idc.mcmr == c.MCMR
    assert (idc.nmcmr, idc.mcdqpc, idc.minmrtg, idc.maxmrtg) == (c.NMCMR, c.MCDQPC, c.MINMRTG, c.MAXMRTG)
    fids = FidSupportedEffectsLog.decode(lm.pf.get_log(LogId.FID_SUPPORTED_EFFECTS, FidSupportedEffectsLog.SIZE)).fids
    assert fids[c.FID_CDQ] & 1 and fids[c.FID_CDQ] >> 26 & 1  # FSUPP, scope CDQSCP
    acs = CommandEffectsLog.decode(lm.pf.get_log(LogId.CMD_EFFECTS, CommandEffectsLog.SIZE)).acs
    assert all(acs[op] & 1 for op in (A.CONTROLLER_DATA_QUEUE, A.TRACK_SEND, A.TRACK_RECEIVE))
    vacs = CommandEffectsLog.decode(lm.guest.get_log(LogId.CMD_EFFECTS, CommandEffectsLog.SIZE)).acs
    assert not any(vacs[op] for op in (A.CONTROLLER_DATA_QUEUE, A.TRACK_SEND, A.TRACK_RECEIVE))
    vidc = IdentifyController.decode(lm.guest.identify(CNS.CTRL))
    assert (vidc.trattr, vidc.mcudmq, vidc.mnsudmq, vidc.maxmrtg) == (0, 0, 0, 0)
    for sqe in (ht.cdq_create(0x10_0000, 4096, 1), ht.log_user_data_changes(0, True), ht.track_receive(1, 64)):
        comp, _ = lm.guest.admin(sqe, check=False)
        assert comp.st == st.INVALID_OPCODE
    comp, _ = lm.guest.admin(ht.cdq_get(0), read=512, check=False)
    assert comp.st == st.INVALID_FIELD  # no FID 21h on a VF


def test_create_refusals(lm):
    addr = lm.pf.mem.alloc(8192)
    v = lm.vf_cntlid
    refused(lm, ht.cdq_create(addr, 4096, v, qt=1), st.INVALID_FIELD)
    bad_size = ht.cdq_create(addr, 4096, v)
    bad_size.cdw12 = 1020  # not a multiple of 8 dwords
    refused(lm, bad_size, st.INVALID_FIELD)
    refused(lm, ht.cdq_create(addr, 0, v), st.INVALID_FIELD)
    refused(lm, ht.cdq_create(addr, 4096, 0), st.INVALID_CONTROLLER_IDENTIFIER)  # the PF itself
    refused(lm, ht.cdq_create(addr, 4096, 0x77), st.INVALID_CONTROLLER_IDENTIFIER)
    refused(lm, ht.cdq_create(addr + 512, 4096, v), st.PRP_OFFSET_INVALID)
    refused(lm, ht.cdq_create(0x7000_0000, 4096, v), st.INVALID_FIELD)  # not host memory
    refused(lm, ht.cdq_create(addr, (c.MCDQPC + 1) * 4096, v, contiguous=False), st.INVALID_FIELD)
    lm.pf.mem.view(addr, 8)[:] = struct.pack("<Q", addr + 4096 + 8)  # PRP list entry with an offset
    refused(lm, ht.cdq_create(addr, 4096, v, contiguous=False), st.PRP_OFFSET_INVALID)
    cdqid, _ = create(lm, 128)
    assert cdqid == 0
    refused(lm, ht.cdq_create(addr, 4096, v), st.INVALID_FIELD)  # one UDMQ per migratable controller
    create(lm, 128, cntlid=2)
    refused(lm, ht.cdq_create(addr, 4096, 3), c.NOT_ENOUGH_RESOURCES)  # MCUDMQ
    refused(lm, ht.cdq_delete(9), c.INVALID_CDQ)
    refused(lm, SQE(opcode=A.CONTROLLER_DATA_QUEUE, cdw10=2), st.INVALID_FIELD)
    lm.pf.admin(ht.cdq_delete(0))
    assert create(lm, 128, cntlid=3)[0] == 0  # a deleted CDQID is reused


def test_prp_list_queue_logs_entries_across_pages(lm):
    pages = [lm.pf.mem.alloc(4096) for _ in range(2)]
    lst = lm.pf.mem.alloc(4096)
    lm.pf.mem.view(lst, 16)[:] = struct.pack("<2Q", pages[1], pages[0])  # out of order on purpose
    cdqid = lm.pf.admin(ht.cdq_create(lst, 8192, lm.vf_cntlid, contiguous=False))[0].dw0

    def view(off: int, n: int):
        return lm.pf.mem.view((pages[1], pages[0])[off // 4096] + off % 4096, n)

    reader = ht.CdqReader(view, 256)
    lm.pf.admin(ht.log_user_data_changes(cdqid, True))
    for i in range(130):  # non-adjacent writes: one entry each, the 129th lands in the second page
        write(lm, i * 4, 1)
    sync(lm, cdqid)
    got = reader.poll()
    assert len(got) == 130 and got[0]["esa"] == c.ESA_FIRST and got[129] == entry(lm.nsid, 129 * 4, 0)
    assert all(e["slba"] == i * 4 for i, e in enumerate(got))


def test_logging_coalesces_and_marks_first_and_stop(lm):
    cdqid, reader = create(lm, 64)
    write(lm, 0, 1)  # before start: not logged
    lm.pf.admin(ht.log_user_data_changes(cdqid, True))
    write(lm, 8, 8)
    write(lm, 16, 8)  # adjacent: coalesced with the previous
    write(lm, 12, 2)  # overlapping: coalesced
    write(lm, 100, 4)
    lm.q.run(cmd.write_zeroes(lm.nsid, 200, 8, deallocate=True))
    lm.q.run(cmd.write_zeroes(lm.nsid, 300, 1))
    lm.pf.admin(ht.log_user_data_changes(cdqid, False))
    write(lm, 500, 1)  # after stop: not logged
    assert reader.poll() == [
        entry(lm.nsid, 8, 15, esa=c.ESA_FIRST), entry(lm.nsid, 100, 3), entry(lm.nsid, 200, 7, dlba=1),
        entry(lm.nsid, 300, 0), entry(esa=c.ESA_LAST_STOPPED, lbacir=c.LBACIR_NONE)]
    lm.pf.admin(ht.log_user_data_changes(cdqid, False))  # stop when stopped: nothing posted
    assert reader.poll() == []
    refused(lm, ht.log_user_data_changes(5, True), c.INVALID_CDQ)
    refused(lm, SQE(opcode=A.TRACK_SEND, cdw10=2), st.INVALID_FIELD)


def test_phase_across_wraps_and_head_pointer_rules(lm):
    cdqid, reader = create(lm, 4)
    lm.pf.admin(ht.log_user_data_changes(cdqid, True))
    seen = []
    for i in range(10):  # 10 entries through a 4-slot ring: two wraps, the phase flips each time
        write(lm, i * 10, 1)
        sync(lm, cdqid)
        got = reader.poll()
        assert len(got) == 1
        seen += got
        refused(lm, ht.cdq_set_head(cdqid, (reader.head + 1) % 4), st.INVALID_FIELD)  # beyond the tail
        lm.pf.admin(ht.cdq_set_head(cdqid, reader.head))
    assert [e["slba"] for e in seen] == [i * 10 for i in range(10)]
    assert [e["phase"] for e in seen] == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    assert sync(lm, cdqid) == (reader.head, 0) == (2, 0)
    refused(lm, ht.cdq_set_head(cdqid, 7), st.INVALID_FIELD)
    refused(lm, ht.cdq_set_head(cdqid, reader.head, tpt=4), st.INVALID_FIELD)
    refused(lm, ht.cdq_set_head(9, 0), c.INVALID_CDQ)
    refused(lm, ht.cdq_get(9), c.INVALID_CDQ)


def test_refused_set_does_not_post_held_ranges(lm):
    cdqid, reader = create(lm, 16)
    lm.pf.admin(ht.log_user_data_changes(cdqid, True))
    write(lm, 5, 1)  # held for coalescing
    refused(lm, ht.cdq_set_head(cdqid, 3), st.INVALID_FIELD)
    assert reader.poll() == []
    lm.pf.admin(ht.cdq_set_head(cdqid, 0))  # a successful Set is a sync point
    assert reader.poll() == [entry(lm.nsid, 5, 0, esa=c.ESA_FIRST)]


def test_concurrent_guest_io_and_host_consumption(lm):
    """The VF's engine logs while the PF's engine serves FID 21h: no deadlock, no lost or repeated slot."""
    cdqid, reader = create(lm, 8)
    lm.pf.admin(ht.log_user_data_changes(cdqid, True))
    done = threading.Event()
    errors: list[BaseException] = []

    def guest() -> None:
        try:
            for i in range(300):
                write(lm, (i * 3) % 4000, 1)
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=guest)
    t.start()
    got = []
    while not done.is_set():
        sync(lm, cdqid)
        got += reader.poll()
        lm.pf.admin(ht.cdq_set_head(cdqid, reader.head))
    lm.pf.admin(ht.log_user_data_changes(cdqid, False))  # posts 010b unless the queue filled (111b) first
    got += reader.poll()
    t.join(10)
    assert not errors and not t.is_alive()
    assert got[0]["esa"] == c.ESA_FIRST and got[-1]["esa"] in (c.ESA_LAST_FULL, c.ESA_LAST_STOPPED)
    assert all(e["esa"] == 0 for e in got[1:-1])


def test_tail_pointer_trigger_is_a_one_shot_event(lm):
    cdqid, reader = create(lm, 16)
    lm.pf.admin(ht.cdq_set_head(cdqid, 0, tpt=1))
    assert sync(lm, cdqid) == (0, 1)
    aer = lm.pf.submit_aer()
    lm.pf.admin(ht.log_user_data_changes(cdqid, True))
    write(lm, 0, 1)
    write(lm, 50, 1)
    write(lm, 100, 1)  # posts the entry for 50 into slot 1
    comp = lm.pf.admin_q.wait(aer, 2.0)
    assert (comp.dw0 & 7, (comp.dw0 >> 8) & 0xFF, comp.dw1 & 0xFFFF) == (4, c.AEI_CDQ_TAIL_POINTER, cdqid)
    assert sync(lm, cdqid) == (0, 0)  # disarmed
    assert len(reader.poll()) == 3


def test_full_queue_stops_logging_with_esa_111b_and_an_event(lm):
    cdqid, reader = create(lm, 4)
    aer = lm.pf.submit_aer()
    lm.pf.admin(ht.log_user_data_changes(cdqid, True))
    for i in range(6):
        write(lm, i * 10, 1)
        sync(lm, cdqid)
    got = reader.poll()
    assert [(e["slba"], e["esa"]) for e in got] == [(0, c.ESA_FIRST), (10, 0), (20, c.ESA_LAST_FULL)]
    comp = lm.pf.admin_q.wait(aer, 2.0)
    assert (comp.dw0 & 7, (comp.dw0 >> 8) & 0xFF, comp.dw1 & 0xFFFF) == (4, c.AEI_CDQ_FULL, cdqid)
    assert not tracking(lm.dev.subsystem).cdqs[(0, cdqid)].logging
    refused(lm, ht.log_user_data_changes(cdqid, True), c.CDQ_FULL)  # 3 entries posted in 4 slots: no room
    lm.pf.admin(ht.cdq_set_head(cdqid, reader.head))
    lm.pf.admin(ht.log_user_data_changes(cdqid, True))  # host restarts after consuming
    write(lm, 70, 1)
    lm.pf.admin(ht.log_user_data_changes(cdqid, False))
    assert [(e["slba"], e["esa"]) for e in reader.poll()] == [(70, c.ESA_FIRST), (0, c.ESA_LAST_STOPPED)]


def test_suspend_posts_the_last_suspended_entry_and_delete_stops_logging(lm):
    cdqid, reader = create(lm, 16)
    lm.pf.admin(ht.log_user_data_changes(cdqid, True))
    write(lm, 3, 2)
    on_controller_suspended(lm.dev.subsystem.controllers[lm.vf_cntlid])  # what Migration Send Suspend calls
    assert reader.poll() == [entry(lm.nsid, 3, 1, esa=c.ESA_FIRST),
                             entry(esa=c.ESA_LAST_SUSPENDED, lbacir=c.LBACIR_NONE)]
    lm.pf.admin(ht.log_user_data_changes(cdqid, True))
    lm.pf.admin(ht.cdq_delete(cdqid))
    ns = lm.dev.subsystem.namespaces[lm.nsid]
    assert ns.change_loggers == []
    write(lm, 9, 1)
    assert reader.poll() == []


def test_suspend_with_dudmq_deletes_the_queue(lm):
    cdqid, reader = create(lm, 16)
    lm.pf.admin(ht.log_user_data_changes(cdqid, True))
    vf = lm.dev.subsystem.controllers[lm.vf_cntlid]
    on_controller_suspended(vf)
    delete_udmq_of_target(vf)  # what Suspend with DUDMQ=1 calls
    assert [e["esa"] for e in reader.poll()] == [c.ESA_LAST_SUSPENDED]
    refused(lm, ht.cdq_get(cdqid), c.INVALID_CDQ)
    assert create(lm, 16)[0] == cdqid
