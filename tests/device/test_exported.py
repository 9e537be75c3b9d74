"""Exported NVM subsystems (TP4193) and configuration templates: a VF bound to a template answers exactly
from it, whatever SSD model is underneath (docs/exported-subsystems.md).

Everything goes through host drivers on the PCIe functions; device state is read only to check that a
refused command changed nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import uuid
import zlib
from collections.abc import Iterator

import pytest

from nvme_lm.device.admin.exported import capabilities_for
from nvme_lm.device.exported import ExportedSubsystems, Template, TemplateError
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.host import commands as cmd
from nvme_lm.host import exported as hx
from nvme_lm.host import virtualization as hv
from nvme_lm.host.driver import NvmeDriver
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.exported import (
    ConfigState,
    ExportedNsAssociation,
    ExportedNsSel,
    ReceiveSel,
    SendSel,
    encode_controller_pairs,
)
from nvme_lm.spec.identify import (
    CNS,
    IdentifyController,
    IdentifyNamespace,
    NidType,
    decode_ns_descs,
    decode_nsid_list,
)
from nvme_lm.spec.logs import CommandEffectsLog, LogId
from nvme_lm.spec.opcodes import AdminOpcode as A
from nvme_lm.spec.opcodes import IoOpcode as IO
from nvme_lm.spec.registers import Reg
from nvme_lm.vm.memory import GuestMemory

MODEL_A = DeviceModel.builtin("vendor-a")
MODEL_B = DeviceModel.builtin("vendor-b")
GENERIC = Template.builtin("generic-v1")
LARGE = Template.builtin("dc-large-v1")
BLOCKS = 4096  # 2 MiB namespaces with 512-byte blocks
ECNTLID = 0x21
GUEST_MB = 4 << 20


# ============================================================================ helpers
@pytest.fixture
def dev_a(tmp_path) -> Iterator[EmulatedSsd]:
    d = EmulatedSsd(tmp_path / "a", MODEL_A)
    yield d
    d.power_off()


@pytest.fixture
def dev_b(tmp_path) -> Iterator[EmulatedSsd]:
    d = EmulatedSsd(tmp_path / "b", MODEL_B)
    yield d
    d.power_off()


def host(fn, base: int = 0x10_0000) -> NvmeDriver:
    """A driver on `fn` over its own memory, mapped only into that function's IOMMU."""
    mem = GuestMemory(GUEST_MB, base=base)
    fn.iommu.map(mem.base, mem.buf)
    return NvmeDriver(fn, mem, timeout=5.0)


def started(fn, base: int = 0x10_0000) -> NvmeDriver:
    d = host(fn, base)
    d.start()
    return d


def create_ns(pf: NvmeDriver, blocks: int = BLOCKS, lba_index: int = 0) -> int:
    return pf.create_namespace(blocks, lba_index)


def refused(comp, status: st.Status) -> None:
    assert comp.st == status, f"{comp.st} != {status}"
    assert comp.status & 0x4000  # DNR


def device_state(dev: EmulatedSsd) -> tuple:
    """The device side of everything exported: records, bindings, attachments."""
    ex = dev.exported
    records = json.dumps([e.to_json() for _, e in sorted(ex.subsystems.items())], sort_keys=True)
    bindings = tuple((c.cntlid, None if c.export is None else c.export.ecntlid, dict(c.nsid_map or {}),
                      c.model.mdts, len(c.admin_handlers), len(c.io_handlers)) for c in dev.secondaries)
    attached = tuple(sorted((n, tuple(sorted(c))) for n, c in dev.subsystem.attached.items()))
    return records, bindings, attached


def host_state(pf: NvmeDriver) -> tuple:
    """The PF's view: the subsystem list and each subsystem's state, namespaces and controllers."""
    subs = hx.list_subsystems(pf)
    return (tuple(subs), tuple((hx.get_config_state(pf, e.esubid), tuple(hx.exported_namespaces(pf, e.esubid)),
                                tuple(hx.exported_controllers(pf, e.esubid))) for e in subs))


def snapshot(dev: EmulatedSsd, pf: NvmeDriver) -> tuple:
    return device_state(dev), host_state(pf)


