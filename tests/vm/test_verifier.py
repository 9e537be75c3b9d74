"""The identity verifier: a VF presenting the generic-v1 template keeps its identity byte for byte while the
guest works; a changed namespace or another template is reported page by page, naming the field."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import msgpack
import pytest

from nvme_lm.device.exported import Template
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.host import exported as hx
from nvme_lm.host import virtualization as hv
from nvme_lm.host.driver import NvmeDriver
from nvme_lm.spec.identify import IdentifyController
from nvme_lm.vm.memory import GuestMemory
from nvme_lm.vm.verifier import IdentityVerifier, describe_difference
from nvme_lm.vm.workload import Workload, WorkloadConfig, trim_op_for

GENERIC = Template.builtin("generic-v1")
LARGE = Template.builtin("dc-large-v1")
GUEST_BASE = 0x1000_0000


def wire(obj):
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False)


def started(fn, base: int = 0x10_0000) -> NvmeDriver:
    mem = GuestMemory(4 << 20, base=base)
    fn.iommu.map(mem.base, mem.buf)
    d = NvmeDriver(fn, mem, timeout=5.0)
    d.start()
    return d


@pytest.fixture
def dev(tmp_path) -> Iterator[EmulatedSsd]:
    d = EmulatedSsd(tmp_path / "a", DeviceModel.builtin("vendor-a"))
    yield d
    d.power_off()


def guest_on_vf(dev: EmulatedSsd, pf: NvmeDriver, vfn: int, template: Template, blocks: int = 4096) -> NvmeDriver:
    """A guest driver on VF `vfn`, bound to an exported subsystem from `template` (ENSID 1)."""
    nsid = pf.create_namespace(blocks)
    hx.export_vf(pf, vfn, template.uuid, nsid, ensid=1, ecntlid=0x20 + vfn)
    hv.bring_up_vf(pf, vfn, nvq=3, nvi=2)
    return started(dev.vf(vfn), GUEST_BASE)


def test_a_templated_vf_keeps_its_identity_while_the_guest_works(dev):
    pf = started(dev.pf)
    g = guest_on_vf(dev, pf, 1, GENERIC)
    v = IdentityVerifier(g, 1)
    boot = v.baseline()
    assert set(boot) == {"identify_controller", "identify_namespace", "ns_descriptors", "cmd_effects",
                         "supported_logs"}
    assert len(boot["identify_controller"]) == 4096 and len(boot["cmd_effects"]) == 4096
    # the guest writes, trims and reads through its VF (generic-v1 offers Dataset Management)
    g.set_number_of_queues(1, 1)
    q = g.create_io_queue(1, 32, vector=1)
    oncs = IdentifyController.decode(boot["identify_controller"]).oncs
    cfg = WorkloadConfig(nsid=1, lba_size=512, nblocks=256, qd=8, seed=2, pattern="trim", trim_op=trim_op_for(oncs))
    with Workload(q, g.mem, cfg) as w:
        w.prefill(0.5)
        stop = threading.Event()
        threading.Timer(0.2, stop.set).start()
        s = w.run_until(stop)
        assert s.trims > 0 and s.errors == 0 and s.verify_failure_count == 0
    assert v.check() == []
    assert v.check() == []
    assert (v.checks, v.changes, v.errors) == (2, 0, 0)


def test_another_template_is_reported_field_by_field(dev):
    pf = started(dev.pf)
    g1 = guest_on_vf(dev, pf, 1, GENERIC)
    g2 = guest_on_vf(dev, pf, 2, LARGE)
    state = IdentityVerifier(g1, 1)
    state.baseline()
    moved = IdentityVerifier.restore(g2, wire(state.state()))  # as if the VM had landed on the other VF
    diffs = moved.check()
    assert moved.changes == len(diffs) >= 3 and moved.errors == 0
    ctrl = next(d for d in diffs if d.startswith("Identify Controller"))
    assert "first at offset 0x6 (field sn)" in ctrl  # the serial comes first (both start with "NLX")
    assert "mdts" in ctrl.split("fields changed:")[1] and "mn" in ctrl
    assert any(d.startswith("Commands Supported and Effects log") for d in diffs)


def test_a_namespace_change_is_reported(ssd, driver):
    nsid = driver.create_namespace(2048)
    driver.attach_namespace(nsid, [ssd.primary.cntlid])
    v = IdentityVerifier(driver, nsid)
    v.baseline()
    assert v.check() == []
    driver.detach_namespace(nsid, [ssd.primary.cntlid])
    driver.delete_namespace(nsid)
    gone = v.check()  # the namespace is not there: a difference or a failed read per namespace page
    assert len(gone) >= 2 and v.changes + v.errors >= 2
    assert driver.create_namespace(4096) == nsid  # same NSID, another size: a resize as the guest sees it
    driver.attach_namespace(nsid, [ssd.primary.cntlid])
    diffs = v.check()
    ns_line = next(d for d in diffs if d.startswith("Identify Namespace"))
    assert "first at offset 0x1 (field nsze)" in ns_line and "ncap" in ns_line  # 2048 -> 4096 blocks
    assert any(d.startswith("NS Identification Descriptor list") for d in diffs)  # a new UUID / NGUID
    assert v.checks == 3


def test_state_round_trip_and_failed_reads(dev):
    pf = started(dev.pf)
    g = guest_on_vf(dev, pf, 1, GENERIC)
    v = IdentityVerifier(g, 1)
    with pytest.raises(RuntimeError, match="baseline"):
        v.check()
    v.baseline()
    v.check()
    st = wire(v.state())
    assert st["v"] == 1 and isinstance(st["boot"]["identify_controller"], bytes)
    back = IdentityVerifier.restore(g, st)
    assert back.boot == v.boot and (back.checks, back.changes, back.errors) == (1, 0, 0)
    assert back.check() == [] and back.checks == 2
    with pytest.raises(ValueError, match="version"):
        IdentityVerifier.restore(g, st | {"v": 0})
    bad = IdentityVerifier.restore(g, st | {"nsid": 7})  # a namespace the VF does not have
    lines = bad.check()
    assert bad.errors >= 1 and any("read failed" in line for line in lines)


def test_describe_difference_names_log_entries():
    old = bytes(4096)
    new = bytearray(old)
    new[1024 + 4 * 0x09] = 1  # IOCS entry of Dataset Management
    assert "(IOCS opcode 0x09)" in describe_difference("cmd_effects", old, bytes(new))
    new = bytearray(1024)
    new[4 * 0x12] = 1
    line = describe_difference("supported_logs", bytes(1024), bytes(new))
    assert "1 byte(s) differ, first at offset 0x48 (LID 0x12)" in line
    idc = IdentifyController().encode()
    changed = bytearray(idc)
    changed[IdentifyController.offset_of("mdts")] = 3
    line = describe_difference("identify_controller", idc, bytes(changed))
    assert line.endswith("(field mdts); fields changed: mdts")
