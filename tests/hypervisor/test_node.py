"""A host node: provisioning and teardown of VFs through the PF, the PF's copy path, rate limits.

Everything is checked through host drivers: the node's PF driver and a guest driver on the VF.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import pytest

from nvme_lm.host import commands as cmd
from nvme_lm.host import exported as hx
from nvme_lm.host import migration as hm
from nvme_lm.host import rate_limit as hrl
from nvme_lm.host import virtualization as hv
from nvme_lm.host.driver import IoQueue, NvmeDriver
from nvme_lm.hypervisor import node as node_mod
from nvme_lm.hypervisor.node import Node, ProvisionError, VfRequirements, VfSlot
from nvme_lm.spec import status as st
from nvme_lm.spec.exported import ConfigState
from nvme_lm.spec.identify import CNS, IdentifyController, decode_nsid_list
from nvme_lm.spec.logs import LogId
from nvme_lm.spec.registers import Reg
from nvme_lm.vm.memory import GuestMemory

GUEST_BASE = 0x1000_0000
MIB = 1 << 20
REQ = VfRequirements(capacity_bytes=8 * MIB, lba_size=512, nvq=3, nvi=2)


@pytest.fixture
def node_a(tmp_path) -> Iterator[Node]:
    n = Node("a", tmp_path / "a", "vendor-a", host_mem_bytes=16 * MIB)
    yield n
    n.close()


@pytest.fixture
def node_b(tmp_path) -> Iterator[Node]:
    n = Node("b", tmp_path / "b", "vendor-b", host_mem_bytes=16 * MIB)
    yield n
    n.close()


def guest(node: Node, slot: VfSlot) -> tuple[NvmeDriver, IoQueue]:
    """A VM's driver on the VF, over its own memory that the hypervisor maps into the VF's IOMMU."""
    mem = GuestMemory(4 * MIB, base=GUEST_BASE)
    node.map_guest(slot, mem)
    g = NvmeDriver(slot.fn, mem, timeout=5.0)
    g.start()
    g.set_number_of_queues(1, 1)
    return g, g.create_io_queue(1, 32, vector=1)


def pf_view(node: Node) -> tuple:
    """What the PF reports about namespaces, exported subsystems and secondaries."""
    pf = node.pf
    return (decode_nsid_list(pf.identify(CNS.ALLOCATED_NS_LIST)), hx.list_subsystems(pf),
            [(e.vfn, e.online, e.nvq, e.nvi) for e in hv.secondary_controllers(pf)])


def identity(g: NvmeDriver) -> dict[str, object]:
    """What a VM would compare byte for byte after migration."""
    return {
        "cap": g.fn.bar0.read64(Reg.CAP),
        "id_ctrl": g.identify(CNS.CTRL),
        "id_ns": g.identify(CNS.NS, nsid=1),
        "ns_descs": g.identify(CNS.NS_DESC_LIST, nsid=1),
        "active": g.identify(CNS.NS_ACTIVE_LIST),
        "effects": g.get_log(LogId.CMD_EFFECTS, 4096),
        "supported": g.get_log(LogId.SUPPORTED_LOG_PAGES, 1024),
    }


# ============================================================================ provision and copy
def test_guest_writes_on_the_vf_are_read_by_the_pf(node_a):
    assert node_a.problems(REQ) == []
    slot = node_a.provision(REQ)
    assert (slot.ensid, slot.ecntlid, slot.lba_size, slot.nlb) == (1, 1, 512, REQ.capacity_bytes // 512)
    g, q = guest(node_a, slot)
    idc = IdentifyController.decode(g.identify(CNS.CTRL))
    assert idc.mn == "nvme-lm Virtual NVMe SSD" and idc.cntlid == slot.ecntlid  # the template talks
    runs = [(0, 8), (1000, 300), (slot.nlb - 17, 17)]  # one run longer than a PF copy command
    written = {}
    for slba, nlb in runs:
        data = os.urandom(nlb * 512)
        for i in range(0, nlb, 200):  # the guest's MDTS is 128 KiB
            n = min(200, nlb - i)
            assert q.write(slot.ensid, slba + i, data[i * 512 : (i + n) * 512], 512).ok
        written[slba] = data
    out = bytearray(sum(n for _, n in runs) * 512)
    node_a.read_lbas(slot.nsid, runs, memoryview(out))
    assert bytes(out) == b"".join(written[s] for s, _ in runs)
    # straight into the node's DMA memory: same bytes, no bounce
    hb = node_a.host_buffer(300 * 512)
    node_a.read_lbas(slot.nsid, [(1000, 300)], hb)
    assert bytes(hb) == written[1000]
    node_a.free_host_buffer(hb)
    ranges = node_a.allocated_ranges(slot)
    for slba, nlb in runs:
        assert any(a <= slba and slba + nlb <= a + n for a, n in ranges)
    assert sum(n for _, n in ranges) < slot.nlb  # sparse: only what the guest wrote


def test_write_lbas_and_deallocate_are_seen_by_the_guest(node_a):
    slot = node_a.provision(REQ)
    _, q = guest(node_a, slot)
    data = os.urandom(3000 * 512)  # several PF commands
    node_a.write_lbas(slot.nsid, 500, memoryview(data))
    got = b"".join(q.read(slot.ensid, 500 + i, min(200, 3000 - i), 512) for i in range(0, 3000, 200))
    assert got == data
    node_a.deallocate(slot.nsid, [(500, 1000), (3000, 500)])
    assert q.read(slot.ensid, 500, 200, 512) == bytes(200 * 512)
    assert q.read(slot.ensid, 1500, 8, 512) == data[1000 * 512 : 1008 * 512]
    out = bytearray(500 * 512)
    node_a.read_lbas(slot.nsid, [(3000, 500)], memoryview(out))
    assert bytes(out) == bytes(len(out))
    with pytest.raises(ValueError):
        node_a.read_lbas(slot.nsid, [(0, 4)], memoryview(bytearray(512)))  # wrong size


def test_pf_copy_runs_beside_the_guest_and_pf_admin(node_a):
    slot = node_a.provision(REQ)
    _, q = guest(node_a, slot)
    data = os.urandom(slot.nlb * 512)
    node_a.write_lbas(slot.nsid, 0, memoryview(data))
    stop, errors, ops = threading.Event(), [], [0, 0]

    def vm() -> None:
        try:
            while not stop.is_set():
                assert q.write(slot.ensid, 10, data[10 * 512 : 18 * 512], 512).ok  # same bytes: no change
                ops[0] += 1
        except BaseException as e:
            errors.append(e)

    def admin() -> None:
        try:
            while not stop.is_set():
                node_a.allocated_ranges(slot)
                assert len(node_a.exported_state(slot)) > 0
                ops[1] += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=vm), threading.Thread(target=admin)]
    for t in threads:
        t.start()
    try:
        out = bytearray(len(data))
        for _ in range(3):
            node_a.read_lbas(slot.nsid, [(0, slot.nlb)], memoryview(out))
            assert out == data
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors
    assert ops[0] > 0 and ops[1] > 0


# ============================================================================ what a node refuses
def test_problems_name_what_the_node_cannot_host(node_b):
    before = pf_view(node_b)
    large = dataclasses.replace(REQ, template="dc-large-v1")
    problems = node_b.problems(large)
    assert len(problems) == 1 and "dc-large-v1" in problems[0] and "not offered" in problems[0]
    huge = dataclasses.replace(REQ, capacity_bytes=4 << 40)  # vendor-b holds 1.92 TB
    problems = node_b.problems(huge)
    assert len(problems) == 1 and "exceeds the unallocated" in problems[0]
    assert any("unknown" in p for p in node_b.problems(dataclasses.replace(REQ, template="no-such")))
    odd = node_b.problems(dataclasses.replace(REQ, lba_size=1024, capacity_bytes=MIB))
    assert any("vendor-b" in p for p in odd) and any("template generic-v1" in p for p in odd)
    assert any("VQ" in p for p in node_b.problems(dataclasses.replace(REQ, nvq=100)))
    assert any("VI" in p for p in node_b.problems(dataclasses.replace(REQ, nvi=0)))
    with pytest.raises(ProvisionError) as e:
        node_b.provision(large)
    assert e.value.step == "check" and e.value.problems
    assert pf_view(node_b) == before


# ============================================================================ destination
def test_a_destination_from_the_exported_state_presents_the_same_identity(node_a, node_b):
    src = node_a.provision(REQ)
    gs, _ = guest(node_a, src)
    state = node_a.exported_state(src)
    node_b.provision(dataclasses.replace(REQ, capacity_bytes=MIB))  # so that underlying ids differ
    want = dataclasses.replace(REQ, exported_state=state)
    assert node_b.problems(want) == []
    dst = node_b.provision(want)
    assert (dst.vfn, dst.nsid) != (src.vfn, src.nsid)
    assert (dst.ecntlid, dst.ensid) == (src.ecntlid, src.ensid)
    assert node_b.exported_state(dst) == state
    gd, qd = guest(node_b, dst)
    a, b = identity(gs), identity(gd)
    for key in a:
        assert a[key] == b[key], key
    # the hypervisor writes the copy through the destination PF, the guest reads it through its VF
    data = os.urandom(512 * 512)
    node_b.write_lbas(dst.nsid, 4096, memoryview(data))
    assert qd.read(dst.ensid, 4096, 200, 512) == data[: 200 * 512]
    assert qd.read(dst.ensid, 4096 + 500, 12, 512) == data[500 * 512 :]
    # the same state cannot be hosted twice on one device
    assert any("already exists" in p for p in node_b.problems(want))
    mismatch = dataclasses.replace(want, capacity_bytes=2 * REQ.capacity_bytes)
    assert any("exported namespace is" in p for p in node_b.problems(mismatch))


def _patched_state(state: bytes, offset: int, value: bytes) -> bytes:
    out = bytearray(state)
    out[offset : offset + len(value)] = value
    out[12:16] = bytes(4)
    struct.pack_into("<I", out, 12, zlib.crc32(out))
    return bytes(out)


def test_a_failed_provision_leaves_nothing_behind(node_a, node_b, monkeypatch):
    state = node_a.exported_state(node_a.provision(REQ))
    before = pf_view(node_b)
    # a structurally broken blob is a problem found before anything is done
    broken = state[:20] + bytes([state[20] ^ 1]) + state[21:]
    with pytest.raises(ProvisionError) as e:
        node_b.provision(dataclasses.replace(REQ, exported_state=broken))
    assert e.value.step == "check" and "CRC" in str(e.value)
    assert pf_view(node_b) == before
    # the device refuses the state (ECNTLID FFF5h is not a controller id) after the namespace was made
    assert ConfigState.decode(state).controllers[0].ecntlid == 1
    bad = _patched_state(state, 352, struct.pack("<H", 0xFFF5))
    with pytest.raises(ProvisionError) as e:
        node_b.provision(dataclasses.replace(REQ, exported_state=bad))
    assert e.value.step == "set exported configuration state"
    assert e.value.status == st.INVALID_EXPORTED_CONFIGURATION_STATE
    assert pf_view(node_b) == before
    # the last step refused by the device: everything before it is undone, the VF disassociated
    def refused_bring_up(pf, vfn, nvq, nvi):
        return pf.admin(hv.virt_mgmt(hv.VirtAction.SECONDARY_ONLINE, cntlid=hv.secondary_for_vf(pf, vfn).scid))

    monkeypatch.setattr(node_mod.hv, "bring_up_vf", refused_bring_up)
    with pytest.raises(ProvisionError) as e:
        node_b.provision(dataclasses.replace(REQ, exported_state=state))
    assert e.value.step == "bring up VF" and e.value.status == st.INVALID_SECONDARY_CONTROLLER_STATE
    assert pf_view(node_b) == before and hx.underlying_controllers(node_b.pf, 0)  # all VFs exportable again
    monkeypatch.undo()
    assert node_b.provision(dataclasses.replace(REQ, exported_state=state)).nsid == 1


# ============================================================================ release
def test_release_leaves_nothing_and_the_vf_can_be_provisioned_again(node_a):
    before = pf_view(node_a)
    slot = node_a.provision(REQ)
    _, q = guest(node_a, slot)
    assert q.write(slot.ensid, 0, os.urandom(4096), 512).ok
    node_a.set_rate_limit(slot, 1000)
    hm.suspend_controller(node_a.pf, slot.cntlid)  # a migration source is released while suspended
    node_a.release(slot)
    assert pf_view(node_a) == before
    assert slot.mapped_iova is None and not slot.fn.iommu._table[0]
    assert hrl.get_rate_limit(node_a.pf, slot.cntlid).tiops == 0  # limits outlive resets: cleared
    again = node_a.provision(REQ)
    assert again.vfn == slot.vfn
    g, q = guest(node_a, again)
    assert q.read(again.ensid, 0, 8, 512) == bytes(4096)  # a new, empty namespace
    data = os.urandom(4096)
    assert q.write(again.ensid, 0, data, 512).ok and q.read(again.ensid, 0, 8, 512) == data
    assert g.fn.bar0.read32(Reg.CSTS) & 1


# ============================================================================ rate limiting
def _iops(q: IoQueue, ensid: int, seconds: float) -> float:
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        assert q.run(cmd.read(ensid, n % 64, 1), read=512)[0].ok
        n += 1
    return n / (time.monotonic() - t0)


def test_rate_limit_caps_the_vf_and_zero_lifts_it(node_a):
    slot = node_a.provision(REQ)
    _, q = guest(node_a, slot)
    node_a.set_rate_limit(slot, 100)
    assert hrl.get_rate_limit(node_a.pf, slot.cntlid).tiops == 100
    limited = _iops(q, slot.ensid, 0.4)
    assert 50 < limited < 160, limited
    node_a.set_rate_limit(slot, 0)
    unlimited = _iops(q, slot.ensid, 0.2)
    assert unlimited > 3 * limited, (limited, unlimited)
    node_a.set_rate_limit(slot, 100, write_mib_s=2, read_mib_s=3)  # the migration's throttles on top of the QoS
    lim = hrl.get_rate_limit(node_a.pf, slot.cntlid)
    assert (lim.tiops, lim.wbwv, lim.tbwv) == (100, 2, 5)  # reads: the total-bandwidth bucket, reads + writes
    node_a.set_rate_limit(slot, 100)
    lim = hrl.get_rate_limit(node_a.pf, slot.cntlid)
    assert (lim.tiops, lim.wbwv, lim.tbwv) == (100, 0, 0)  # released: the VM's own QoS again
    with pytest.raises(ValueError):
        node_a.set_rate_limit(slot, 0, read_mib_s=-1)
