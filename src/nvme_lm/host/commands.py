"""Command builders: SQEs for every admin and NVM command the project uses.

Data pointers are filled in by the driver (`NvmeDriver.admin` / `IoQueue`), so builders only
encode command dwords exactly as the specification lays them out.
"""

from __future__ import annotations

from nvme_lm.spec.commands import SQE
from nvme_lm.spec.opcodes import AdminOpcode as A
from nvme_lm.spec.opcodes import IoOpcode as IO


def identify(cns: int, nsid: int = 0, cntid: int = 0, csi: int = 0, cnssid: int = 0) -> SQE:
    return SQE(opcode=A.IDENTIFY, nsid=nsid, cdw10=(cns & 0xFF) | (cntid & 0xFFFF) << 16,
               cdw11=(cnssid & 0xFFFF) | (csi & 0xFF) << 24)


def get_log_page(lid: int, numd: int, *, nsid: int = 0xFFFFFFFF, offset: int = 0, rae: bool = False,
                 lsp: int = 0, lsi: int = 0, csi: int = 0) -> SQE:
    """`numd` is the number of dwords (1-based here; encoded 0's based)."""
    n = numd - 1
    return SQE(opcode=A.GET_LOG_PAGE, nsid=nsid,
               cdw10=(lid & 0xFF) | (lsp & 0x7F) << 8 | int(rae) << 15 | (n & 0xFFFF) << 16,
               cdw11=(n >> 16) & 0xFFFF | (lsi & 0xFFFF) << 16,
               cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32, cdw14=(csi & 0xFF) << 24)


def set_features(fid: int, cdw11: int = 0, *, save: bool = False, nsid: int = 0, cdw12: int = 0) -> SQE:
    return SQE(opcode=A.SET_FEATURES, nsid=nsid, cdw10=(fid & 0xFF) | int(save) << 31, cdw11=cdw11,
               cdw12=cdw12)


def get_features(fid: int, sel: int = 0, *, nsid: int = 0, cdw11: int = 0) -> SQE:
    return SQE(opcode=A.GET_FEATURES, nsid=nsid, cdw10=(fid & 0xFF) | (sel & 0x7) << 8, cdw11=cdw11)


def create_io_cq(qid: int, size: int, addr: int, *, vector: int = 0, ien: bool = True,
                 contiguous: bool = True) -> SQE:
    return SQE(opcode=A.CREATE_IO_CQ, prp1=addr, cdw10=qid | (size - 1) << 16,
               cdw11=int(contiguous) | int(ien) << 1 | vector << 16)


def create_io_sq(qid: int, size: int, addr: int, cqid: int, *, priority: int = 0,
                 contiguous: bool = True) -> SQE:
    return SQE(opcode=A.CREATE_IO_SQ, prp1=addr, cdw10=qid | (size - 1) << 16,
               cdw11=int(contiguous) | (priority & 3) << 1 | cqid << 16)


def delete_io_sq(qid: int) -> SQE:
    return SQE(opcode=A.DELETE_IO_SQ, cdw10=qid)


def delete_io_cq(qid: int) -> SQE:
    return SQE(opcode=A.DELETE_IO_CQ, cdw10=qid)


def abort(sqid: int, cid: int) -> SQE:
    return SQE(opcode=A.ABORT, cdw10=sqid | cid << 16)


def async_event_request() -> SQE:
    return SQE(opcode=A.ASYNC_EVENT_REQUEST)


def keep_alive() -> SQE:
    return SQE(opcode=A.KEEP_ALIVE)


def ns_create(csi: int = 0) -> SQE:
    """Namespace Management create; the 4 KiB host buffer (NSZE, NCAP, FLBAS...) is the caller's."""
    return SQE(opcode=A.NS_MANAGEMENT, cdw10=0, cdw11=(csi & 0xFF) << 24)


def ns_delete(nsid: int) -> SQE:
    return SQE(opcode=A.NS_MANAGEMENT, nsid=nsid, cdw10=1)


def ns_attach(nsid: int, attach: bool = True) -> SQE:
    """Namespace Attachment (SEL 0 attach, 1 detach); the controller list buffer is the caller's."""
    return SQE(opcode=A.NS_ATTACHMENT, nsid=nsid, cdw10=0 if attach else 1)


def format_nvm(nsid: int, lbaf: int, *, ses: int = 0) -> SQE:
    return SQE(opcode=A.FORMAT_NVM, nsid=nsid, cdw10=(lbaf & 0xF) | ((lbaf >> 4) & 0x3) << 12 | (ses & 7) << 9)


def doorbell_buffer_config(shadow: int, eventidx: int) -> SQE:
    return SQE(opcode=A.DOORBELL_BUFFER_CONFIG, prp1=shadow, prp2=eventidx)


def get_lba_status(nsid: int, slba: int, mndw: int, rl: int, atype: int) -> SQE:
    return SQE(opcode=A.GET_LBA_STATUS, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
               cdw12=mndw, cdw13=(rl & 0xFFFF) | (atype & 0xFF) << 24)


# ----------------------------------------------------------------------------- NVM I/O
def _rw(opcode: int, nsid: int, slba: int, nlb: int, extra: int = 0) -> SQE:
    return SQE(opcode=opcode, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
               cdw12=((nlb - 1) & 0xFFFF) | extra)


def read(nsid: int, slba: int, nlb: int, *, fua: bool = False) -> SQE:
    return _rw(IO.READ, nsid, slba, nlb, int(fua) << 30)


def write(nsid: int, slba: int, nlb: int, *, fua: bool = False) -> SQE:
    return _rw(IO.WRITE, nsid, slba, nlb, int(fua) << 30)


def compare(nsid: int, slba: int, nlb: int) -> SQE:
    return _rw(IO.COMPARE, nsid, slba, nlb)


def verify(nsid: int, slba: int, nlb: int) -> SQE:
    return _rw(IO.VERIFY, nsid, slba, nlb)


def write_zeroes(nsid: int, slba: int, nlb: int, *, deallocate: bool = False) -> SQE:
    return _rw(IO.WRITE_ZEROES, nsid, slba, nlb, int(deallocate) << 25)


def flush(nsid: int = 0xFFFFFFFF) -> SQE:
    return SQE(opcode=IO.FLUSH, nsid=nsid)


def dataset_management(nsid: int, nr: int, *, deallocate: bool = True) -> SQE:
    """`nr` ranges (1-based here); the 16-byte range list is the data buffer."""
    return SQE(opcode=IO.DATASET_MANAGEMENT, nsid=nsid, cdw10=(nr - 1) & 0xFF, cdw11=int(deallocate) << 2)