def vf_view(g: NvmeDriver, ensid: int = 1) -> dict[str, object]:
    """Everything the issue names, as bytes through the VF's own driver."""
    view: dict[str, object] = {
        "cap": g.fn.bar0.read64(Reg.CAP),
        "id_ctrl": g.identify(CNS.CTRL),
        "id_ns": g.identify(CNS.NS, nsid=ensid),
        "id_ns_common": g.identify(CNS.NS, nsid=0xFFFFFFFF),
        "ns_descs": g.identify(CNS.NS_DESC_LIST, nsid=ensid),
        "active": g.identify(CNS.NS_ACTIVE_LIST),
        "nvm_ns": g.identify(CNS.CSI_NS, nsid=ensid),
        "nvm_ctrl": g.identify(CNS.CSI_CTRL),
        "log_supported": g.get_log(LogId.SUPPORTED_LOG_PAGES, 1024),
        "log_effects": g.get_log(LogId.CMD_EFFECTS, 4096),
        "log_fid_effects": g.get_log(LogId.FID_SUPPORTED_EFFECTS, 1024),
        "log_smart": g.get_log(LogId.SMART, 512),
        "log_fw": g.get_log(LogId.FW_SLOT, 512),
    }
    caps = []
    for fid in range(256):
        comp, _ = g.admin(cmd.get_features(fid, 3), check=False)
        caps.append((fid, comp.status, comp.dw0))
        if comp.ok and fid != 0x0E:  # SEL 1h too; the timestamp's value is a clock
            comp, _ = g.admin(cmd.get_features(fid, 1), check=False)
            caps.append((fid, comp.status, comp.dw0))
    view["features"] = caps
    return view


def export_on(pf: NvmeDriver, vfn: int, template: Template, nsid: int) -> int:
    return hx.export_vf(pf, vfn, template.uuid, nsid, ensid=1, ecntlid=ECNTLID)


# ============================================================================ the consistent lie
def test_vfs_on_two_models_with_the_same_exported_state_are_byte_identical(dev_a, dev_b):
    pa, pb = started(dev_a.pf), started(dev_b.pf)
    # source: vendor-a, VF 1, underlying namespace 1
    ns_a = create_ns(pa)
    esub_a = export_on(pa, 1, GENERIC, ns_a)
    hv.bring_up_vf(pa, 1, nvq=3, nvi=2)
    state = hx.get_config_state(pa, esub_a)
    # destination: vendor-b, VF 3, a second namespace so that the underlying NSIDs differ
    create_ns(pb, 64)
    ns_b = create_ns(pb)
    assert ns_b != ns_a
    esub_b, _ = hx.create(pb, hx.template_index(pb, GENERIC.uuid))
    assert hx.template_index(pa, GENERIC.uuid) != hx.template_index(pb, GENERIC.uuid)  # indexes are per device
    assert hx.set_config_state(pb, state, esub_b) == esub_b
    assert hx.get_config_state(pb, esub_b) == state  # the destination recreated the same exported subsystem
    hx.associate_namespace(pb, esub_b, 1, ns_b)
    hx.associate_controllers(pb, esub_b, [(3, ECNTLID)])
    hv.bring_up_vf(pb, 3, nvq=3, nvi=2)
    ga, gb = started(dev_a.vf(1), 0x4000_0000), started(dev_b.vf(3), 0x4000_0000)

    va, vb = vf_view(ga), vf_view(gb)
    for key in va:
        assert va[key] == vb[key], key

    # and it is the template talking, not either device
    cs = ConfigState.decode(state)
    idc = IdentifyController.decode(va["id_ctrl"])
    assert (idc.vid, idc.ssvid, idc.mn, idc.fr, idc.mdts, idc.nn) == (0x1B36, 0x1AF4, "nvme-lm Virtual NVMe SSD",
                                                                      "GV1.0", 5, 16)
    assert (idc.cntlid, idc.sn, idc.subnqn) == (ECNTLID, cs.serial, cs.nqn)
    assert idc.sn.startswith("NLX") and idc.sn != dev_a.subsystem.serial
    assert IdentifyController.decode(pa.identify(CNS.CTRL)).vid == MODEL_A.vendor_id  # the PF is still vendor-a
    idn = IdentifyNamespace.decode(va["id_ns"])
    assert (idn.nsze, idn.ncap, idn.nuse, idn.nguid) == (BLOCKS, BLOCKS, BLOCKS, cs.namespaces[0].nguid)
    descs = dict(decode_ns_descs(va["ns_descs"]))
    assert descs[NidType.NGUID] == cs.namespaces[0].nguid
    assert descs[NidType.UUID] != uuid.UUID(dev_a.subsystem.namespaces[ns_a].info.uuid).bytes  # no leak
    assert decode_nsid_list(va["active"]) == [1]
    assert (ga.fn.bar0.read64(Reg.CAP) & 0xFFFF) == GENERIC.mqes != MODEL_A.max_queue_entries - 1
    effects = CommandEffectsLog.decode(va["log_effects"])
    assert not effects.io_supported(IO.COMPARE) and not effects.admin_supported(A.DOORBELL_BUFFER_CONFIG)

    # the data path uses the ENSID on both; an underlying NSID is not visible
    for g in (ga, gb):
        g.set_number_of_queues(1, 1)
        q = g.create_io_queue(1, 16, vector=1)
        data = os.urandom(8 * 512)
        assert q.write(1, 10, data, 512).ok
        assert q.read(1, 10, 8, 512) == data
    comp, _ = gb.io_queues[1].run(cmd.read(ns_b, 0, 1), read=512, check=False)
    refused(comp, st.INVALID_NAMESPACE)
    # the PF sees where things are
    assert hx.underlying_controllers(pa, esub_a) == [1] and hx.underlying_controllers(pb, esub_b) == [3]
    assert [(e.ensid, e.unsid, e.nsze, e.lbads) for e in hx.exported_namespaces(pb, esub_b)] == [(1, ns_b, BLOCKS, 9)]
    assert [(e.ecntlid, e.cntlid) for e in hx.exported_controllers(pa, esub_a)] == [(ECNTLID, 1)]
    entry = hx.list_subsystems(pa)[0]
    assert (entry.esubid, entry.nctrl, entry.nns, entry.actrl, entry.ans) == (esub_a, 1, 1, 1, 1)
    assert uuid.UUID(bytes=entry.template) == GENERIC.uuid and entry.sn == cs.serial


