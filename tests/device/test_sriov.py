"""SR-IOV: the resource model of NVMe Base §8.2.6 through Virtualization Management on the PF,
VFs as their own PCIe functions (BAR0, IOMMU, MSI-X), and privilege (docs/sriov.md).

Everything goes through host drivers on the functions; device state is read only to check that a
refused command changed nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from nvme_lm.device.model import DeviceModel
from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.device.virtualization import SriovResources
from nvme_lm.host import commands as cmd
from nvme_lm.host import virtualization as hv
from nvme_lm.host.driver import ControllerFatal, NvmeDriver
from nvme_lm.host.qpair import NvmeCommandError
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.identify import (
    CMIC,
    CNS,
    OACS,
    IdentifyController,
    IdentifyNamespace,
    PrimaryControllerCapabilities,
    SecondaryControllerList,
    decode_nsid_list,
    encode_ctrl_list,
)
from nvme_lm.spec.logs import CommandEffectsLog, LogId
from nvme_lm.spec.opcodes import AdminOpcode as A
from nvme_lm.spec.registers import CC, CSTS, Reg
from nvme_lm.spec.virtualization import ResourceType as RT
from nvme_lm.spec.virtualization import VirtAction as ACT
from nvme_lm.vm.memory import GuestMemory

VQ_FLEX, VI_FLEX, VQ_MAX, VI_MAX = 24, 16, 9, 5
MODEL = DeviceModel(max_vfs=4, vq_flexible=VQ_FLEX, vi_flexible=VI_FLEX, vq_max_per_vf=VQ_MAX,
                    vi_max_per_vf=VI_MAX, max_io_queues=4, msix_vectors=5)
GUEST_MB = 4 << 20


@pytest.fixture
def dev(tmp_path) -> Iterator[EmulatedSsd]:
    d = EmulatedSsd(tmp_path / "ssd", MODEL)
    yield d
    d.power_off()


@pytest.fixture
def pf(dev: EmulatedSsd) -> NvmeDriver:
    return _pf_driver(dev)


def guest(fn, base: int = 0x10_0000) -> NvmeDriver:
    """A guest driver on `fn` over its own memory, mapped only into that function's IOMMU."""
    mem = GuestMemory(GUEST_MB, base=base)
    fn.iommu.map(mem.base, mem.buf)
    return NvmeDriver(fn, mem, timeout=5.0)


def caps(pf: NvmeDriver) -> PrimaryControllerCapabilities:
    return hv.primary_capabilities(pf)


def entry(pf: NvmeDriver, vfn: int):
    return hv.secondary_for_vf(pf, vfn)


def vmgmt(pf: NvmeDriver, act: int, cntlid: int = 0, rt: int = 0, nr: int = 0):
    comp, _ = pf.admin(hv.virt_mgmt(act, cntlid=cntlid, rt=rt, nr=nr), check=False)
    return comp


def device_state(dev: EmulatedSsd) -> tuple:
    s = dev.sriov
    return (tuple((x.scid, x.online, x.nvq, x.nvi) for x in s.secondaries.values()),
            tuple((p.primary, p.primary_next) for p in s.pools.values()),
            tuple(fn.msix.nvectors for fn in dev.vfs),
            tuple(c.max_io_queues for c in dev.secondaries), dev.primary.max_io_queues)


def refused(pf: NvmeDriver, dev: EmulatedSsd, status: st.Status, act: int, cntlid: int = 0, rt: int = 0,
            nr: int = 0) -> None:
    """The command fails with `status` and neither the host-visible nor the device state changes."""
    before = (pf.identify(CNS.PRIMARY_CTRL_CAPS), pf.identify(CNS.SECONDARY_CTRL_LIST), device_state(dev))
    comp = vmgmt(pf, act, cntlid, rt, nr)
    assert comp.st == status, (act, cntlid, rt, nr)
    assert comp.status & 0x4000  # DNR: retrying the same command cannot succeed
    after = (pf.identify(CNS.PRIMARY_CTRL_CAPS), pf.identify(CNS.SECONDARY_CTRL_LIST), device_state(dev))
    assert after == before


def create_ns(pf: NvmeDriver, blocks: int = 2048) -> int:
    """Namespace Management create on the PF (512-byte format); returns the NSID."""
    data = IdentifyNamespace(nsze=blocks, ncap=blocks, flbas=0).encode()
    comp, _ = pf.admin(cmd.ns_create(), data=data)
    return comp.dw0


