"""Create/Delete I/O Submission and Completion Queue (admin 00h, 01h, 04h, 05h)."""

from __future__ import annotations

from nvme_lm.device.queues import CompletionQueue, SubmissionQueue
from nvme_lm.device.request import Handler, NvmeError, Request
from nvme_lm.pcie.iommu import DmaFault
from nvme_lm.spec import status as st
from nvme_lm.spec.opcodes import AdminOpcode
from nvme_lm.spec.registers import CC

PEL_CDW10 = 40  # parameter error location: byte offset of CDW10 in the SQE
PEL_CDW11 = 44


def _qid_size(req: Request, is_sq: bool) -> tuple[int, int]:
    ctrl = req.ctrl
    qid = req.sqe.cdw10 & 0xFFFF
    size = (req.sqe.cdw10 >> 16) + 1
    limit = ctrl.nsqa if is_sq else ctrl.ncqa
    if qid == 0 or qid > limit:
        raise NvmeError(st.INVALID_QID, f"queue id {qid} outside 1..{limit}", PEL_CDW10)
    if size < 2 or size > ctrl.cap.mqes + 1:
        raise NvmeError(st.INVALID_QUEUE_SIZE, f"queue size {size}", PEL_CDW10 + 2)
    return qid, size


def create_io_cq(req: Request) -> st.Status:
    ctrl = req.ctrl
    if CC.iocqes(ctrl.cc) != 4:
        raise NvmeError(st.INVALID_FIELD, "CC.IOCQES must select 16-byte entries before creating CQs")
    qid, size = _qid_size(req, is_sq=False)
    if qid in ctrl.cqs:
        raise NvmeError(st.INVALID_QID, f"CQ {qid} exists", PEL_CDW10)
    cdw11 = req.sqe.cdw11
    pc, ien, iv = bool(cdw11 & 1), bool(cdw11 & 2), cdw11 >> 16
    if not pc and ctrl.cap.cqr:
        raise NvmeError(st.INVALID_FIELD, "CAP.CQR requires physically contiguous queues", PEL_CDW11)
    if iv >= ctrl.fn.msix.nvectors:
        raise NvmeError(st.INVALID_INTERRUPT_VECTOR, f"vector {iv}", PEL_CDW11 + 2)
    try:
        cq = CompletionQueue(ctrl.fn, qid, req.sqe.prp1, size, ctrl.page_size, pc, ien, iv)
    except DmaFault as e:
        raise NvmeError(st.INVALID_FIELD, f"queue memory not mapped: {e}") from e
    ctrl.cqs[qid] = cq
    if ctrl.shadow is not None:
        ctrl.shadow.queue_created(qid, is_cq=True)  # before the host can ring it
    return st.SUCCESS


def create_io_sq(req: Request) -> st.Status:
    ctrl = req.ctrl
    if CC.iosqes(ctrl.cc) != 6:
        raise NvmeError(st.INVALID_FIELD, "CC.IOSQES must select 64-byte entries before creating SQs")
    qid, size = _qid_size(req, is_sq=True)
    if qid in ctrl.sqs:
        raise NvmeError(st.INVALID_QID, f"SQ {qid} exists", PEL_CDW10)
    cdw11 = req.sqe.cdw11
    pc, prio, cqid = bool(cdw11 & 1), (cdw11 >> 1) & 0x3, cdw11 >> 16
    if not pc and ctrl.cap.cqr:
        raise NvmeError(st.INVALID_FIELD, "CAP.CQR requires physically contiguous queues", PEL_CDW11)
    cq = ctrl.cqs.get(cqid)
    if cqid == 0 or cq is None:
        raise NvmeError(st.INVALID_CQ, f"CQ {cqid} does not exist", PEL_CDW11 + 2)
    if req.sqe.cdw12 & 0xFFFF:
        raise NvmeError(st.INVALID_FIELD, "NVM Sets are not supported", 48)
    try:
        sq = SubmissionQueue(ctrl.fn, qid, req.sqe.prp1, size, ctrl.page_size, pc, cq, prio)
    except DmaFault as e:
        raise NvmeError(st.INVALID_FIELD, f"queue memory not mapped: {e}") from e
    cq.sqs.add(qid)
    ctrl.sqs[qid] = sq
    if ctrl.shadow is not None:
        ctrl.shadow.queue_created(qid, is_cq=False)
    return st.SUCCESS


def delete_io_sq(req: Request) -> st.Status:
    ctrl = req.ctrl
    qid = req.sqe.cdw10 & 0xFFFF
    sq = ctrl.sqs.get(qid)
    if qid == 0 or sq is None:
        raise NvmeError(st.INVALID_QID, f"SQ {qid} does not exist", PEL_CDW10)
    # Commands still in flight (deferred by the media model) are aborted into the SQ's CQ before
    # the SQ goes and before this command's own completion.
    media = ctrl.subsystem.media
    if media is not None:
        for aborted in media.abort_queue(sq):
            ctrl.complete_deferred(aborted, st.ABORTED_SQ_DELETION)
    del ctrl.sqs[qid]
    sq.cq.sqs.discard(qid)
    return st.SUCCESS


def delete_io_cq(req: Request) -> st.Status:
    ctrl = req.ctrl
    qid = req.sqe.cdw10 & 0xFFFF
    cq = ctrl.cqs.get(qid)
    if qid == 0 or cq is None:
        raise NvmeError(st.INVALID_QID, f"CQ {qid} does not exist", PEL_CDW10)
    if cq.sqs:
        raise NvmeError(st.INVALID_QUEUE_DELETION, f"SQs {sorted(cq.sqs)} still use CQ {qid}", PEL_CDW10)
    del ctrl.cqs[qid]
    ctrl.overflow.pop(qid, None)
    return st.SUCCESS


HANDLERS: dict[int, Handler] = {
    AdminOpcode.CREATE_IO_CQ: create_io_cq,
    AdminOpcode.CREATE_IO_SQ: create_io_sq,
    AdminOpcode.DELETE_IO_SQ: delete_io_sq,
    AdminOpcode.DELETE_IO_CQ: delete_io_cq,
}