def test_template_lists_and_validation_against_models():
    caps_a, caps_b = capabilities_for(MODEL_A), capabilities_for(MODEL_B)
    GENERIC.check(caps_a)
    GENERIC.check(caps_b)
    LARGE.check(caps_a)
    with pytest.raises(TemplateError) as e:
        LARGE.check(caps_b)
    msg = str(e.value)
    assert "MDTS 8 exceeds the device's MDTS 5" in msg and "CAP.MQES 4095" in msg and "vendor-b" in msg

    assert Template.builtin_names() == ["dc-large-v1", "generic-v1"]
    src = _generic_text()

    def problems(old: str, new: str) -> str:
        assert old in src, old
        with pytest.raises(TemplateError) as err:
            Template.from_toml(src.replace(old, new)).check(caps_b)
        return str(err.value)

    assert "LBA format 8192 B is not one of the device's" in problems("{ ms = 0, lbads = 12, rp = 0 }",
                                                                         "{ ms = 0, lbads = 13, rp = 0 }")
    assert "I/O command 0x19: the device does not implement it" in problems(
        "0x0C = 0x00000001  # Verify", "0x0C = 0x00000001\n0x19 = 0x00000001")
    assert "admin command 0x80: the device does not implement it for a VF" in problems(
        "0x18 = 0x00000001  # Keep Alive", "0x18 = 0x00000001\n0x80 = 0x00000001")  # Format NVM: privileged
    assert "ONCS bit 0" in problems("0x02 = 0x00000001  # Read", "0x02 = 0x00000001\n0x05 = 0x00000001")
    assert "hide effects" in problems("0x01 = 0x00100003  # Write:", "0x01 = 0x00000001  #")
    assert "feature 0x0e cannot be saveable" in problems(
        "default = 0x0\nsaveable = false\nchangeable = true\n[features.0x0F]",
        "default = 0x0\nsaveable = true\nchangeable = true\n[features.0x0F]")
    assert "mandatory log page 0x02 missing" in problems("0x00, 0x01, 0x02, 0x03", "0x00, 0x01, 0x03")
    # structural errors are refused when the file is read, naming the key
    with pytest.raises(TemplateError, match="unknown keys bogus"):
        Template.from_toml(src.replace("[identify_controller]", "[identify_controller]\nbogus = 1"))
    with pytest.raises(TemplateError, match="Number of Queues has no default"):
        Template.from_toml(src.replace("[features.0x07]  # Number of Queues", "[features.0x07]\ndefault = 1"))
    with pytest.raises(TemplateError, match="lacks mdts"):
        Template.from_toml(src.replace("mdts = 5", ""))


