from __future__ import annotations

import os

from nvme_lm.spec import status as st
from nvme_lm.spec.registers import CSTS, Reg


def test_bring_up_and_io_roundtrip(ssd, driver, ns1):
    assert ssd.pf.bar0.read32(Reg.CSTS) & CSTS.RDY
    nsq, ncq = driver.set_number_of_queues(4, 4)
    assert (nsq, ncq) == (4, 4)
    q = driver.create_io_queue(1, 64)
    data = os.urandom(8192)
    assert q.write(ns1.nsid, 10, data, 512).ok
    assert q.read(ns1.nsid, 10, 16, 512) == data
    comp, _ = q.run(__import__("nvme_lm.host.commands", fromlist=["x"]).read(ns1.nsid, ns1.nsze, 1), read=512,
                    check=False)
    assert comp.st == st.LBA_OUT_OF_RANGE