def attach(pf: NvmeDriver, nsid: int, *cntlids: int) -> None:
    pf.admin(cmd.ns_attach(nsid), data=encode_ctrl_list(list(cntlids)))


def csts(fn) -> int:
    return fn.bar0.read32(Reg.CSTS)


# ============================================================================ capabilities
def test_capabilities_and_secondary_list_describe_the_model(dev, pf):
    c = caps(pf)
    assert (c.cntlid, c.crt) == (0, 0x3)
    assert (c.vqfrt, c.vqrfa, c.vqrfap, c.vqprt, c.vqfrsm, c.vqgran) == (VQ_FLEX, 0, 0, 5, VQ_MAX, 1)
    assert (c.vifrt, c.virfa, c.virfap, c.viprt, c.vifrsm, c.vigran) == (VI_FLEX, 0, 0, 5, VI_MAX, 1)
    lst = hv.secondary_controllers(pf)
    assert [(e.scid, e.pcid, e.online, e.vfn, e.nvq, e.nvi) for e in lst] == [
        (n, 0, False, n, 0, 0) for n in range(1, 5)]
    # CDW10.CNTID: the list starts at that SCID
    tail = SecondaryControllerList.decode(pf.identify(CNS.SECONDARY_CTRL_LIST, cntid=3)).active
    assert [e.scid for e in tail] == [3, 4]
    assert dev.vfs == dev.pf.virtfns and [fn.is_virtual for fn in dev.vfs] == [True] * 4
    assert sorted(dev.subsystem.controllers) == [0, 1, 2, 3, 4]
    # PF: multiple controllers, not a VF; Virtualization Management advertised
    idc = IdentifyController.decode(pf.identify(CNS.CTRL))
    assert idc.cmic & CMIC.MULTI_CTRL and not idc.cmic & CMIC.SRIOV_VF
    assert idc.oacs & OACS.VMS


# ============================================================================ accounting
def test_resource_accounting_across_offline_assign_online_flr_cycles(dev, pf):
    def check(vqrfa: int, virfa: int, vfs: dict[int, tuple[bool, int, int]]) -> None:
        c = caps(pf)
        assert (c.vqrfa, c.virfa, c.vqrfap, c.virfap) == (vqrfa, virfa, 0, 0)
        for vfn, (online, nvq, nvi) in vfs.items():
            e = entry(pf, vfn)
            assert (e.online, e.nvq, e.nvi) == (online, nvq, nvi), vfn
            assert bool(csts(dev.vf(vfn)) & CSTS.CFS) == (not online)
            assert dev.vf(vfn).msix.nvectors == max(nvi, 1)  # MSI-X Table Size follows NVI

    for _cycle in range(2):
        assert hv.offline(pf, 1) == 0
        check(0, 0, {1: (False, 0, 0)})
        assert hv.assign(pf, 1, RT.VQ, 4) == 4
        check(4, 0, {1: (False, 4, 0)})
        assert hv.assign(pf, 1, RT.VI, 2) == 2
        check(4, 2, {1: (False, 4, 2)})
        assert hv.assign(pf, 1, RT.VQ, 3) == 3  # a new assignment replaces the old count
        check(3, 2, {1: (False, 3, 2)})
        dev.vf(1).flr()
        check(3, 2, {1: (False, 3, 2)})
        assert hv.online(pf, 1) == 0
        check(3, 2, {1: (True, 3, 2)})
        hv.bring_up_vf(pf, 2, VQ_MAX, VI_MAX)
        check(3 + VQ_MAX, 2 + VI_MAX, {1: (True, 3, 2), 2: (True, VQ_MAX, VI_MAX)})
        dev.vf(1).flr()  # a VF FLR keeps the assignment and the Online state
        check(3 + VQ_MAX, 2 + VI_MAX, {1: (True, 3, 2), 2: (True, VQ_MAX, VI_MAX)})
        assert hv.online(pf, 1) == 0  # already Online: nothing to do
        hv.offline(pf, 1)
        check(VQ_MAX, VI_MAX, {1: (False, 0, 0), 2: (True, VQ_MAX, VI_MAX)})
        hv.offline(pf, 2)
        check(0, 0, {1: (False, 0, 0), 2: (False, 0, 0)})