def _generic_text() -> str:
    from importlib import resources

    return resources.files("nvme_lm.device").joinpath("templates", "generic-v1.toml").read_text()


def test_template_uuid_list_and_unknown_templates(dev_a, dev_b):
    pa, pb = started(dev_a.pf), started(dev_b.pf)
    assert hx.template_uuids(pa) == [LARGE.uuid, GENERIC.uuid]  # CNS 22h, in ENSTI order
    assert hx.template_uuids(pb) == [GENERIC.uuid]  # vendor-b cannot present dc-large-v1
    with pytest.raises(LookupError):
        hx.template_index(pb, LARGE.uuid)
    before = snapshot(dev_b, pb)
    # an index beyond the list, and no template at all (TR clear): Invalid Field, nothing created
    for cdw11 in (1 << 31 | 1, 1 << 31 | 0xFF, 0):
        comp, _ = pb.admin(hx.receive(ReceiveSel.CREATE, 256, cdw11=cdw11), read=256, check=False)
        refused(comp, st.INVALID_FIELD)
    assert snapshot(dev_b, pb) == before
    # a configuration state naming a template the device cannot present: 44h at the template UUID
    ns = create_ns(pa)
    esub = export_on(pa, 1, LARGE, ns)
    state = hx.get_config_state(pa, esub)
    before = snapshot(dev_b, pb)
    comp = _set_state(pb, state)
    refused(comp, st.INVALID_EXPORTED_CONFIGURATION_STATE)
    assert comp.dw0 == 4  # DWLOC 4 (bytes 16-31: template UUID), BITLOC 0
    unknown = _patched(state, 16, uuid.uuid4().bytes)
    comp = _set_state(pb, unknown)
    refused(comp, st.INVALID_EXPORTED_CONFIGURATION_STATE)
    assert comp.dw0 == 4
    assert snapshot(dev_b, pb) == before


def _set_state(pf: NvmeDriver, blob: bytes, esubid: int | None = None):
    data = blob + bytes(-len(blob) % 4)
    comp, _ = pf.admin(hx.send(SendSel.SET_CONFIG_STATE, esubid=esubid, length=len(data)), data=data, check=False)
    return comp


def _patched(blob: bytes, offset: int, value: bytes, *, fix_crc: bool = True) -> bytes:
    out = bytearray(blob)
    out[offset : offset + len(value)] = value
    if fix_crc:
        out[12:16] = bytes(4)
        out[12:16] = struct.pack("<I", zlib.crc32(out))
    return bytes(out)


