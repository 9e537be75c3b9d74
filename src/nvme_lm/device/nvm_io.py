"""NVM command set I/O commands: the data path from a submission queue to a namespace file.

Read, Write and Compare move data with one `preadv`/`pwritev` straight between the namespace
file and the DMA-mapped guest pages that the PRPs describe; nothing is staged in between.
Every refusal is decided before the first byte moves, so a failed command changes nothing.

The volatile write cache is the host page cache: Flush (and FUA, and every write while the
host has disabled the cache with feature 06h) is `fdatasync` of the namespace file.

Speed characteristics of the device model hook in at `finish()`: every command that reaches the
media ends there with the bytes it moved, and the subsystem's pacer (media.py) delays its
completion by the model's latency and bandwidth (DEFERRED, completed by the pacer's timer).
"""

from __future__ import annotations

import errno

import numpy as np

from nvme_lm.device.feature_defaults import VOLATILE_WRITE_CACHE
from nvme_lm.device.namespace import Namespace
from nvme_lm.device.request import Handler, NvmeError, Request
from nvme_lm.spec import status as st
from nvme_lm.spec.opcodes import IoOpcode

# Parameter Error Location: byte offset of the offending field in the SQE
PEL_NSID = 4
PEL_CDW10 = 40
PEL_SLBA = 40
PEL_NLB = 48

NSID_ALL = 0xFFFFFFFF
FUA = 1 << 30  # CDW12 of Read, Write, Compare, Verify, Write Zeroes
DEAC = 1 << 25  # CDW12 of Write Zeroes: deallocate instead of writing zeroes
DSM_AD = 1 << 2  # CDW11 of Dataset Management: attribute deallocate
DSM_RANGE = np.dtype([("cattr", "<u4"), ("nlb", "<u4"), ("slba", "<u8")])  # 16-byte range descriptor
VERIFY_CHUNK = 1 << 20  # Verify reads the media through a scratch buffer of at most this size


# ----------------------------------------------------------------------------- checks
def namespace_of(req: Request) -> Namespace:
    """The namespace the command names; NSID 0, FFFFFFFFh, unknown and detached all refuse."""
    ns = req.ctrl.namespace(req.sqe.nsid)
    if ns is None:
        raise NvmeError(st.INVALID_NAMESPACE, f"namespace {req.sqe.nsid:#x} not attached", PEL_NSID)
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
    """Bytes the command moves, refused above MDTS (which counts in CAP.MPSMIN pages, not CC.MPS)."""
    nbytes = nlb << ns.lba_shift
    ctrl = req.ctrl
    mdts = ctrl.model.mdts
    if mdts and nbytes > 4096 << (ctrl.cap.mpsmin + mdts):
        raise NvmeError(st.INVALID_FIELD, f"{nbytes} bytes exceeds MDTS", PEL_NLB)
    return nbytes


def commit(req: Request, ns: Namespace, fua: bool) -> None:
    """Makes a modification durable when the host asked (FUA) or has no write cache (FID 06h WCE=0)."""
    if fua or not req.ctrl.features.current[VOLATILE_WRITE_CACHE] & 1:
        ns.flush()


def write_error(e: OSError) -> NvmeError:
    """The status of a write the backing file refused: out of space is Capacity Exceeded (what Linux's
    nvmet answers for ENOSPC: the host learns that retrying will not help), anything else a Write Fault."""
    if e.errno == errno.ENOSPC:
        return NvmeError(st.CAPACITY_EXCEEDED, f"backing store full: {e}", PEL_NLB)
    return NvmeError(st.WRITE_FAULT, f"backing store write failed: {e}")


def finish(req: Request, nbytes: int, write: bool) -> st.Status:
    """Where every media command completes: at once, or paced by the model's latency and bandwidth
    (DEFERRED; the subsystem's pacer in media.py completes it when due)."""
    media = req.ctrl.subsystem.media
    if media is None:
        return st.SUCCESS  # zero-speed model: the fast path
    return media.schedule(req, nbytes, write)


# ----------------------------------------------------------------------------- data transfer
def read(req: Request) -> st.Status:
    ns = namespace_of(req)
    slba, nlb = lba_range(req, ns)
    nbytes = transfer_length(req, ns, nlb)
    views = req.data_views(nbytes, to_host=True)
    if req.sqe.cdw12 & FUA and ns.dirty:
        ns.flush()  # FUA read: what it returns must already be on non-volatile media
    ns.read_into(slba, views)
    req.ctrl.subsystem.smart.on_read(nbytes)
    return finish(req, nbytes, False)


def write(req: Request) -> st.Status:
    ns = namespace_of(req)
    slba, nlb = lba_range(req, ns)
    nbytes = transfer_length(req, ns, nlb)
    views = req.data_views(nbytes, to_host=False)
    try:
        ns.write_from(slba, views)
    except OSError as e:
        raise write_error(e) from e
    ctrl = req.ctrl
    if req.sqe.cdw12 & FUA or not ctrl.features.current[VOLATILE_WRITE_CACHE] & 1:
        ns.flush()  # commit() inlined: this is the hot path
    ctrl.subsystem.smart.on_write(nbytes)
    return finish(req, nbytes, True)