def test_pool_can_be_filled_exactly(dev, pf):
    # VQ: 9 + 9 + 6 = 24 flexible; VI: 5 + 5 + 5 + 1 = 16
    for vfn, (nvq, nvi) in {1: (9, 5), 2: (9, 5), 3: (6, 5)}.items():
        hv.bring_up_vf(pf, vfn, nvq, nvi)
    refused(pf, dev, st.INVALID_NUMBER_OF_CONTROLLER_RESOURCES, ACT.SECONDARY_ASSIGN, 4, RT.VQ, 1)
    assert hv.assign(pf, 4, RT.VI, 1) == 1
    refused(pf, dev, st.INVALID_NUMBER_OF_CONTROLLER_RESOURCES, ACT.SECONDARY_ASSIGN, 4, RT.VI, 2)
    c = caps(pf)
    assert (c.vqrfa, c.virfa) == (VQ_FLEX, VI_FLEX)


# ============================================================================ refusals
def test_refusals_return_the_spec_status_and_change_nothing(dev, pf):
    hv.bring_up_vf(pf, 1, 4, 2)
    hv.assign(pf, 2, RT.VQ, 1)
    hv.assign(pf, 2, RT.VI, 1)
    # wrong CNTLID: not a secondary (the primary, an unknown one), or not the primary for ACT 1h
    for act in (ACT.SECONDARY_OFFLINE, ACT.SECONDARY_ONLINE):
        for bad in (0, 5, 0xFFFF):
            refused(pf, dev, st.INVALID_CONTROLLER_IDENTIFIER, act, bad)
    refused(pf, dev, st.INVALID_CONTROLLER_IDENTIFIER, ACT.SECONDARY_ASSIGN, 7, RT.VQ, 2)
    refused(pf, dev, st.INVALID_CONTROLLER_IDENTIFIER, ACT.PRIMARY_FLEXIBLE_ALLOCATION, 1, RT.VQ, 2)
    # resources beyond the per-secondary maximum or the pool
    refused(pf, dev, st.INVALID_NUMBER_OF_CONTROLLER_RESOURCES, ACT.SECONDARY_ASSIGN, 3, RT.VQ, VQ_MAX + 1)
    refused(pf, dev, st.INVALID_NUMBER_OF_CONTROLLER_RESOURCES, ACT.SECONDARY_ASSIGN, 3, RT.VI, VI_MAX + 1)
    refused(pf, dev, st.INVALID_NUMBER_OF_CONTROLLER_RESOURCES, ACT.PRIMARY_FLEXIBLE_ALLOCATION, 0, RT.VQ,
            VQ_FLEX + 1)
    refused(pf, dev, st.INVALID_NUMBER_OF_CONTROLLER_RESOURCES, ACT.PRIMARY_FLEXIBLE_ALLOCATION, 0, RT.VQ,
            VQ_FLEX - 4)  # VFs 1 and 2 hold 5 of the 24
    # Online with too few VQs (1: no I/O queue) or no VI
    refused(pf, dev, st.INVALID_SECONDARY_CONTROLLER_STATE, ACT.SECONDARY_ONLINE, 2)
    hv.assign(pf, 2, RT.VQ, 2)
    hv.assign(pf, 2, RT.VI, 0)
    refused(pf, dev, st.INVALID_SECONDARY_CONTROLLER_STATE, ACT.SECONDARY_ONLINE, 2)
    refused(pf, dev, st.INVALID_SECONDARY_CONTROLLER_STATE, ACT.SECONDARY_ONLINE, 3)  # nothing assigned
    # changing an Online secondary
    refused(pf, dev, st.INVALID_SECONDARY_CONTROLLER_STATE, ACT.SECONDARY_ASSIGN, 1, RT.VQ, 2)
    refused(pf, dev, st.INVALID_SECONDARY_CONTROLLER_STATE, ACT.SECONDARY_ASSIGN, 1, RT.VI, 2)
    # reserved resource types, for Assign and for Primary Flexible Allocation
    for rt in (2, 3, 7):
        refused(pf, dev, st.INVALID_RESOURCE_IDENTIFIER, ACT.SECONDARY_ASSIGN, 2, rt, 1)
        refused(pf, dev, st.INVALID_RESOURCE_IDENTIFIER, ACT.PRIMARY_FLEXIBLE_ALLOCATION, 0, rt, 1)
    # reserved actions
    for act in (0x0, 0x2, 0x6, 0xA, 0xF):
        refused(pf, dev, st.INVALID_FIELD, act, 1, RT.VQ, 1)
    # the state the successful commands built is intact
    assert (entry(pf, 1).online, entry(pf, 1).nvq, entry(pf, 1).nvi) == (True, 4, 2)
    assert (entry(pf, 2).online, entry(pf, 2).nvq, entry(pf, 2).nvi) == (False, 2, 0)


