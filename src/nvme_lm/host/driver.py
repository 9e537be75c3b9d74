"""The host NVMe driver: brings a controller up through its PCIe function and runs commands.

Anything on the host side (a guest's driver on its VF, the hypervisor on the PF) uses this.
It touches the device only through BAR0, DMA memory and MSI-X, like a real OS driver.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

from nvme_lm.host import commands as cmd
from nvme_lm.host.memory import DmaMemory
from nvme_lm.host.prp import PrpBuilder
from nvme_lm.host.qpair import Completion, NvmeCommandError, NvmeTimeout, QueuePair, ShadowDoorbellPages
from nvme_lm.pcie.function import PcieFunction
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.identify import IdentifyNamespace, encode_ctrl_list
from nvme_lm.spec.registers import CC, CSTS, Cap, Reg, Shn, aqa

FID_NUMBER_OF_QUEUES = 0x07
DRIVER_STATE_VERSION = 1


class ControllerFatal(RuntimeError):
    """The controller reported CSTS.CFS or never became ready."""


class NvmeDriver:
    def __init__(self, fn: PcieFunction, mem: DmaMemory, *, admin_depth: int = 32, timeout: float = 10.0,
                 poll: bool = False) -> None:
        self.fn = fn
        self.mem = mem
        self.admin_depth = admin_depth
        self.timeout = timeout
        self.poll = poll
        self.cap = Cap()
        self.prp = PrpBuilder(mem)
        self.admin_q: QueuePair | None = None
        self.io_queues: dict[int, IoQueue] = {}
        self._by_vector: dict[int, list[QueuePair]] = defaultdict(list)
        self.shadow: ShadowDoorbellPages | None = None  # Doorbell Buffer Config pages, if in use

    # --- registers ------------------------------------------------------------------------------
    def _csts(self) -> int:
        return self.fn.bar0.read32(Reg.CSTS)

    def _wait_csts(self, mask: int, want: int, what: str) -> None:
        deadline = time.monotonic() + max(self.cap.to, 1) * 0.5
        while True:
            csts = self._csts()
            if csts & CSTS.CFS and want:  # a reset (waiting for RDY=0) is how a host clears CFS
                raise ControllerFatal(f"controller fatal status while waiting for {what}")
            if csts & mask == want:
                return
            if time.monotonic() > deadline:
                raise ControllerFatal(f"timed out after CAP.TO waiting for {what}")
            time.sleep(0.0005)

    # --- bring-up -------------------------------------------------------------------------------
    def start(self) -> None:
        """Disable, program the admin queues, enable, wait for CSTS.RDY within CAP.TO."""
        self.fn.enable()
        for v in range(self.fn.msix.nvectors):
            self.fn.msix.mask(v, False)
        self.fn.msix.connect(self._interrupt)
        self.cap = Cap.decode(self.fn.bar0.read64(Reg.CAP))
        if self.fn.bar0.read32(Reg.CC) & CC.EN:
            self.fn.bar0.write32(Reg.CC, 0)
        self._wait_csts(CSTS.RDY, 0, "CSTS.RDY=0")
        self._release_queues()
        self.admin_q = QueuePair(self.fn, self.mem, 0, self.admin_depth, dstrd=self.cap.dstrd)
        self._by_vector[0].append(self.admin_q)
        self.fn.bar0.write32(Reg.AQA, aqa(self.admin_depth - 1, self.admin_depth - 1))
        self.fn.bar0.write64(Reg.ASQ, self.admin_q.sq_addr)
        self.fn.bar0.write64(Reg.ACQ, self.admin_q.cq_addr)
        self.fn.bar0.write32(Reg.CC, CC.make(en=True, css=0, mps=0, iosqes=6, iocqes=4))
        self._wait_csts(CSTS.RDY, CSTS.RDY, "CSTS.RDY=1")

    def rebind(self, fn: PcieFunction, mem: DmaMemory) -> None:
        """Live migration: the controller state now lives behind `fn` and guest RAM in `mem` (same
        addresses). Re-points every queue and the shadow doorbells; the VMM has already restored
        bus mastering and the MSI-X table on `fn`, so only the interrupt route is connected here."""
        self.fn, self.mem, self.prp = fn, mem, PrpBuilder(mem)
        for qp in [self.admin_q] + [q.qp for q in self.io_queues.values()]:
            if qp is not None:
                qp.rebind(fn, mem)
        if self.shadow is not None:
            self.shadow.rebind(mem)
        fn.msix.connect(self._interrupt)

    def state(self) -> dict:
        """The driver's own state (queue bookkeeping, shadow doorbell pages) as plain data, for moving a
        paused guest: everything else it uses is in guest memory or in the controller's state."""
        assert self.admin_q is not None, "controller not started"
        shadow = None if self.shadow is None else [self.shadow.shadow_addr, self.shadow.eventidx_addr]
        return {"v": DRIVER_STATE_VERSION, "admin_depth": self.admin_depth, "timeout": self.timeout,
                "poll": self.poll, "shadow": shadow, "admin": self.admin_q.state(),
                "io": [q.qp.state() for q in self.io_queues.values()]}

    @classmethod
    def restore(cls, fn: PcieFunction, mem: DmaMemory, state: dict) -> NvmeDriver:
        """The captured driver, now driving `fn` (whose controller state was restored) over `mem`.
        No bring-up: the controller is already live. Call `bind(resolver)` before the guest runs."""
        if state.get("v") != DRIVER_STATE_VERSION:
            raise ValueError(f"driver state version {state.get('v')!r} is not {DRIVER_STATE_VERSION}")
        d = cls(fn, mem, admin_depth=state["admin_depth"], timeout=state["timeout"], poll=state["poll"])
        d.cap = Cap.decode(fn.bar0.read64(Reg.CAP))
        if state["shadow"] is not None:
            d.shadow = ShadowDoorbellPages.__new__(ShadowDoorbellPages)
            d.shadow.stride = 4 << d.cap.dstrd
            d.shadow.shadow_addr, d.shadow.eventidx_addr = state["shadow"]
            d.shadow.rebind(mem)
        d.admin_q = QueuePair.restore(fn, mem, state["admin"], dstrd=d.cap.dstrd)
        d._by_vector[d.admin_q.vector].append(d.admin_q)
        for qs in state["io"]:
            qp = QueuePair.restore(fn, mem, qs, dstrd=d.cap.dstrd)
            qp.shadow = d.shadow
            d.io_queues[qp.qid] = IoQueue(d, qp)
            d._by_vector[qp.vector].append(qp)
        fn.msix.connect(d._interrupt)
        return d

    def bind(self, resolver: Callable[[int, object], Callable[[Completion], None]]) -> None:
        """Reattaches restored outstanding commands to their callbacks: `resolver(qid, tag)`."""
        for qp in [self.admin_q] + [q.qp for q in self.io_queues.values()]:
            if qp is not None:
                qp.bind(lambda tag, qid=qp.qid: resolver(qid, tag))

    @property
    def spurious_completions(self) -> int:
        return sum(qp.spurious for qp in [self.admin_q] + [q.qp for q in self.io_queues.values()] if qp is not None)

    def _interrupt(self, vector: int) -> None:
        for qp in self._by_vector.get(vector, ()):
            qp.irq.set()

    def _release_queues(self) -> None:
        for q in self.io_queues.values():
            q.qp.release()
        self.io_queues.clear()
        if self.admin_q is not None:
            self.admin_q.release()
            self.admin_q = None
        self._by_vector.clear()
        if self.shadow is not None:  # a controller reset ends the shadow buffers' life
            self.shadow.release()
            self.shadow = None

    def shutdown(self) -> None:
        """Orderly shutdown: delete I/O queues, CC.SHN normal, wait for SHST complete, disable."""
        for qid in sorted(self.io_queues, reverse=True):
            self.delete_io_queue(qid)
        cc = self.fn.bar0.read32(Reg.CC)
        self.fn.bar0.write32(Reg.CC, (cc & ~(3 << 14)) | Shn.NORMAL << 14)
        self._wait_csts(CSTS.SHST_MASK, CSTS.SHST_COMPLETE, "shutdown complete")
        self.fn.bar0.write32(Reg.CC, 0)
        self._wait_csts(CSTS.RDY, 0, "CSTS.RDY=0 after shutdown")
        self._release_queues()

    # --- admin commands ---------------------------------------------------------------------------
    def admin(self, sqe: SQE, *, data: bytes | None = None, read: int = 0, check: bool = True,
              timeout: float | None = None) -> tuple[Completion, bytes]:
        """Runs an admin command; `data` is sent to the controller, `read` bytes come back."""
        assert self.admin_q is not None, "controller not started"
        return self._run(self.admin_q, sqe, data=data, read=read, check=check, timeout=timeout)

    def _run(self, qp: QueuePair, sqe: SQE, *, data: bytes | None, read: int, check: bool,
             timeout: float | None) -> tuple[Completion, bytes]:
        length = len(data) if data is not None else read
        buf = self.mem.alloc(length) if length else 0
        lists: list[int] = []
        try:
            if length:
                if data is not None:
                    self.mem.view(buf, len(data))[:] = data
                    mark = getattr(self.mem, "mark_dirty", None)
                    if mark is not None:
                        mark(buf, len(data))
                sqe.prp1, sqe.prp2, lists = self.prp.build(buf, length)
            cid = qp.submit(sqe, cleanup=lists)
            comp = qp.wait(cid, timeout or self.timeout, poll=self.poll)
            out = bytes(self.mem.view(buf, read)) if read else b""
        finally:
            if buf:
                self.mem.free(buf)
        if check and not comp.ok:
            raise NvmeCommandError(f"opcode {sqe.opcode:#04x}", comp)
        return comp, out

    def identify(self, cns: int, nsid: int = 0, cntid: int = 0, csi: int = 0) -> bytes:
        return self.admin(cmd.identify(cns, nsid, cntid, csi), read=4096)[1]

    def get_log(self, lid: int, length: int, *, offset: int = 0, rae: bool = False, nsid: int = 0xFFFFFFFF,
                lsp: int = 0) -> bytes:
        sqe = cmd.get_log_page(lid, length // 4, nsid=nsid, offset=offset, rae=rae, lsp=lsp)
        return self.admin(sqe, read=length)[1]

    def get_features(self, fid: int, sel: int = 0, *, nsid: int = 0, cdw11: int = 0, read: int = 0) -> int:
        comp, _ = self.admin(cmd.get_features(fid, sel, nsid=nsid, cdw11=cdw11), read=read)
        return comp.dw0

    def set_features(self, fid: int, cdw11: int = 0, *, save: bool = False, nsid: int = 0,
                     data: bytes | None = None) -> int:
        comp, _ = self.admin(cmd.set_features(fid, cdw11, save=save, nsid=nsid), data=data)
        return comp.dw0

    def set_number_of_queues(self, nsq: int, ncq: int) -> tuple[int, int]:
        """Requests `nsq`/`ncq` I/O queues; returns what the controller allocated (1-based)."""
        dw0 = self.set_features(FID_NUMBER_OF_QUEUES, (nsq - 1) | (ncq - 1) << 16)
        return (dw0 & 0xFFFF) + 1, (dw0 >> 16) + 1

    # --- optional admin commands ---------------------------------------------------------------
    def enable_shadow_doorbells(self) -> None:
        """Doorbell Buffer Config: I/O queues (present and future) ring MMIO only when needed.

        The admin queue keeps ringing MMIO, as Linux does; the controller mirrors those writes
        into the shadow buffer, so both stay consistent.
        """
        pages = ShadowDoorbellPages(self.mem, self.cap.dstrd)
        try:
            self.admin(cmd.doorbell_buffer_config(pages.shadow_addr, pages.eventidx_addr))
        except Exception:
            pages.release()
            raise
        if self.shadow is not None:
            self.shadow.release()
        self.shadow = pages
        for q in self.io_queues.values():
            q.qp.shadow = pages

    def create_namespace(self, nsze: int, lba_index: int = 0, *, shared: bool = True) -> int:
        """Namespace Management create (fully provisioned: NCAP = NSZE); returns the new NSID."""
        idns = IdentifyNamespace(nsze=nsze, ncap=nsze, flbas=(lba_index & 0xF) | ((lba_index >> 4) & 0x3) << 5,
                                 nmic=int(shared))
        comp, _ = self.admin(cmd.ns_create(), data=idns.encode())
        return comp.dw0

    def delete_namespace(self, nsid: int) -> None:
        self.admin(cmd.ns_delete(nsid))

    def attach_namespace(self, nsid: int, cntlids: list[int]) -> None:
        self.admin(cmd.ns_attach(nsid, attach=True), data=encode_ctrl_list(cntlids))

    def detach_namespace(self, nsid: int, cntlids: list[int]) -> None:
        self.admin(cmd.ns_attach(nsid, attach=False), data=encode_ctrl_list(cntlids))

    def format_namespace(self, nsid: int, lba_index: int, *, ses: int = 0) -> None:
        self.admin(cmd.format_nvm(nsid, lba_index, ses=ses))

    def abort(self, sqid: int, cid: int) -> bool:
        """Abort; True if the controller says the command was (or will be) aborted."""
        comp, _ = self.admin(cmd.abort(sqid, cid))
        return not comp.dw0 & 1

    def keep_alive(self) -> None:
        self.admin(cmd.keep_alive())

    def submit_aer(self) -> int:
        """Posts an Asynchronous Event Request; returns its CID (wait with `admin_q.wait`)."""
        assert self.admin_q is not None, "controller not started"
        return self.admin_q.submit(cmd.async_event_request())

    # --- I/O queues ----------------------------------------------------------------------------------
    def create_io_queue(self, qid: int, depth: int, *, vector: int | None = None) -> IoQueue:
        vector = qid % self.fn.msix.nvectors if vector is None else vector
        qp = QueuePair(self.fn, self.mem, qid, depth, dstrd=self.cap.dstrd, vector=vector)
        try:
            self.admin(cmd.create_io_cq(qid, depth, qp.cq_addr, vector=vector))
            try:
                self.admin(cmd.create_io_sq(qid, depth, qp.sq_addr, qid))
            except Exception:
                self.admin(cmd.delete_io_cq(qid), check=False)
                raise
        except Exception:
            qp.release()
            raise
        qp.shadow = self.shadow
        q = IoQueue(self, qp)
        self.io_queues[qid] = q
        self._by_vector[vector].append(qp)
        return q

    def delete_io_queue(self, qid: int) -> None:
        q = self.io_queues.pop(qid)
        self.admin(cmd.delete_io_sq(qid))
        self.admin(cmd.delete_io_cq(qid))
        self._by_vector[q.qp.vector].remove(q.qp)
        q.qp.release()


class IoQueue:
    """An I/O queue pair with synchronous helpers and an asynchronous `submit` for deep queues."""

    def __init__(self, driver: NvmeDriver, qp: QueuePair) -> None:
        self.driver = driver
        self.qp = qp

    @property
    def qid(self) -> int:
        return self.qp.qid

    def run(self, sqe: SQE, *, data: bytes | None = None, read: int = 0, check: bool = True,
            timeout: float | None = None) -> tuple[Completion, bytes]:
        return self.driver._run(self.qp, sqe, data=data, read=read, check=check, timeout=timeout)

    def submit(self, sqe: SQE, buf: int, length: int, callback, *, ring: bool = True, tag: object = None) -> int:
        """Submits with the data buffer at guest address `buf`; `callback(Completion)` on completion.
        `tag` names the callback for a restore after migration (see `QueuePair.submit`)."""
        lists: list[int] = []
        if length:
            sqe.prp1, sqe.prp2, lists = self.driver.prp.build(buf, length)
        return self.qp.submit(sqe, callback=callback, cleanup=lists, ring=ring, tag=tag)

    def read(self, nsid: int, slba: int, nlb: int, lba_size: int) -> bytes:
        return self.run(cmd.read(nsid, slba, nlb), read=nlb * lba_size)[1]

    def write(self, nsid: int, slba: int, data: bytes, lba_size: int, *, fua: bool = False) -> Completion:
        return self.run(cmd.write(nsid, slba, len(data) // lba_size, fua=fua), data=data)[0]


__all__ = ["ControllerFatal", "IoQueue", "NvmeCommandError", "NvmeDriver", "NvmeTimeout"]
