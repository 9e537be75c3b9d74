"""Abort (admin 08h): CDW10 15:0 SQID, 31:16 CID.

Commands run to completion as soon as they are fetched, so only two kinds of command can
still be aborted: an outstanding Asynchronous Event Request (completed at once with Command
Abort Requested), and a command still in its SQ between head and tail, not yet fetched (for
instance behind a full CQ). The latter is marked in `ctrl.abort_marks`; the dispatcher
completes it with Command Abort Requested, without running it, when it is fetched.

Completion DW0 bit 0 is 0 when the command was (or will be) aborted, 1 when it was not found.
A mark holds one of the controller's ACL+1 abort resources until its command is fetched, so
more marks than that get Abort Command Limit Exceeded. The Abort itself completes at once:
the specification lets the aborted command complete before or after it.
"""

from __future__ import annotations

import struct

from nvme_lm.device.request import Handler, NvmeError, Request
from nvme_lm.spec import status as st
from nvme_lm.spec.opcodes import AdminOpcode

PEL_CDW10 = 40
_CID = struct.Struct("<H")
CID_OFFSET = 2  # byte offset of the CID within an SQE
NOT_ABORTED = 1


def _prune(req: Request) -> None:
    """Forgets marks whose SQ was deleted (or deleted and created again) in the meantime."""
    ctrl = req.ctrl
    stale = [key for key, sq in ctrl.abort_marks.items() if ctrl.sqs.get(key[0]) is not sq]
    for key in stale:
        del ctrl.abort_marks[key]


def abort(req: Request) -> st.Status:
    ctrl = req.ctrl
    sqid, cid = req.sqe.cdw10 & 0xFFFF, req.sqe.cdw10 >> 16
    req.dw0 = NOT_ABORTED
    sq = ctrl.sqs.get(sqid)
    if sq is None:
        raise NvmeError(st.INVALID_FIELD, f"SQ {sqid} does not exist", PEL_CDW10)
    if sqid == 0:
        for aer in ctrl.aers:
            if aer.sqe.cid == cid:
                ctrl.aers.remove(aer)
                ctrl.complete_deferred(aer, st.ABORT_REQUESTED)
                req.dw0 = 0
                return st.SUCCESS
    _prune(req)
    if (sqid, cid) in ctrl.abort_marks:
        req.dw0 = 0  # already marked by an earlier Abort
        return st.SUCCESS
    if len(ctrl.abort_marks) > ctrl.model.acl:  # ACL is 0's based
        raise NvmeError(st.ABORT_LIMIT_EXCEEDED, f"{len(ctrl.abort_marks)} aborts outstanding")
    index = sq.head
    while index != sq.tail:
        view, off = sq.ring.slot(index)
        if _CID.unpack_from(view, off + CID_OFFSET)[0] == cid:
            ctrl.abort_marks[(sqid, cid)] = sq
            req.dw0 = 0
            break
        index = (index + 1) % sq.size
    return st.SUCCESS


HANDLERS: dict[int, Handler] = {AdminOpcode.ABORT: abort}
