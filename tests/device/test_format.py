"""Format NVM: LBA format changes, secure erase settings, broadcast, refusals."""

from __future__ import annotations

import os

from nvme_lm.device.namespace import Namespace
from nvme_lm.host import commands as cmd
from nvme_lm.spec import status as st
from nvme_lm.spec.identify import IdentifyNamespace

MIB = 1 << 20


def fmt_status(driver, nsid, lbaf, *, ses=0, cdw10_extra=0):
    sqe = cmd.format_nvm(nsid, lbaf, ses=ses)
    sqe.cdw10 |= cdw10_extra
    comp, _ = driver.admin(sqe, check=False)
    return comp.st


def io_queue(driver):
    driver.set_number_of_queues(1, 1)
    return driver.create_io_queue(1, 16)


def test_format_to_4k_keeps_capacity_and_erases(ssd, driver, ns1):
    q = io_queue(driver)
    q.write(ns1.nsid, 0, os.urandom(8 * 512), 512)
    nbytes = ns1.nsze * ns1.lba_size
    driver.format_namespace(ns1.nsid, 1)
    assert (ns1.lba_size, ns1.nsze * 4096) == (4096, nbytes)
    assert ns1.allocated_bytes() == 0
    idns = IdentifyNamespace.decode(driver.identify(0x00, nsid=ns1.nsid))
    assert (idns.flbas & 0xF, idns.nsze) == (1, nbytes // 4096)
    assert q.read(ns1.nsid, 0, 1, 4096) == bytes(4096)
    data = os.urandom(2 * 4096)
    q.write(ns1.nsid, idns.nsze - 2, data, 4096)
    assert q.read(ns1.nsid, idns.nsze - 2, 2, 4096) == data
    comp, _ = q.run(cmd.read(ns1.nsid, idns.nsze, 1), read=4096, check=False)
    assert comp.st == st.LBA_OUT_OF_RANGE
    again = Namespace.open(ssd.subsystem.data_dir, ns1.nsid)  # persisted
    try:
        assert (again.lba_size, again.nsze) == (4096, nbytes // 4096)
    finally:
        again.close()


def test_user_data_erase(ssd, driver, ns1):
    q = io_queue(driver)
    q.write(ns1.nsid, 100, os.urandom(4 * 512), 512)
    driver.format_namespace(ns1.nsid, 0, ses=1)
    assert ns1.lba_size == 512 and ns1.allocated_bytes() == 0
    assert q.read(ns1.nsid, 100, 4, 512) == bytes(4 * 512)


def test_format_refusals_leave_data_and_format_alone(ssd, driver, ns1):
    q = io_queue(driver)
    data = os.urandom(4 * 512)
    q.write(ns1.nsid, 0, data, 512)
    cases = [
        (dict(nsid=ns1.nsid, lbaf=0, ses=2), st.INVALID_FIELD),  # cryptographic erase: not supported
        (dict(nsid=ns1.nsid, lbaf=0, ses=5), st.INVALID_FIELD),  # reserved
        (dict(nsid=ns1.nsid, lbaf=2), st.INVALID_FORMAT),
        (dict(nsid=ns1.nsid, lbaf=0x10), st.INVALID_FORMAT),  # via the upper index bits
        (dict(nsid=ns1.nsid, lbaf=1, cdw10_extra=1 << 5), st.INVALID_FORMAT),  # PI without metadata
        (dict(nsid=0, lbaf=1), st.INVALID_NAMESPACE),
        (dict(nsid=99, lbaf=1), st.INVALID_FIELD),  # not attached
    ]
    for kw, want in cases:
        assert fmt_status(driver, **kw) == want
        assert (ns1.lba_size, ns1.nsze) == (512, (64 * MIB) // 512)
        assert q.read(ns1.nsid, 0, 4, 512) == data


def test_broadcast_formats_every_attached_namespace(ssd, driver, ns1):
    other = driver.create_namespace(4096, lba_index=0)  # allocated, not attached
    attached2 = driver.create_namespace(2048, lba_index=0)
    driver.attach_namespace(attached2, [0])
    q = io_queue(driver)
    q.write(attached2, 0, b"\x55" * 512, 512)
    driver.format_namespace(0xFFFFFFFF, 1)
    namespaces = ssd.subsystem.namespaces
    assert namespaces[ns1.nsid].lba_size == 4096 and namespaces[attached2].lba_size == 4096
    assert namespaces[other].lba_size == 512
    assert namespaces[attached2].allocated_bytes() == 0


def test_format_notifies_the_other_controllers(ssd, driver, ns1):
    from tests.device.test_admin_namespaces import Second, changed, fields

    second = Second(ssd)
    driver.attach_namespace(ns1.nsid, [second.cntlid])
    changed(second.driver)
    second.driver.set_features(0x0B, 1 << 8)
    aer = second.driver.submit_aer()
    driver.format_namespace(ns1.nsid, 1)
    assert fields(second.driver.admin_q.wait(aer, 2.0).dw0) == (2, 0, 4)
    assert changed(second.driver) == [ns1.nsid]
    assert changed(driver) == []  # the issuing host knows what it did
