"""Identify through the real admin queue: what the controller reports must match the device."""

from __future__ import annotations

import os
import struct
import uuid

import pytest

from nvme_lm.host import commands as cmd
from nvme_lm.host.qpair import NvmeCommandError
from nvme_lm.spec import status as st
from nvme_lm.spec.identify import (
    OACS,
    ONCS,
    IdentifyController,
    IdentifyNamespace,
    NidType,
    NvmIdentifyController,
    decode_ctrl_list,
    decode_ns_descs,
    decode_nsid_list,
)
from nvme_lm.spec.registers import Cap, Reg


def _status(driver, sqe) -> st.Status:
    comp, _ = driver.admin(sqe, read=4096, check=False)
    return comp.st


def test_identify_controller_matches_model_and_subsystem(ssd, driver):
    idc = IdentifyController.decode(driver.identify(0x01))
    m = ssd.model
    assert idc.vid == m.vendor_id and idc.ssvid == m.subsystem_vendor_id
    assert idc.sn == ssd.subsystem.serial
    assert idc.mn == m.model_number and idc.fr == m.firmware_revision
    assert idc.mdts == m.mdts and idc.cntlid == ssd.primary.cntlid
    assert idc.ver == 0x00020100 and idc.nn == m.max_namespaces
    assert idc.subnqn == ssd.subsystem.nqn
    assert idc.sqes == 0x66 and idc.cqes == 0x44
    assert idc.elpe == m.error_log_entries - 1 and idc.aerl == m.aerl
    assert idc.hmpre == 0
    # capability bits follow the dispatch table, so they cannot claim what is not implemented
    assert bool(idc.oacs & OACS.GET_LBA_STATUS) == (0x86 in ssd.primary.admin_handlers)
    assert bool(idc.oncs & ONCS.WRITE_ZEROES) == (0x08 in ssd.primary.io_handlers)
    assert idc.tnvmcap == m.capacity_bytes


def test_identify_namespace_reports_size_format_and_usage(ssd, driver, ns1):
    idns = IdentifyNamespace.decode(driver.identify(0x00, nsid=ns1.nsid))
    assert idns.nsze == ns1.nsze == idns.ncap
    assert idns.lbaf[idns.format_index].lbads == 9
    assert idns.nuse == 0
    assert idns.nguid == bytes.fromhex(ns1.info.nguid)
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 16)
    q.write(ns1.nsid, 4096, os.urandom(4096), 512)
    idns = IdentifyNamespace.decode(driver.identify(0x00, nsid=ns1.nsid))
    assert idns.nuse >= 8  # at least the 8 blocks written (the file system may allocate more)


def test_identify_namespace_inactive_is_zero_and_invalid_is_refused(ssd, driver, ns1):
    other = ssd.subsystem.create_namespace(nsze=1024, lba_size=4096)  # allocated, not attached
    assert driver.identify(0x00, nsid=other.nsid) == bytes(4096)
    assert IdentifyNamespace.decode(driver.identify(0x11, nsid=other.nsid)).nsze == 1024
    assert _status(driver, cmd.identify(0x00, nsid=0)) == st.INVALID_NAMESPACE
    assert _status(driver, cmd.identify(0x00, nsid=0xFFFFFFF0)) == st.INVALID_NAMESPACE
    common = IdentifyNamespace.decode(driver.identify(0x00, nsid=0xFFFFFFFF))
    assert [f.lbads for f in common.lbaf[: common.nlbaf + 1]] == [9, 12]


def test_namespace_lists(ssd, driver, ns1):
    other = ssd.subsystem.create_namespace(nsze=1024, lba_size=512)
    assert decode_nsid_list(driver.identify(0x02)) == [ns1.nsid]
    assert decode_nsid_list(driver.identify(0x10)) == sorted([ns1.nsid, other.nsid])
    assert decode_nsid_list(driver.identify(0x02, nsid=ns1.nsid)) == []
    assert _status(driver, cmd.identify(0x02, nsid=0xFFFFFFFF)) == st.INVALID_NAMESPACE
    assert decode_ctrl_list(driver.identify(0x12, nsid=ns1.nsid)) == [ssd.primary.cntlid]
    assert decode_ctrl_list(driver.identify(0x12, nsid=other.nsid)) == []
    assert decode_ctrl_list(driver.identify(0x13)) == [ssd.primary.cntlid]


def test_namespace_descriptors(driver, ns1):
    descs = dict(decode_ns_descs(driver.identify(0x03, nsid=ns1.nsid)))
    assert descs[NidType.EUI64] == bytes.fromhex(ns1.info.eui64)
    assert descs[NidType.NGUID] == bytes.fromhex(ns1.info.nguid)
    assert descs[NidType.UUID] == uuid.UUID(ns1.info.uuid).bytes
    assert descs[NidType.CSI] == b"\x00"
    assert _status(driver, cmd.identify(0x03, nsid=77)) == st.INVALID_NAMESPACE


def test_command_set_specific_structures(driver, ns1):
    nvm = NvmIdentifyController.decode(driver.identify(0x06, csi=0))
    assert nvm.ver == 0x00010100
    assert len(driver.identify(0x05, nsid=ns1.nsid, csi=0)) == 4096
    assert _status(driver, cmd.identify(0x06, csi=2)) == st.INVALID_FIELD


def test_io_command_set_combinations_list_nvm_alone(driver):
    """CAP.CSS bit 6 (one or more I/O command sets) promises CNS 1Ch; nvme-cli's id-iocs reads it."""
    assert Cap.decode(driver.fn.bar0.read64(Reg.CAP)).css & 0x41 == 0x41
    data = driver.identify(0x1C, cntid=IdentifyController.decode(driver.identify(0x01)).cntlid)
    vectors = struct.unpack("<512Q", data)
    assert vectors[0] == 1 and not any(vectors[1:])  # combination 0: the NVM command set (CSI 0) alone


@pytest.mark.parametrize("cns", [0x04, 0x07, 0x08, 0x30, 0xFF])
def test_unsupported_cns_is_invalid_field(driver, cns):
    with pytest.raises(NvmeCommandError) as e:
        driver.identify(cns)
    assert e.value.status == st.INVALID_FIELD
