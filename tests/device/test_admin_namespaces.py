"""Namespace Management and Namespace Attachment, with the notices they raise."""

from __future__ import annotations

import os
import time

import pytest

from nvme_lm.device.controller import Controller
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.host import commands as cmd
from nvme_lm.host.driver import NvmeDriver
from nvme_lm.pcie.function import PcieFunction, PcieIds
from nvme_lm.spec import status as st
from nvme_lm.spec.identify import IdentifyNamespace, decode_nsid_list, encode_ctrl_list
from nvme_lm.spec.logs import decode_changed_ns_list
from nvme_lm.vm.memory import GuestMemory

AEC = 0x0B
NOTICE_NS_CHANGED = (2, 0x00, 0x04)
MIB = 1 << 20


def ns_buffer(nsze, *, ncap=None, flbas=0, dps=0, nmic=1) -> bytes:
    return IdentifyNamespace(nsze=nsze, ncap=nsze if ncap is None else ncap, flbas=flbas, dps=dps,
                             nmic=nmic).encode()


def create_status(driver, data, *, csi=0):
    comp, _ = driver.admin(cmd.ns_create(csi), data=data, check=False)
    return comp.st


def attach_status(driver, nsid, cntlids, *, attach=True, raw=None):
    data = raw if raw is not None else encode_ctrl_list(cntlids)
    comp, _ = driver.admin(cmd.ns_attach(nsid, attach=attach), data=data, check=False)
    return comp.st


def active(driver):
    return decode_nsid_list(driver.identify(0x02))


def allocated(driver):
    return decode_nsid_list(driver.identify(0x10))


def changed(driver, rae=False):
    return decode_changed_ns_list(driver.get_log(0x04, 4096, rae=rae))


def fields(dw0):
    return dw0 & 7, (dw0 >> 8) & 0xFF, (dw0 >> 16) & 0xFF


def snapshot(ssd):
    sub = ssd.subsystem
    return ({n: (ns.nsze, ns.lba_size) for n, ns in sub.namespaces.items()},
            {n: set(c) for n, c in sub.attached.items()}, sub.allocated_capacity_bytes)


class Second:
    """Another controller of the same subsystem, on its own function, with its own host."""

    def __init__(self, ssd: EmulatedSsd) -> None:
        m = ssd.model
        self.fn = PcieFunction(PcieIds(m.vendor_id, m.device_id, m.subsystem_vendor_id, m.subsystem_id),
                               msix_vectors=4, name="fn-test")
        self.cntlid = max(ssd.subsystem.controllers) + 1
        self.ctrl = Controller(ssd.subsystem, self.cntlid, self.fn)
        self.mem = GuestMemory(4 * MIB)
        self.fn.iommu.map(self.mem.base, self.mem.buf)
        self.driver = NvmeDriver(self.fn, self.mem, timeout=5.0)
        self.driver.start()


@pytest.fixture
def second(ssd):
    return Second(ssd)


# ---------------------------------------------------------------------------------- create
def test_create_attach_use_detach_delete(ssd, driver):
    nsid = driver.create_namespace((8 * MIB) // 4096, lba_index=1)
    ns = ssd.subsystem.namespaces[nsid]
    assert (ns.nsze, ns.lba_size) == (2048, 4096)
    assert nsid in allocated(driver) and nsid not in active(driver)
    driver.attach_namespace(nsid, [0])
    assert active(driver) == [nsid]
    idns = IdentifyNamespace.decode(driver.identify(0x00, nsid=nsid))
    assert (idns.nsze, idns.ncap, idns.flbas & 0xF) == (2048, 2048, 1)
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 16)
    data = os.urandom(4096 * 3)
    q.write(nsid, 5, data, 4096)
    assert q.read(nsid, 5, 3, 4096) == data
    driver.detach_namespace(nsid, [0])
    assert active(driver) == []
    comp, _ = q.run(cmd.read(nsid, 0, 1), read=4096, check=False)
    assert comp.st == st.INVALID_NAMESPACE
    driver.delete_namespace(nsid)
    assert allocated(driver) == [] and not ns.path.exists()