# ============================================================================ the VF's command set
def test_a_bound_vf_refuses_what_its_template_lacks_exactly_like_unsupported(dev_a):
    pa = started(dev_a.pf)
    ns = create_ns(pa)
    other = create_ns(pa)
    export_on(pa, 1, GENERIC, ns)
    for vfn in (1, 2):
        hv.bring_up_vf(pa, vfn, nvq=2, nvi=1)
    pa.attach_namespace(other, [2])
    g, plain = started(dev_a.vf(1), 0x4000_0000), started(dev_a.vf(2), 0x8000_0000)
    g.set_number_of_queues(1, 1)
    plain.set_number_of_queues(1, 1)
    q, pq = g.create_io_queue(1, 16, vector=0), plain.create_io_queue(1, 16, vector=0)
    # I/O and admin commands the device has but the template does not: Invalid Command Opcode
    comp, _ = q.run(cmd.compare(1, 0, 1), data=bytes(512), check=False)
    refused(comp, st.INVALID_OPCODE)
    assert pq.run(cmd.compare(other, 0, 1), data=bytes(512), check=False)[0].ok  # an unbound VF has Compare
    shadow = g.mem.alloc(8192)
    comp, _ = g.admin(cmd.doorbell_buffer_config(shadow, shadow + 4096), check=False)
    refused(comp, st.INVALID_OPCODE)
    plain_effects = CommandEffectsLog.decode(plain.get_log(LogId.CMD_EFFECTS, 4096))
    assert plain_effects.admin_supported(A.DOORBELL_BUFFER_CONFIG) and plain_effects.io_supported(IO.COMPARE)
    # a log page outside the template: Invalid Log Page; a feature: Invalid Field; a CNS: Invalid Field
    for lid in (LogId.RATE_LIMITING, LogId.DEVICE_SELF_TEST, 0x7F):
        comp, _ = g.admin(cmd.get_log_page(lid, 128), read=512, check=False)
        refused(comp, st.INVALID_LOG_PAGE)
    for fid in (0x03, 0x05, 0x28):
        refused(g.admin(cmd.get_features(fid, 0), check=False)[0], st.INVALID_FIELD)
        refused(g.admin(cmd.set_features(fid, 0), check=False)[0], st.INVALID_FIELD)
    for cns in (CNS.ALLOCATED_NS_LIST, CNS.CTRL_LIST, CNS.SECONDARY_CTRL_LIST, CNS.EXPORTED_TEMPLATE_UUID_LIST):
        refused(g.admin(cmd.identify(cns), read=4096, check=False)[0], st.INVALID_FIELD)
    # the limits it reports are the ones it enforces: MDTS 5 (128 KiB) although vendor-a moves 1 MiB
    comp, _ = q.run(cmd.read(1, 0, 512), read=256 << 10, check=False)
    refused(comp, st.INVALID_FIELD)
    assert q.run(cmd.read(1, 0, 256), read=128 << 10)[0].ok
    assert plain.identify(CNS.CTRL) != g.identify(CNS.CTRL)
    # NN 16: NSID 17 is invalid, NSID 2 (valid, not exported) is inactive, the underlying NSID is not visible
    refused(g.admin(cmd.identify(CNS.NS, nsid=17), read=4096, check=False)[0], st.INVALID_NAMESPACE)
    assert g.identify(CNS.NS, nsid=2) == bytes(4096)
    refused(q.run(cmd.read(other, 0, 1), read=512, check=False)[0], st.INVALID_NAMESPACE)
    # the exported-subsystem commands themselves are privileged: Invalid Opcode on any VF
    for op in (A.MANAGE_EXPORTED_NVM_SUBSYSTEM_RECEIVE, A.MANAGE_EXPORTED_NVM_SUBSYSTEM_SEND,
               A.MANAGE_EXPORTED_NAMESPACE):
        for drv in (g, plain):
            refused(drv.admin(SQE(opcode=op, cdw10=1), check=False)[0], st.INVALID_OPCODE)
    refused(plain.admin(cmd.identify(CNS.UNDERLYING_CTRL_LIST), read=4096, check=False)[0], st.INVALID_FIELD)


def test_namespace_changes_reach_the_vf_as_ensids(dev_b):
    pb = started(dev_b.pf)
    ns1, ns2 = create_ns(pb), create_ns(pb, 64)
    esub = export_on(pb, 1, GENERIC, ns1)
    hv.bring_up_vf(pb, 1, nvq=2, nvi=1)
    g = started(dev_b.vf(1), 0x4000_0000)
    g.set_features(0x0B, 1 << 8)  # Namespace Attribute Notices
    for change, active in ((lambda: hx.associate_namespace(pb, esub, 5, ns2), [1, 5]),
                           (lambda: hx.disassociate_namespace(pb, esub, 5), [1])):
        aer = g.submit_aer()
        change()
        c = g.admin_q.wait(aer, 2.0)
        assert (c.dw0 & 0x7, (c.dw0 >> 8) & 0xFF, (c.dw0 >> 16) & 0xFF) == (2, 0x00, LogId.CHANGED_NS)
        assert decode_nsid_list(g.get_log(LogId.CHANGED_NS, 4096)) == [5]  # the ENSID, not NSID 2
        assert decode_nsid_list(g.get_log(LogId.CHANGED_NS, 4096)) == []  # read without RAE: cleared
        assert decode_nsid_list(g.identify(CNS.NS_ACTIVE_LIST)) == active
    assert IdentifyNamespace.decode(g.identify(CNS.NS, nsid=5)) == IdentifyNamespace()  # inactive again