def test_granularity_and_unsupported_type_in_the_resource_model():
    """Plain rules, no controllers: NR must be a multiple of the granularity; a type without a
    flexible pool is an invalid resource identifier."""
    from nvme_lm.device.request import NvmeError

    m = DeviceModel(max_vfs=2, vq_flexible=8, vi_flexible=0, vq_max_per_vf=8, vq_granularity=2)
    r = SriovResources(m)
    seen: list[tuple[int, bool, int, int]] = []
    r.on_secondary_change = lambda s, reset: seen.append((s.scid, reset, s.nvq, s.nvi))
    assert r.assign(1, RT.VQ, 4) == 4
    with pytest.raises(NvmeError) as e:
        r.assign(1, RT.VQ, 3)
    assert e.value.status == st.INVALID_NUMBER_OF_CONTROLLER_RESOURCES
    with pytest.raises(NvmeError) as e:
        r.assign(1, RT.VI, 1)
    assert e.value.status == st.INVALID_RESOURCE_IDENTIFIER
    assert r.primary_capabilities().crt == 0x1
    assert r.secondaries[1].nvq == 4 and seen == [(1, False, 4, 0)]
    r.secondaries[1].nvi = 1  # (as if VIs existed) Online, then an implicit Offline resets it
    r.online(1)
    r.primary_reset(level=False)
    assert seen[-1] == (1, True, 0, 0)


# ============================================================================ VF behaviour
def test_offline_vf_reports_cfs_and_cannot_be_enabled(dev, pf):
    vf = dev.vf(1)
    assert csts(vf) & CSTS.CFS
    g = guest(vf)
    with pytest.raises(ControllerFatal):
        g.start()
    # even a host that ignores CFS cannot enable it
    vf.bar0.write32(Reg.AQA, 0x000F000F)
    vf.bar0.write64(Reg.ASQ, g.mem.alloc(4096))
    vf.bar0.write64(Reg.ACQ, g.mem.alloc(4096))
    vf.bar0.write32(Reg.CC, CC.make(en=True, css=0, mps=0, iosqes=6, iocqes=4))
    assert not vf.bar0.read32(Reg.CC) & CC.EN and not csts(vf) & CSTS.RDY and csts(vf) & CSTS.CFS
    assert not dev.secondary(1).sqs  # no admin queue was ever created


def test_vf_does_io_with_its_own_driver_memory_and_namespace(dev, pf):
    e = hv.bring_up_vf(pf, 1, nvq=4, nvi=2)
    assert (e.scid, e.online, e.nvq, e.nvi) == (1, True, 4, 2)
    nsid = create_ns(pf)
    attach(pf, nsid, e.scid)  # Namespace Attachment on the PF, naming the VF's CNTLID
    vf = dev.vf(1)
    g = guest(vf)
    g.start()
    idc = IdentifyController.decode(g.identify(CNS.CTRL))
    assert idc.cntlid == 1 and idc.cmic & CMIC.SRIOV_VF and idc.cmic & CMIC.MULTI_CTRL
    assert idc.sn == IdentifyController.decode(pf.identify(CNS.CTRL)).sn  # one subsystem
    assert decode_nsid_list(g.identify(CNS.NS_ACTIVE_LIST)) == [nsid]
    assert decode_nsid_list(pf.identify(CNS.NS_ACTIVE_LIST)) == []  # not attached to the PF
    # Number of Queues grants at most NVQ - 1; vectors are 0..NVI-1
    assert g.set_number_of_queues(16, 16) == (3, 3)
    assert vf.msix.nvectors == 2
    with pytest.raises(NvmeCommandError) as err:
        g.create_io_queue(1, 32, vector=2)
    assert err.value.status == st.INVALID_INTERRUPT_VECTOR
    with pytest.raises(NvmeCommandError) as err:
        g.create_io_queue(4, 32, vector=1)
    assert err.value.status == st.INVALID_QID
    q = g.create_io_queue(1, 32, vector=1)
    data = os.urandom(16 * 512)
    assert q.write(nsid, 100, data, 512).ok
    assert q.read(nsid, 100, 16, 512) == data
    g.shutdown()