def test_create_refusals_leave_the_subsystem_unchanged(ssd, driver):
    driver.create_namespace(1000)
    before = snapshot(ssd)
    cases = [
        (ns_buffer(1000, ncap=500), st.THIN_PROVISIONING_NOT_SUPPORTED),
        (ns_buffer(1000, ncap=2000), st.INVALID_FIELD),
        (ns_buffer(0), st.INVALID_FIELD),
        (ns_buffer(1000, flbas=2), st.INVALID_FORMAT),
        (ns_buffer(1000, flbas=0x10), st.INVALID_FORMAT),  # extended LBAs: no metadata to extend
        (ns_buffer(1000, dps=1), st.INVALID_FIELD),
        (ns_buffer(1000, nmic=2), st.INVALID_FIELD),
        (ns_buffer(ssd.model.capacity_bytes // 512), st.NS_INSUFFICIENT_CAPACITY),
    ]
    for data, want in cases:
        assert create_status(driver, data) == want
        assert snapshot(ssd) == before
    assert create_status(driver, ns_buffer(1000), csi=2) == st.IO_CMD_SET_NOT_SUPPORTED
    comp, _ = driver.admin(cmd.SQE(opcode=0x0D, cdw10=2), check=False)
    assert comp.st == st.INVALID_FIELD
    assert snapshot(ssd) == before


def test_capacity_is_accounted_across_namespaces(ssd, driver):
    half = ssd.model.capacity_bytes // 2 // 4096
    driver.create_namespace(half, lba_index=1)
    driver.create_namespace(half, lba_index=1)
    before = snapshot(ssd)
    assert create_status(driver, ns_buffer(8)) == st.NS_INSUFFICIENT_CAPACITY
    assert snapshot(ssd) == before


def test_nsid_unavailable(tmp_path):
    dev = EmulatedSsd(tmp_path / "small", DeviceModel(max_namespaces=2))
    mem = GuestMemory(4 * MIB)
    dev.pf.iommu.map(mem.base, mem.buf)
    try:
        d = NvmeDriver(dev.pf, mem, timeout=5.0)
        d.start()
        assert [d.create_namespace(100), d.create_namespace(100)] == [1, 2]
        assert create_status(d, ns_buffer(100)) == st.NSID_UNAVAILABLE
        assert sorted(dev.subsystem.namespaces) == [1, 2]
        d.delete_namespace(1)
        assert d.create_namespace(100) == 1  # a freed identifier is reused
    finally:
        dev.power_off()


# ---------------------------------------------------------------------------------- delete
def test_delete_refusals_and_delete_all(ssd, driver):
    a, b = driver.create_namespace(100), driver.create_namespace(100)
    before = snapshot(ssd)
    for nsid, want in ((0, st.INVALID_NAMESPACE), (77, st.INVALID_FIELD), (0x10000, st.INVALID_NAMESPACE)):
        comp, _ = driver.admin(cmd.ns_delete(nsid), check=False)
        assert comp.st == want
        assert snapshot(ssd) == before
    driver.delete_namespace(0xFFFFFFFF)
    assert allocated(driver) == [] and not ssd.subsystem.namespaces
    assert (a, b) == (1, 2)


def test_deleting_an_attached_namespace_notifies(ssd, driver):
    nsid = driver.create_namespace(100)
    driver.attach_namespace(nsid, [0])
    changed(driver)  # clear the list
    driver.set_features(AEC, 1 << 8)
    aer = driver.submit_aer()
    driver.delete_namespace(nsid)
    assert fields(driver.admin_q.wait(aer, 2.0).dw0) == NOTICE_NS_CHANGED
    assert changed(driver) == [nsid]
    assert active(driver) == []


# ------------------------------------------------------------------------------ attachment
def test_attach_refusals_leave_attachments_unchanged(ssd, driver):
    nsid = driver.create_namespace(100)
    driver.attach_namespace(nsid, [0])
    before = snapshot(ssd)
    assert attach_status(driver, nsid, [0]) == st.NS_ALREADY_ATTACHED
    assert attach_status(driver, nsid, [], raw=bytes(4096)) == st.CONTROLLER_LIST_INVALID
    assert attach_status(driver, nsid, [max(ssd.subsystem.controllers) + 1]) == st.CONTROLLER_LIST_INVALID
    assert attach_status(driver, nsid, [0, 0], attach=False) == st.CONTROLLER_LIST_INVALID  # repeated
    assert attach_status(driver, 55, [0]) == st.INVALID_FIELD  # not allocated
    assert attach_status(driver, 0, [0]) == st.INVALID_NAMESPACE
    assert attach_status(driver, 0xFFFFFFFF, [0]) == st.INVALID_FIELD
    assert attach_status(driver, nsid, [0], attach=True) == st.NS_ALREADY_ATTACHED
    comp, _ = driver.admin(cmd.SQE(opcode=0x15, nsid=nsid, cdw10=3), data=encode_ctrl_list([0]), check=False)
    assert comp.st == st.INVALID_FIELD  # SEL 3 reserved
    assert snapshot(ssd) == before
    driver.detach_namespace(nsid, [0])
    before = snapshot(ssd)
    assert attach_status(driver, nsid, [0], attach=False) == st.NS_NOT_ATTACHED
    assert snapshot(ssd) == before


def test_attach_raises_notice_only_when_enabled(ssd, driver):
    nsid = driver.create_namespace(100)
    aer = driver.submit_aer()
    driver.attach_namespace(nsid, [0])  # AEC bit 8 clear: no event...
    time.sleep(0.05)
    driver.admin_q.reap()
    assert aer not in driver.admin_q.done
    assert changed(driver) == [nsid]  # ...but the log still lists the namespace
    assert changed(driver) == []  # read with RAE=0: cleared
    driver.set_features(AEC, 1 << 8)
    driver.detach_namespace(nsid, [0])
    assert fields(driver.admin_q.wait(aer, 2.0).dw0) == NOTICE_NS_CHANGED
    assert changed(driver, rae=True) == [nsid]
    assert changed(driver) == [nsid]


def test_attach_to_another_controller_notifies_that_controller(ssd, driver, second):
    nsid = driver.create_namespace(100)
    second.driver.set_features(AEC, 1 << 8)
    aer = second.driver.submit_aer()
    driver.attach_namespace(nsid, [second.cntlid])
    assert fields(second.driver.admin_q.wait(aer, 2.0).dw0) == NOTICE_NS_CHANGED
    assert active(second.driver) == [nsid] and active(driver) == []
    assert changed(second.driver) == [nsid]
    assert changed(driver) == []  # the issuing controller's attachments did not change


def test_private_namespace_attaches_to_one_controller_only(ssd, driver, second):
    shared = driver.create_namespace(100)
    private = driver.create_namespace(100, shared=False)
    assert ssd.subsystem.namespaces[private].info.nmic == 0
    driver.attach_namespace(shared, [0, second.cntlid])
    before = snapshot(ssd)
    assert attach_status(driver, private, [0, second.cntlid]) == st.NS_IS_PRIVATE
    assert snapshot(ssd) == before
    driver.attach_namespace(private, [second.cntlid])
    assert attach_status(driver, private, [0]) == st.NS_IS_PRIVATE
    assert sorted(active(second.driver)) == [shared, private]