def test_a_device_without_vfs_has_no_exported_subsystems(driver):
    for op in (A.MANAGE_EXPORTED_NVM_SUBSYSTEM_RECEIVE, A.MANAGE_EXPORTED_NVM_SUBSYSTEM_SEND,
               A.MANAGE_EXPORTED_NAMESPACE):
        refused(driver.admin(SQE(opcode=op), check=False)[0], st.INVALID_OPCODE)
    for cns in (CNS.UNDERLYING_CTRL_LIST, CNS.EXPORTED_TEMPLATE_UUID_LIST):
        refused(driver.admin(cmd.identify(cns), read=4096, check=False)[0], st.INVALID_FIELD)


# ============================================================================ life cycle and refusals
def test_delete_and_disassociation_follow_the_association_rules(dev_a):
    pa = started(dev_a.pf)
    ns = create_ns(pa)
    esub = export_on(pa, 1, GENERIC, ns)
    hv.bring_up_vf(pa, 1, nvq=2, nvi=1)
    g = started(dev_a.vf(1), 0x4000_0000)
    before = snapshot(dev_a, pa)
    # delete while a controller and a namespace are associated: Command Sequence Error
    refused(pa.admin(hx.send(SendSel.DELETE, esubid=esub), check=False)[0], st.COMMAND_SEQUENCE_ERROR)
    # the VF is enabled: its personality cannot change under its host
    data = encode_controller_pairs([(1, ECNTLID)])
    comp, _ = pa.admin(hx.send(SendSel.ASSOCIATE_CONTROLLERS, esubid=esub, mos=1, length=len(data)), data=data,
                       check=False)
    refused(comp, st.CONTROLLER_ACTIVE)
    # set state over an exported subsystem with associations: Command Sequence Error
    refused(_set_state(pa, hx.get_config_state(pa, esub), esub), st.COMMAND_SEQUENCE_ERROR)
    assert snapshot(dev_a, pa) == before
    g.shutdown()  # disabled now: the hypervisor may take the VF out
    hx.disassociate_controllers(pa, esub, [(1, ECNTLID)])
    refused(pa.admin(hx.send(SendSel.DELETE, esubid=esub), check=False)[0], st.COMMAND_SEQUENCE_ERROR)  # the ns
    hx.disassociate_namespace(pa, esub, 1)
    kept = ConfigState.decode(hx.get_config_state(pa, esub))
    assert [c.ecntlid for c in kept.controllers] == [ECNTLID] and [n.ensid for n in kept.namespaces] == [1]
    # the VF is the device again
    g.start()
    idc = IdentifyController.decode(g.identify(CNS.CTRL))
    assert (idc.vid, idc.cntlid, idc.mdts) == (MODEL_A.vendor_id, 1, MODEL_A.mdts)
    assert decode_nsid_list(g.identify(CNS.NS_ACTIVE_LIST)) == []
    hx.delete(pa, esub)
    assert hx.list_subsystems(pa) == [] and dev_a.exported.subsystems == {}
    refused(pa.admin(hx.send(SendSel.DELETE, esubid=esub), check=False)[0], st.INVALID_NVM_SUBSYSTEM)