def compare(req: Request) -> st.Status:
    """Reads the blocks and compares them with the host's buffer (a Host Read Command for SMART)."""
    ns = namespace_of(req)
    slba, nlb = lba_range(req, ns)
    nbytes = transfer_length(req, ns, nlb)
    views = req.data_views(nbytes, to_host=False)
    if req.sqe.cdw12 & FUA and ns.dirty:
        ns.flush()
    media = np.empty(nbytes, dtype=np.uint8)
    ns.read_into(slba, [memoryview(media)])
    req.ctrl.subsystem.smart.on_read(nbytes)
    pos = 0
    for view in views:
        n = len(view)
        if not np.array_equal(np.frombuffer(view, dtype=np.uint8), media[pos : pos + n]):
            return st.COMPARE_FAILURE
        pos += n
    return finish(req, nbytes, False)


# ----------------------------------------------------------------------------- no data transfer
def flush(req: Request) -> st.Status:
    """Commits the write cache of one namespace, or of every attached one for NSID FFFFFFFFh."""
    if req.sqe.nsid == NSID_ALL:
        sub = req.ctrl.subsystem
        for nsid in sub.attached_namespaces(req.ctrl.cntlid):
            sub.namespaces[nsid].flush()
    else:
        namespace_of(req).flush()
    return finish(req, 0, True)


def write_zeroes(req: Request) -> st.Status:
    """Zeroes a range; with DEAC the blocks are deallocated (DLFEAT: they read back as zeroes)."""
    ns = namespace_of(req)
    slba, nlb = lba_range(req, ns)
    cdw12 = req.sqe.cdw12
    if cdw12 & DEAC:
        ns.deallocate(slba, nlb)
    else:
        try:
            ns.write_zeroes(slba, nlb)
        except OSError as e:
            raise write_error(e) from e
    commit(req, ns, bool(cdw12 & FUA))
    return finish(req, 0, True)


def verify(req: Request) -> st.Status:
    """Reads the range from the media (checking it is readable) and transfers nothing."""
    ns = namespace_of(req)
    slba, nlb = lba_range(req, ns)
    if req.sqe.cdw12 & FUA and ns.dirty:
        ns.flush()
    per = max(1, VERIFY_CHUNK >> ns.lba_shift)
    scratch = memoryview(bytearray(min(nlb, per) << ns.lba_shift))
    lba, left = slba, nlb
    while left:
        n = min(left, per)
        ns.read_into(lba, [scratch[: n << ns.lba_shift]])
        lba += n
        left -= n
    nbytes = nlb << ns.lba_shift
    req.ctrl.subsystem.smart.on_read(nbytes, command=False)  # Data Units Read counts Verify, commands do not
    return finish(req, nbytes, False)


def dataset_management(req: Request) -> st.Status:
    """Up to 256 ranges; with AD they are deallocated, otherwise the attributes are only hints.

    All ranges are checked before any is acted on, so one bad range changes nothing."""
    ns = namespace_of(req)
    nr = (req.sqe.cdw10 & 0xFF) + 1
    ranges = np.frombuffer(req.read_from_host(nr * DSM_RANGE.itemsize), dtype=DSM_RANGE)
    ranges = ranges[ranges["nlb"] != 0]
    slba = ranges["slba"]
    nlb = ranges["nlb"].astype(np.uint64)
    nsze = np.uint64(ns.nsze)
    bad = (slba > nsze) | (nlb > nsze - np.minimum(slba, nsze))  # slba + nlb > nsze without wrapping
    if bad.any():
        i = int(np.argmax(bad))
        raise NvmeError(st.LBA_OUT_OF_RANGE, f"range {i}: LBA {int(slba[i])}+{int(nlb[i])} beyond {ns.nsze}")
    if not req.sqe.cdw11 & DSM_AD or len(ranges) == 0:
        return st.SUCCESS
    for start, count in _coalesce(slba, nlb):
        ns.deallocate(start, count)
    commit(req, ns, False)
    return finish(req, 0, True)


def _coalesce(slba: np.ndarray, nlb: np.ndarray) -> list[tuple[int, int]]:
    """Sorted, merged (slba, nlb) ranges, so overlapping or adjacent ranges cost one punch each."""
    order = np.argsort(slba, kind="stable")
    starts = slba[order]
    ends = starts + nlb[order]
    reach = np.maximum.accumulate(ends)
    new = np.ones(len(starts), dtype=bool)
    new[1:] = starts[1:] > reach[:-1]
    first = np.flatnonzero(new)
    group_ends = np.maximum.reduceat(ends, first)
    return [(int(s), int(e - s)) for s, e in zip(starts[first], group_ends, strict=True)]


IO_HANDLERS: dict[int, Handler] = {
    IoOpcode.FLUSH: flush,
    IoOpcode.WRITE: write,
    IoOpcode.READ: read,
    IoOpcode.COMPARE: compare,
    IoOpcode.WRITE_ZEROES: write_zeroes,
    IoOpcode.DATASET_MANAGEMENT: dataset_management,
    IoOpcode.VERIFY: verify,
}