def test_attachment_isolation_by_nsid_and_by_dma(dev, pf):
    for vfn in (1, 2):
        hv.bring_up_vf(pf, vfn, 2, 1)
    ns_a, ns_b = create_ns(pf), create_ns(pf)
    attach(pf, ns_a, 1)
    attach(pf, ns_b, 2)
    g1 = guest(dev.vf(1), base=0x10_0000)
    g2 = guest(dev.vf(2), base=0x4000_0000)  # VF 2's guest memory: mapped only into VF 2's IOMMU
    g1.start()
    g2.start()
    g1.set_number_of_queues(1, 1)
    g2.set_number_of_queues(1, 1)
    q1, q2 = g1.create_io_queue(1, 16, vector=0), g2.create_io_queue(1, 16, vector=0)
    secret = os.urandom(512)
    assert q2.write(ns_b, 0, secret, 512).ok
    # by NSID: VF 1 does not see VF 2's namespace
    assert decode_nsid_list(g1.identify(CNS.NS_ACTIVE_LIST)) == [ns_a]
    for sqe in (cmd.read(ns_b, 0, 1), cmd.write(ns_b, 0, 1)):
        comp, _ = q1.run(sqe, read=512 if sqe.opcode == 0x02 else 0, data=None if sqe.opcode == 0x02 else secret,
                         check=False)
        assert comp.st == st.INVALID_NAMESPACE
    assert q2.read(ns_b, 0, 1, 512) == secret
    # by DMA: VF 1 pointing its data buffer into VF 2's memory faults in VF 1's IOMMU
    target = g2.mem.alloc(4096)
    g2.mem.view(target, 512)[:] = b"\xAA" * 512
    sqe = cmd.read(ns_a, 0, 1)
    sqe.prp1 = target
    comp, _ = q1.run(sqe, check=False)
    assert comp.st == st.DATA_TRANSFER_ERROR
    assert bytes(g2.mem.view(target, 512)) == b"\xAA" * 512
    sqe = cmd.write(ns_a, 0, 1)
    sqe.prp1 = target
    comp, _ = q1.run(sqe, check=False)
    assert comp.st == st.DATA_TRANSFER_ERROR


PRIVILEGED = (A.VIRTUALIZATION_MANAGEMENT, A.NS_MANAGEMENT, A.NS_ATTACHMENT, A.FORMAT_NVM)


def test_privileged_commands_are_absent_on_a_vf(dev, pf):
    hv.bring_up_vf(pf, 1, 2, 1)
    g = guest(dev.vf(1))
    g.start()
    pf_effects = CommandEffectsLog.decode(pf.get_log(LogId.CMD_EFFECTS, 4096))
    vf_effects = CommandEffectsLog.decode(g.get_log(LogId.CMD_EFFECTS, 4096))
    for op in PRIVILEGED:
        present_on_pf = op in dev.primary.admin_handlers
        assert pf_effects.admin_supported(op) == present_on_pf
        assert not vf_effects.admin_supported(op)
        comp, _ = g.admin(SQE(opcode=op, cdw10=0x7 | 1 << 16), check=False)
        assert comp.st == st.INVALID_OPCODE, hex(op)
    assert pf_effects.admin_supported(A.VIRTUALIZATION_MANAGEMENT)
    assert vf_effects.admin_supported(A.IDENTIFY) and vf_effects.admin_supported(A.CREATE_IO_SQ)
    pf_oacs = IdentifyController.decode(pf.identify(CNS.CTRL)).oacs
    vf_oacs = IdentifyController.decode(g.identify(CNS.CTRL)).oacs
    assert pf_oacs & OACS.VMS and pf_oacs & OACS.NS_MGMT
    assert not vf_oacs & (OACS.VMS | OACS.NS_MGMT | OACS.FORMAT)
    # the SR-IOV Identify structures describe other VFs: refused on a secondary like an unknown CNS
    for cns in (CNS.PRIMARY_CTRL_CAPS, CNS.SECONDARY_CTRL_LIST):
        comp, _ = g.admin(cmd.identify(cns), read=4096, check=False)
        assert comp.st == st.INVALID_FIELD
    assert entry(pf, 1).nvq == 2  # nothing the VF tried changed its resources


def test_vf_flr_resets_the_controller_but_keeps_its_resources(dev, pf):
    hv.bring_up_vf(pf, 1, 3, 2)
    vf = dev.vf(1)
    g = guest(vf)
    g.start()
    g.set_number_of_queues(2, 2)
    g.create_io_queue(1, 16, vector=1)
    assert dev.secondary(1).sqs.keys() == {0, 1}
    vf.flr()
    assert not csts(vf) & (CSTS.RDY | CSTS.CFS) and vf.bar0.read32(Reg.CC) == 0
    assert not dev.secondary(1).sqs and not dev.secondary(1).cqs
    e = entry(pf, 1)
    assert (e.online, e.nvq, e.nvi) == (True, 3, 2) and vf.msix.nvectors == 2
    g2 = guest(vf, base=0x4000_0000)
    g2.start()
    assert g2.set_number_of_queues(8, 8) == (2, 2)