def test_association_refusals_change_nothing(dev_a):
    pa = started(dev_a.pf)
    ns1, ns2, ns3 = create_ns(pa), create_ns(pa), create_ns(pa, BLOCKS * 2)
    esub = export_on(pa, 1, GENERIC, ns1)
    other, _ = hx.create(pa, hx.template_index(pa, GENERIC.uuid))
    hv.bring_up_vf(pa, 2, nvq=2, nvi=1)
    started(dev_a.vf(2), 0x4000_0000)  # VF 2 enabled by its host

    def pairs(esubid: int | None, p: list[tuple[int, int]], mos: int = 0):
        data = encode_controller_pairs(p)
        return pa.admin(hx.send(SendSel.ASSOCIATE_CONTROLLERS, esubid=esubid, mos=mos, length=len(data)),
                        data=data, check=False)[0]

    def ns_cmd(esubid: int | None, ensid: int, unsid: int, sel: int = ExportedNsSel.ASSOCIATE):
        return pa.admin(hx.manage_exported_namespace(sel, esubid or 0) if esubid is not None else
                        SQE(opcode=A.MANAGE_EXPORTED_NAMESPACE, cdw10=sel),
                        data=ExportedNsAssociation(ensid=ensid, unsid=unsid).encode(), check=False)[0]

    before = snapshot(dev_a, pa)
    cases = [
        (pairs(other, [(0, 5)]), st.INVALID_CONTROLLER_IDENTIFIER),  # the primary is not exportable
        (pairs(other, [(99, 5)]), st.INVALID_CONTROLLER_IDENTIFIER),
        (pairs(other, [(1, 5)]), st.INVALID_EXPORTED_ASSOCIATION),  # VF 1 belongs to `esub`
        (pairs(other, [(3, 5), (4, 5)]), st.INVALID_EXPORTED_ASSOCIATION),  # ECNTLID twice
        (pairs(other, [(3, 0xFFF0)]), st.INVALID_EXPORTED_ASSOCIATION),
        (pairs(esub, [(3, ECNTLID)]), st.INVALID_EXPORTED_ASSOCIATION),  # ECNTLID taken by VF 1
        (pairs(other, [(3, 5), (2, 6)]), st.CONTROLLER_ACTIVE),  # VF 2 is enabled: nothing associated
        (pairs(other, []), st.INVALID_FIELD),
        (pairs(None, [(3, 5)]), st.INVALID_FIELD),  # ESUBIDV clear
        (pairs(0x77, [(3, 5)]), st.INVALID_NVM_SUBSYSTEM),
        (pairs(other, [(3, 5)], mos=1), st.INVALID_EXPORTED_ASSOCIATION),  # not associated
        (pairs(other, [(3, 5)], mos=2), st.INVALID_FIELD),
        (ns_cmd(other, 17, ns2), st.INVALID_NAMESPACE),  # ENSID beyond NN 16
        (ns_cmd(other, 0, ns2), st.INVALID_NAMESPACE),
        (ns_cmd(other, 1, 42), st.INVALID_NAMESPACE),  # no such underlying namespace
        (ns_cmd(other, 1, ns1), st.INVALID_EXPORTED_ASSOCIATION),  # already exported by `esub`
        (ns_cmd(esub, 1, ns2), st.INVALID_EXPORTED_ASSOCIATION),  # ENSID 1 taken
        (ns_cmd(other, 1, ns2, ExportedNsSel.DISASSOCIATE), st.INVALID_EXPORTED_ASSOCIATION),
        (ns_cmd(other, 1, ns2, 3), st.INVALID_FIELD),
        (ns_cmd(None, 1, ns2), st.INVALID_FIELD),
        (ns_cmd(0x77, 1, ns2), st.INVALID_NVM_SUBSYSTEM),
    ]
    for i, (comp, status) in enumerate(cases):
        assert comp.st == status, (i, comp.st, status)
        assert comp.status & 0x4000
    assert snapshot(dev_a, pa) == before
    # an ENSID reserved by a configuration state takes only a namespace of its size and format
    hx.disassociate_controllers(pa, esub, [(1, ECNTLID)])
    hx.disassociate_namespace(pa, esub, 1)
    before = snapshot(dev_a, pa)
    refused(ns_cmd(esub, 1, ns3), st.INVALID_EXPORTED_ASSOCIATION)
    assert snapshot(dev_a, pa) == before
    hx.associate_namespace(pa, esub, 1, ns2)  # same size: takes ENSID 1's identity
    assert hx.config_state(pa, esub) == ConfigState.decode(before[1][1][0][0])


