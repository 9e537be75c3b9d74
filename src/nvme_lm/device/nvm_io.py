"""NVM command set I/O commands: the data path from a submission queue to a namespace file.

Read and Write move data with one `preadv`/`pwritev` straight between the namespace file and
the DMA-mapped guest pages that the PRPs describe.
"""

from __future__ import annotations

from nvme_lm.device.namespace import Namespace
from nvme_lm.device.request import Handler, NvmeError, Request
from nvme_lm.spec import status as st
from nvme_lm.spec.opcodes import IoOpcode

PEL_NSID = 4
PEL_SLBA = 40
PEL_NLB = 48
FUA = 1 << 30


def namespace_of(req: Request) -> Namespace:
    ns = req.ctrl.namespace(req.sqe.nsid)
    if ns is None:
        raise NvmeError(st.INVALID_NAMESPACE, f"namespace {req.sqe.nsid} not attached", PEL_NSID)
    return ns


def lba_range(req: Request, ns: Namespace) -> tuple[int, int]:
    """(SLBA, NLB) from CDW10-12, checked against the namespace size."""
    sqe = req.sqe
    slba = sqe.cdw10 | sqe.cdw11 << 32
    nlb = (sqe.cdw12 & 0xFFFF) + 1
    if slba + nlb > ns.nsze:
        raise NvmeError(st.LBA_OUT_OF_RANGE, f"LBA {slba}+{nlb} beyond {ns.nsze}", PEL_SLBA)
    return slba, nlb


def transfer_length(req: Request, ns: Namespace, nlb: int) -> int:
    nbytes = nlb << ns.lba_shift
    mdts = req.ctrl.model.mdts
    if mdts and nbytes > (req.ctrl.page_size << mdts):
        raise NvmeError(st.INVALID_FIELD, f"{nbytes} bytes exceeds MDTS", PEL_NLB)
    return nbytes


def read(req: Request) -> st.Status:
    ns = namespace_of(req)
    slba, nlb = lba_range(req, ns)
    nbytes = transfer_length(req, ns, nlb)
    views = req.data_views(nbytes, to_host=True)
    ns.read_into(slba, views)
    req.ctrl.subsystem.smart.on_read(nbytes)
    return st.SUCCESS


def write(req: Request) -> st.Status:
    ns = namespace_of(req)
    slba, nlb = lba_range(req, ns)
    nbytes = transfer_length(req, ns, nlb)
    views = req.data_views(nbytes, to_host=False)
    ns.write_from(slba, views)
    if req.sqe.cdw12 & FUA:
        ns.flush()
    req.ctrl.subsystem.smart.on_write(nbytes)
    return st.SUCCESS


def flush(req: Request) -> st.Status:
    nsid = req.sqe.nsid
    if nsid == 0xFFFFFFFF:
        for n in req.ctrl.subsystem.attached_namespaces(req.ctrl.cntlid):
            req.ctrl.subsystem.namespaces[n].flush()
        return st.SUCCESS
    namespace_of(req).flush()
    return st.SUCCESS


IO_HANDLERS: dict[int, Handler] = {
    IoOpcode.READ: read,
    IoOpcode.WRITE: write,
    IoOpcode.FLUSH: flush,
}
