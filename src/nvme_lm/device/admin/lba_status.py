"""Get LBA Status (admin 86h): TP4165 allocated ranges (ATYPE 02h) and the unrecoverable-LBA answers.

ATYPE 02h walks the namespace's allocation map (device/allocation.py) from SLBA and returns maximal
runs of allocated TLBAAG units as descriptors with LBARS 010b, clipped to [SLBA, SLBA + RL) (RL 0 = to
the end of the namespace) and split where a run exceeds the 2^32 blocks one NLB can hold. When more
descriptors exist than the (MNDW + 1) dwords hold, CMPC = 1 and the host continues at the last
DSLBA + NLB + 1; otherwise CMPC = 2. ATYPE 10h/11h (potentially unrecoverable LBAs) return no
descriptors and CMPC = 2: the emulated media has no bad blocks, so no scan finds any.

Decisions (docs/allocation-tracking.md):
* Primary controller only (device/virtualization.py PRIVILEGED_ADMIN_OPCODES): allocation data serves
  the migration host; a VF gets Invalid Opcode and reports OACS.GLSS = 0, RALBAS = 0, TLBAAG = 0.
* The primary may name any allocated namespace, attached to it or not: the migration host asks about
  the namespace of a VF it is about to migrate without attaching it to itself.
* The data transferred is the header and the descriptors produced, at most (MNDW + 1) dwords; a buffer
  larger than MDTS is Invalid Field, as for any command.
* SLBA beyond the namespace is LBA Out of Range; a range running past the end is clipped to NSZE.
"""

from __future__ import annotations

import numpy as np

from nvme_lm.device.namespace import Namespace
from nvme_lm.device.request import Handler, NvmeError, Request
from nvme_lm.spec import status as st
from nvme_lm.spec.lba_status import (
    LBARS_ALLOCATED,
    MAX_DESCRIPTOR_NLB,
    Atype,
    Cmpc,
    GetLbaStatus,
    encode_lba_status,
    max_descriptors,
)
from nvme_lm.spec.opcodes import AdminOpcode

PEL_NSID = 4
PEL_SLBA = 40
PEL_MNDW = 48
PEL_ATYPE = 55  # CDW13 byte 3
BROADCAST = 0xFFFFFFFF
_ATYPES = frozenset(int(a) for a in Atype)


def _namespace(req: Request) -> Namespace:
    """Any allocated namespace for the primary controller; only attached ones elsewhere."""
    ctrl = req.ctrl
    nsid = req.sqe.nsid
    if nsid == 0 or nsid == BROADCAST or nsid > ctrl.model.max_namespaces:
        raise NvmeError(st.INVALID_NAMESPACE, f"NSID {nsid:#x} is not valid", PEL_NSID)
    ns = ctrl.namespace(nsid) if ctrl.fn.is_virtual else ctrl.subsystem.namespaces.get(nsid)
    if ns is None:
        raise NvmeError(st.INVALID_NAMESPACE, f"namespace {nsid:#x} does not exist here", PEL_NSID)
    return ns


def allocated_descriptors(ns: Namespace, slba: int, end: int, room: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Up to `room` (start, count) descriptors of allocated LBAs in [slba, end), and whether more exist."""
    starts: list[int] = []
    counts: list[int] = []
    for first, stop in ns.alloc.ranges(slba, end):
        while first < stop:
            if len(starts) == room:
                return np.array(starts, dtype=np.uint64), np.array(counts, dtype=np.uint64), True
            n = min(stop - first, MAX_DESCRIPTOR_NLB)
            starts.append(first)
            counts.append(n)
            first += n
    return np.array(starts, dtype=np.uint64), np.array(counts, dtype=np.uint64), False


def get_lba_status(req: Request) -> st.Status:
    ctrl = req.ctrl
    sqe = req.sqe
    cmd = GetLbaStatus.decode(sqe.cdw10, sqe.cdw11, sqe.cdw12, sqe.cdw13)
    ns = _namespace(req)
    if cmd.atype not in _ATYPES:
        raise NvmeError(st.INVALID_FIELD, f"ATYPE {cmd.atype:#04x} not supported", PEL_ATYPE)
    if cmd.slba >= ns.nsze:
        raise NvmeError(st.LBA_OUT_OF_RANGE, f"SLBA {cmd.slba} beyond NSZE {ns.nsze}", PEL_SLBA)
    length = cmd.buffer_bytes
    mdts = ctrl.model.mdts
    if mdts and length > 4096 << (ctrl.cap.mpsmin + mdts):
        raise NvmeError(st.INVALID_FIELD, f"MNDW: {length} bytes exceeds MDTS", PEL_MNDW)
    end = ns.nsze if cmd.rl == 0 else min(ns.nsze, cmd.slba + cmd.rl)
    if cmd.atype == Atype.ALLOCATED:
        starts, counts, more = allocated_descriptors(ns, cmd.slba, end, max_descriptors(length))
        status = LBARS_ALLOCATED
    else:  # no potentially unrecoverable LBAs, tracked or found by a scan
        starts = counts = np.empty(0, dtype=np.uint64)
        more, status = False, 0
    data = encode_lba_status(starts, counts, status, Cmpc.INCOMPLETE if more else Cmpc.COMPLETE)
    # MNDW 0 or 1: only the part of the header that fits; the PRPs describe the whole buffer
    req.write_to_host(data[:length], buffer_length=length)
    return st.SUCCESS


HANDLERS: dict[int, Handler] = {AdminOpcode.GET_LBA_STATUS: get_lba_status}