def test_bad_configuration_state_blobs_are_refused_with_their_location(dev_a):
    pa = started(dev_a.pf)
    ns = create_ns(pa)
    src = export_on(pa, 1, GENERIC, ns)
    state = hx.get_config_state(pa, src)
    target, _ = hx.create(pa, hx.template_index(pa, GENERIC.uuid))
    cs = ConfigState.decode(state)
    good = dataclasses.replace(cs, nqn="nqn.2024-01.io.nvme-lm:test").encode()  # an NQN not in use here
    n_off = 352 + 16 * len(cs.controllers)  # first namespace entry
    cases = {
        "truncated body": (good[:-64], (len(good) - 64) // 4, 0),
        "truncated header": (good[:40], 10, 0),
        "magic": (_patched(good, 0, b"XLES"), 0, 0),
        "version": (_patched(good, 4, struct.pack("<H", 2)), 1, 0),
        "header size": (_patched(good, 6, struct.pack("<H", 32)), 1, 16),
        "size field": (_patched(good, 8, struct.pack("<I", len(good) + 16)), 2, 0),
        "crc": (_patched(good, 340 - 20, b"Z", fix_crc=False), 3, 0),  # SN changed, CRC not
        "reserved": (_patched(good, 40, b"\x01"), 10, 0),
        "nqn": (_patched(good, 64, b"xqn."), 16, 0),
        "ensid beyond NN": (_patched(good, n_off, struct.pack("<I", 17)), n_off // 4, 0),
        "lbads": (_patched(good, n_off + 16, b"\x0d"), n_off // 4 + 4, 0),
        "ecntlid": (_patched(good, 352, struct.pack("<H", 0xFFFF)), 88, 0),
    }
    for esubid in (target, None):
        before = snapshot(dev_a, pa)
        for name, (blob, dwloc, bitloc) in cases.items():
            comp = _set_state(pa, blob, esubid)
            assert comp.st == st.INVALID_EXPORTED_CONFIGURATION_STATE, name
            assert comp.status & 0x4000
            assert comp.dw0 == dwloc | bitloc << 27, (name, comp.dw0, dwloc)
        assert snapshot(dev_a, pa) == before
    # the good blob is accepted into the target...
    assert hx.set_config_state(pa, good, target) == target
    assert hx.get_config_state(pa, target) == good
    # ...but not a second time on the same device: its NQN is in use now (DWLOC 16: ESUBNQN)
    comp = _set_state(pa, good)
    refused(comp, st.INVALID_EXPORTED_CONFIGURATION_STATE)
    assert comp.dw0 == 16
    # with ESUBIDV clear it makes a new exported subsystem; DW0 is its ESUBID
    hx.delete(pa, target)
    new = hx.set_config_state(pa, good)
    assert new != src and hx.get_config_state(pa, new) == good


def test_exported_subsystems_survive_a_power_cycle(tmp_path):
    dev = EmulatedSsd(tmp_path / "p", MODEL_B)
    try:
        pf = started(dev.pf)
        ns = create_ns(pf)
        esub = export_on(pf, 2, GENERIC, ns)
        hv.bring_up_vf(pf, 2, nvq=2, nvi=1)
        g = started(dev.vf(2), 0x4000_0000)
        before = vf_view(g)
        state = hx.get_config_state(pf, esub)
    finally:
        dev.power_off()
    dev = EmulatedSsd(tmp_path / "p", MODEL_B)
    try:
        pf = started(dev.pf)
        assert hx.get_config_state(pf, esub) == state  # same serial, NQN, identifiers: drawn once
        hv.bring_up_vf(pf, 2, nvq=2, nvi=1)
        g = started(dev.vf(2), 0x4000_0000)
        after = vf_view(g)
        for key in before:
            assert before[key] == after[key], key
    finally:
        dev.power_off()
    # a data directory whose exported subsystem uses a template the device cannot present is refused
    path = tmp_path / "p" / "exported.json"
    data = json.loads(path.read_text())
    data["subsystems"][0]["template"] = str(LARGE.uuid)
    path.write_text(json.dumps(data))
    dev = EmulatedSsd(tmp_path / "other", MODEL_B)
    try:
        with pytest.raises(ValueError, match="cannot present"):
            ExportedSubsystems(dev.subsystem, capabilities_for(MODEL_B), state_file=path)
    finally:
        dev.power_off()
