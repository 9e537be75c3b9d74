"""One NVMe controller behind a PCIe function: registers, queues, the fetch/execute/complete
engine, resets and shutdown.

The engine is a thread per controller, woken by doorbell writes, the way a hardware
controller runs beside its host: it fetches SQEs by DMA, runs the handler from the dispatch
table (`admin/`, `nvm_io.py`), writes the CQE with the right phase, and raises MSI-X.
Handlers never see registers; the host never sees anything but BAR0, DMA and interrupts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from nvme_lm.device.error_log import ErrorLog
from nvme_lm.device.events import AsyncEvent, AsyncEventType, ErrorEventInfo, EventDelivery, EventQueue
from nvme_lm.device.feature_defaults import default_feature_specs
from nvme_lm.device.features import FeatureState
from nvme_lm.device.interrupts import InterruptAggregator
from nvme_lm.device.queues import CompletionQueue, SubmissionQueue
from nvme_lm.device.request import DEFERRED, Handler, NvmeError, Request
from nvme_lm.pcie.iommu import DmaFault
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import SQE, unpack_sqe_from
from nvme_lm.spec.registers import CC, CSTS, DOORBELL_BASE, VS_2_1, Cap, Reg, Shn, aqa_decode, cc_enable_problem
from nvme_lm.spec.status import Status

if TYPE_CHECKING:
    from nvme_lm.device.exported import ExportBinding
    from nvme_lm.device.namespace import Namespace
    from nvme_lm.device.rate_limit import ControllerLimiter
    from nvme_lm.device.subsystem import NvmSubsystem
    from nvme_lm.pcie.function import PcieFunction

log = logging.getLogger(__name__)

FID_ARBITRATION = 0x01
FID_KEEP_ALIVE = 0x0F
ENGINE_PASS_LIMIT = 256  # commands per engine pass before its interrupts are signalled
CC_WRITABLE = 0x00FFFFF1  # EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES


class Controller(EventDelivery):
    def __init__(self, subsystem: NvmSubsystem, cntlid: int, fn: PcieFunction, *,
                 admin_handlers: dict[int, Handler] | None = None,
                 io_handlers: dict[int, Handler] | None = None) -> None:
        from nvme_lm.device.admin import ADMIN_HANDLERS
        from nvme_lm.device.nvm_io import IO_HANDLERS

        self.subsystem = subsystem
        self.model = subsystem.model
        self.cntlid = cntlid
        self.fn = fn
        m = self.model
        self.cap = Cap(mqes=m.max_queue_entries - 1, cqr=False, to=m.timeout_500ms, dstrd=m.doorbell_stride,
                       css=0x41, mpsmin=0, mpsmax=4)
        self.max_io_queues = m.max_io_queues
        self.admin_handlers = dict(admin_handlers if admin_handlers is not None else ADMIN_HANDLERS)
        self.io_handlers = dict(io_handlers if io_handlers is not None else IO_HANDLERS)

        # registers
        self.cc = 0
        self.csts = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self.intms = 0
        self.page_size = 4096

        # queues and host-visible state
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.overflow: dict[int, deque[tuple[int, int, int, int, int, int]]] = {}
        self.nsqa = 0  # I/O SQs allocated by Number of Queues (count, not 0's based)
        self.ncqa = 0
        self.queues_requested = False
        self.features = FeatureState(default_feature_specs(m))
        self.events = EventQueue()
        self.aers: deque[Request] = deque()
        self.abort_marks: dict[tuple[int, int], SubmissionQueue] = {}  # (SQID, CID) to abort when fetched
        self.error_log = ErrorLog(m.error_log_entries)
        self.changed_namespaces: list[int] = []
        self.irq = InterruptAggregator(fn.msix)
        self.shadow = None  # ShadowDoorbells once Doorbell Buffer Config ran
        self.keep_alive_deadline: float | None = None
        self.shut_down = False
        self._shutdown_pending = Shn.NONE
        self.commands_completed = 0
        self.suspended = False  # TP4159 Migration Send Suspend (device/migration_state.py)
        self.rate_limiter: ControllerLimiter | None = None  # TP4176 (device/rate_limit.py): checked at fetch
        # TP4193 (device/exported.py): while associated with an exported NVM subsystem, the binding that
        # answers Identify / logs from its template, and the ENSID -> underlying NSID map namespace() uses
        self.export: ExportBinding | None = None
        self.nsid_map: dict[int, int] | None = None

        self._lock = threading.RLock()
        self._work = threading.Event()
        self._stopped = False
        fn.attach(self)
        subsystem.register(self)
        self._thread = threading.Thread(target=self._run, name=f"nvme-ctrl{cntlid}", daemon=True)
        self._thread.start()

    # ================================================================ registers (BAR0)
    @property
    def ready(self) -> bool:
        return bool(self.csts & CSTS.RDY)

    def mmio_read(self, offset: int, size: int) -> int:
        if offset >= DOORBELL_BASE:
            return 0  # doorbells are write-only; reads return zero
        wide = {Reg.CAP: self.cap.encode(), Reg.ASQ: self.asq, Reg.ACQ: self.acq}
        if size == 8 and offset not in wide:
            # a 64-bit access to 32-bit registers reads both dwords, as a PCIe split would
            return self.mmio_read(offset, 4) | self.mmio_read(offset + 4, 4) << 32
        if offset in wide:
            value = wide[offset]  # type: ignore[index]
        elif offset - 4 in wide:
            value = wide[offset - 4] >> 32  # type: ignore[index]
        else:
            narrow = {Reg.VS: VS_2_1, Reg.INTMS: self.intms, Reg.INTMC: self.intms, Reg.CC: self.cc,
                      Reg.CSTS: self.csts, Reg.AQA: self.aqa}
            value = narrow.get(offset, 0)  # type: ignore[call-overload]
        return value & ((1 << (8 * size)) - 1)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if size == 8 and offset not in (Reg.CAP, Reg.ASQ, Reg.ACQ):
            # a 64-bit write to 32-bit registers (or doorbells) writes both dwords, low first
            self.mmio_write(offset, 4, value & 0xFFFFFFFF)
            self.mmio_write(offset + 4, 4, value >> 32)
            return
        if offset >= DOORBELL_BASE:
            self._doorbell(offset, value & 0xFFFF)
            return
        with self._lock:
            if offset == Reg.CC:
                self._write_cc(value)
            elif offset == Reg.AQA:
                self.aqa = value & 0x0FFF0FFF
            elif offset in (Reg.ASQ, Reg.ASQ + 4, Reg.ACQ, Reg.ACQ + 4):
                self._write_queue_base(offset, size, value)
            elif offset == Reg.INTMS:
                self.intms |= value
            elif offset == Reg.INTMC:
                self.intms &= ~value
            # writes to read-only or unimplemented registers are ignored, as hardware does

    def _write_queue_base(self, offset: int, size: int, value: int) -> None:
        name = "asq" if offset in (Reg.ASQ, Reg.ASQ + 4) else "acq"
        cur = getattr(self, name)
        if size == 8:
            cur = value
        elif offset & 0x4:
            cur = (cur & 0xFFFFFFFF) | (value << 32)
        else:
            cur = (cur & ~0xFFFFFFFF) | value
        setattr(self, name, cur & ~0xFFF)  # bits 11:0 are reserved

    def _write_cc(self, value: int) -> None:
        old = self.cc
        value &= CC_WRITABLE  # reserved bits (and CRIME, not supported) read as zero
        self.cc = value
        if value & CC.EN and not old & CC.EN:
            self._enable()
        elif not value & CC.EN and old & CC.EN:
            self.controller_reset()
        if CC.shn(value) != Shn.NONE and CC.shn(old) == Shn.NONE:
            # Shutdown runs in the engine, so the host sees SHST 01b (occurring) before 10b.
            self.csts = (self.csts & ~CSTS.SHST_MASK) | CSTS.SHST_OCCURRING
            self._shutdown_pending = CC.shn(value)
            self._work.set()

    def _enable(self) -> None:
        mps = CC.mps(self.cc)
        asqs, acqs = aqa_decode(self.aqa)
        problem = (cc_enable_problem(self.cc, self.cap)
                   or ("admin queues need at least two entries (AQA)" if asqs < 1 or acqs < 1 else None)
                   or ("ASQ/ACQ not set" if self.asq == 0 or self.acq == 0 else None))
        if problem is None:
            self.page_size = 1 << (12 + mps)
            try:
                cq = CompletionQueue(self.fn, 0, self.acq, acqs + 1, self.page_size, True, True, 0)
                sq = SubmissionQueue(self.fn, 0, self.asq, asqs + 1, self.page_size, True, cq)
            except (DmaFault, NvmeError) as e:
                problem = f"admin queue memory not reachable: {e}"
        if problem is not None:
            log.warning("controller %d failed to enable: %s", self.cntlid, problem)
            self.csts |= CSTS.CFS
            return
        cq.sqs.add(0)
        self.cqs = {0: cq}
        self.sqs = {0: sq}
        if self._shutdown_pending:
            self._shutdown()  # finish a shutdown asked for while disabled, before running again
        self.shut_down = False
        self.csts = CSTS.RDY
        self._work.set()

    def controller_reset(self, full: bool = False) -> None:
        """CC.EN 1→0 (or FLR with `full`): stop, delete every queue, forget outstanding work."""
        with self._lock:
            self.sqs.clear()
            self.cqs.clear()
            self.overflow.clear()
            self.aers.clear()  # outstanding AERs are dropped with no completion
            self.abort_marks.clear()
            self.events.clear()
            self.irq.reset()
            self.features.reset()
            self.features.apply_interrupts(self.irq)  # saved coalescing settings survive a reset
            self.shadow = None
            self.suspended = False  # a Controller Level Reset clears suspension (spec notes §1)
            self.nsqa = self.ncqa = 0
            self.queues_requested = False
            self.keep_alive_deadline = None
            if self._shutdown_pending:
                self._shutdown()  # a reset right after CC.SHN still leaves the media flushed
            self.shut_down = False
            self.intms = 0
            self.csts = self.csts & CSTS.SHST_MASK if not full else 0
            if full:
                self.cc = self.aqa = self.asq = self.acq = 0

    def function_level_reset(self) -> None:
        self.controller_reset(full=True)

    def _shutdown(self) -> None:
        """CC.SHN (normal or abrupt): flush the write cache, stop I/O, report SHST complete.

        Commands run to completion as they are fetched, so normal and abrupt shutdown
        differ only in what the host did before asking; both leave the media consistent.
        """
        self._shutdown_pending = Shn.NONE
        for nsid in self.subsystem.attached_namespaces(self.cntlid):
            ns = self.subsystem.namespaces.get(nsid)
            if ns is not None and ns.dirty:
                ns.flush()
        self.shut_down = True
        self.csts = (self.csts & ~CSTS.SHST_MASK) | CSTS.SHST_COMPLETE

    # ================================================================ doorbells
    def _doorbell(self, offset: int, value: int) -> None:
        stride = 4 << self.cap.dstrd
        idx, rem = divmod(offset - DOORBELL_BASE, stride)
        if rem or not self.ready:
            return
        qid, is_cq = divmod(idx, 2)
        if is_cq:
            cq = self.cqs.get(qid)
            if cq is None:
                self._doorbell_error(ErrorEventInfo.INVALID_DOORBELL_REGISTER, qid)
            elif value >= cq.size or (value - cq.head) % cq.size > (cq.tail - cq.head) % cq.size:
                self._doorbell_error(ErrorEventInfo.INVALID_DOORBELL_VALUE, qid)
            else:
                if self.shadow is not None:
                    self.shadow.doorbell_written(qid, True, value)
                cq.head = value
                self._work.set()  # freed slots may unblock an SQ or drain held completions
            return
        sq = self.sqs.get(qid)
        if sq is None:
            self._doorbell_error(ErrorEventInfo.INVALID_DOORBELL_REGISTER, qid)
        elif value >= sq.size:
            self._doorbell_error(ErrorEventInfo.INVALID_DOORBELL_VALUE, qid)
        else:
            if self.shadow is not None:
                self.shadow.doorbell_written(qid, False, value)
            sq.tail = value
            self._work.set()

    def _doorbell_error(self, info: ErrorEventInfo, qid: int) -> None:
        with self._lock:
            self.error_log.record(qid, 0xFFFF, st.INVALID_FIELD.field)
            self.post_event(AsyncEvent(AsyncEventType.ERROR, info, 0x01))

    def kick(self) -> None:
        """Wakes the engine (used by handlers that free resources, and by shadow doorbells)."""
        self._work.set()

    # ================================================================ engine
    def _run(self) -> None:
        wait: float | None = None
        while True:
            self._work.wait(wait if wait is not None else 0.05)
            if self._stopped:
                return
            self._work.clear()
            try:
                with self._lock:
                    if self._shutdown_pending:
                        self._shutdown()
                    did = self._service()
                    wait = self.irq.flush()
                    if self.rate_limiter is not None:
                        wait = self.rate_limiter.engine_wait(wait)  # sleep until tokens refill, no spinning
                    self._check_keep_alive()
            except Exception:  # the engine must never die: record and go on
                log.exception("controller %d engine error", self.cntlid)
                did = False
            if did:
                self._work.set()

    def _service(self) -> bool:
        """One engine pass: round-robin rounds (up to the Arbitration Burst from each SQ per round)
        until no SQ has runnable work or ENGINE_PASS_LIMIT commands ran. The caller signals the
        interrupts of the whole pass once, so a batch of N commands costs the host one wake-up,
        not one per burst. Returns True when another pass must follow at once."""
        if not self.ready or self.csts & CSTS.CFS:
            return False
        self._drain_overflow()
        if self.suspended:
            return False  # TP4159 Suspend: doorbells still move tails, nothing is fetched (migration_state.py)
        if self.shadow is not None:
            self.shadow.refresh(self)
        ab = self.features.get(FID_ARBITRATION) & 0x7
        burst = 1 << 30 if ab == 7 else 1 << ab
        done = 0
        while done < ENGINE_PASS_LIMIT:
            ran = 0
            for sq in list(self.sqs.values()):
                if self.shut_down and sq.qid != 0:
                    continue
                n = min(sq.pending, burst, sq.cq.free_slots - len(self.overflow.get(sq.cq.qid, ())))
                for _ in range(n):
                    if self.sqs.get(sq.qid) is not sq or not self.ready or self.csts & CSTS.CFS:
                        break  # deleted by a command in this burst, or the controller stopped
                    if not self._fetch_and_execute(sq):
                        break  # over its rate limit: this SQ waits for tokens, the others go on
                    ran += 1
            if not ran:
                break
            done += ran
        # Doorbells rung meanwhile have set `_work` already; go again at once only if the pass was
        # cut short, or shadow doorbells (written without an MMIO doorbell) may have moved.
        return done >= ENGINE_PASS_LIMIT or (done > 0 and self.shadow is not None)

    def _fatal(self, why: str) -> None:
        """A failure no CQE can report (SQE fetch or CQE post DMA fault): CSTS.CFS, as QEMU does."""
        log.warning("controller %d fatal: %s", self.cntlid, why)
        self.csts |= CSTS.CFS

    def _fetch_and_execute(self, sq: SubmissionQueue) -> bool:
        """Returns False only when the rate limiter left the command in the SQ (not fetched yet)."""
        try:
            view, off = sq.ring.slot(sq.head)
            sqe = SQE(*unpack_sqe_from(view, off))
        except DmaFault as e:
            self._fatal(f"cannot fetch from SQ {sq.qid}: {e}")
            return True
        if sq.qid and self.rate_limiter is not None and not self.rate_limiter.admit(sqe):
            return False
        sq.head = (sq.head + 1) % sq.size
        req = Request(self, sq, sqe)
        table = self.admin_handlers if sq.qid == 0 else self.io_handlers
        handler = table.get(sqe.opcode)
        pel = 0xFFFF
        try:
            if self.abort_marks and self.abort_marks.pop((sq.qid, sqe.cid), None) is sq:
                status = st.ABORT_REQUESTED  # an Abort named it while it waited in the SQ
            elif sq.qid == 0 and self.aers and any(a.sqe.cid == sqe.cid for a in self.aers):
                status = st.CID_CONFLICT  # the CID of an outstanding AER
            elif handler is None:
                status = st.INVALID_OPCODE
            elif sqe.fuse:
                status = st.INVALID_FIELD  # fused operations are not supported (FUSES = 0)
            else:
                status = handler(req)
        except NvmeError as e:
            status, pel = e.status, e.pel
        except DmaFault as e:
            log.debug("controller %d: %s", self.cntlid, e)
            status = st.DATA_TRANSFER_ERROR
        except Exception:
            log.exception("controller %d: opcode %#x failed", self.cntlid, sqe.opcode)
            status = st.INTERNAL_ERROR
        self.fn.iommu.landed()  # the command's writes into host memory are done (even if its completion waits)
        if status is DEFERRED:
            sq.inflight += 1
            return True
        self.complete(req, status, pel)
        return True

    def complete(self, req: Request, status: Status, pel: int = 0xFFFF) -> None:
        """Posts the CQE of `req` (or queues it while the CQ is full) and schedules its interrupt."""
        with self._lock:
            sq = req.sq
            if self.sqs.get(sq.qid) is not sq:
                return  # the queue is gone; a deleted queue's commands complete nowhere
            field = 0 if status is st.SUCCESS else status.field  # the common case skips the property
            if field:
                self.error_log.record(sq.qid, req.sqe.cid, field, pel, nsid=req.sqe.nsid)
            cq = sq.cq
            entry = (req.dw0, req.dw1, sq.head, sq.qid, req.sqe.cid, field)
            if cq.full or self.overflow.get(cq.qid):
                self.overflow.setdefault(cq.qid, deque()).append(entry)
                return
            try:
                cq.post(*entry)
            except DmaFault as e:
                self._fatal(f"cannot post to CQ {cq.qid}: {e}")
                return
            self.commands_completed += 1
            if cq.ien:
                self.irq.add(cq.vector)

    def complete_deferred(self, req: Request, status: Status) -> None:
        req.sq.inflight -= 1
        self.complete(req, status)
        self._work.set()

    def _drain_overflow(self) -> None:
        for qid, entries in list(self.overflow.items()):
            cq = self.cqs.get(qid)
            if cq is None:
                del self.overflow[qid]
                continue
            while entries and not cq.full:
                try:
                    cq.post(*entries[0])
                except DmaFault as e:
                    self._fatal(f"cannot post to CQ {qid}: {e}")
                    return
                entries.popleft()
                self.commands_completed += 1
                if cq.ien:
                    self.irq.add(cq.vector)
            if not entries:
                del self.overflow[qid]

    def _check_keep_alive(self) -> None:
        if self.keep_alive_deadline is not None and time.monotonic() > self.keep_alive_deadline:
            self.keep_alive_deadline = None
            self.error_log.record(0, 0xFFFF, st.KEEP_ALIVE_EXPIRED.field)
            self.csts |= CSTS.CFS  # the host stopped talking to us: fatal until it resets

    def restart_keep_alive(self) -> None:
        kato = self.features.get(FID_KEEP_ALIVE)
        self.keep_alive_deadline = time.monotonic() + kato / 1000 if kato else None

    # ================================================================ lookups for handlers
    def namespace(self, nsid: int) -> Namespace | None:
        """The namespace `nsid` if it exists and is attached to this controller (for a controller of an
        exported subsystem `nsid` is an ENSID: underlying NSIDs are not visible)."""
        if self.nsid_map is not None:
            nsid = self.nsid_map.get(nsid, 0)
        ns = self.subsystem.namespaces.get(nsid)
        if ns is None or not self.subsystem.is_attached(nsid, self.cntlid):
            return None
        return ns

    def stop(self) -> None:
        self._stopped = True
        self._work.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