def test_primary_reset_and_shutdown_take_every_vf_offline(dev, pf):
    hv.bring_up_vf(pf, 1, 2, 1)
    hv.bring_up_vf(pf, 2, 3, 2)
    g = guest(dev.vf(1))
    g.start()
    pf.start()  # CC.EN 1 -> 0 on the primary: a Controller Reset
    assert all(not e.online and e.nvq == e.nvi == 0 for e in hv.secondary_controllers(pf))
    c = caps(pf)
    assert (c.vqrfa, c.virfa) == (0, 0)
    assert csts(dev.vf(1)) & CSTS.CFS and not csts(dev.vf(1)) & CSTS.RDY
    assert not dev.secondary(1).sqs
    # a normal shutdown of the primary does the same
    hv.bring_up_vf(pf, 3, 2, 1)
    assert entry(pf, 3).online
    pf.shutdown()
    pf.start()
    assert not entry(pf, 3).online and entry(pf, 3).nvq == 0


def test_primary_flexible_allocation_applies_at_the_pf_flr_and_persists(tmp_path):
    dev = EmulatedSsd(tmp_path / "alloc", MODEL)
    try:
        _primary_allocation(dev, _pf_driver(dev))
    finally:
        dev.power_off()
    again = EmulatedSsd(tmp_path / "alloc", MODEL)  # persistent: powered up again, it is in effect
    try:
        d = _pf_driver(again)
        c = caps(d)
        assert (c.vqrfap, c.virfap, c.vqrfa) == (4, 3, 0)
        assert d.set_number_of_queues(64, 64) == (8, 8) and again.pf.msix.nvectors == 5 + 3
    finally:
        again.power_off()


def _pf_driver(dev: EmulatedSsd) -> NvmeDriver:
    mem = GuestMemory(GUEST_MB)
    dev.pf.iommu.map(mem.base, mem.buf)
    d = NvmeDriver(dev.pf, mem, timeout=5.0)
    d.start()
    return d


def _primary_allocation(dev: EmulatedSsd, pf: NvmeDriver) -> None:
    assert hv.primary_allocate(pf, RT.VQ, 4) == 4
    assert hv.primary_allocate(pf, RT.VI, 3) == 3
    assert (caps(pf).vqrfap, caps(pf).virfap) == (0, 0)  # pending until an FLR of the primary
    pf.start()  # a plain Controller Reset does not apply it
    assert caps(pf).vqrfap == 0 and pf.set_number_of_queues(64, 64) == (4, 4)
    hv.bring_up_vf(pf, 1, 2, 1)
    dev.pf.flr()
    pf.start()
    c = caps(pf)
    assert (c.vqrfap, c.virfap, c.vqrfa, c.virfa) == (4, 3, 0, 0)  # and the FLR took VF 1 offline
    assert pf.set_number_of_queues(64, 64) == (8, 8) and dev.pf.msix.nvectors == 5 + 3
    # what the primary holds is no longer free for secondaries: 24 - 4 = 20
    hv.bring_up_vf(pf, 1, 9, 1)
    hv.bring_up_vf(pf, 2, 9, 1)
    refused(pf, dev, st.INVALID_NUMBER_OF_CONTROLLER_RESOURCES, ACT.SECONDARY_ASSIGN, 3, RT.VQ, 3)
    assert hv.assign(pf, 3, RT.VQ, 2) == 2


def test_a_device_without_vfs_has_no_virtualization(ssd, driver):
    assert ssd.vfs == [] and ssd.sriov is None and ssd.subsystem.sriov is None
    idc = IdentifyController.decode(driver.identify(CNS.CTRL))
    assert idc.cmic == 0 and not idc.oacs & OACS.VMS
    comp = vmgmt(driver, ACT.SECONDARY_OFFLINE, 1)
    assert comp.st == st.INVALID_OPCODE
    for cns in (CNS.PRIMARY_CTRL_CAPS, CNS.SECONDARY_CTRL_LIST):
        comp, _ = driver.admin(cmd.identify(cns), read=4096, check=False)
        assert comp.st == st.INVALID_FIELD
