"""One host's hardware as its hypervisor sees it: an SSD reached only through its PCIe functions.

`Node` is the one place a device is constructed ("installing hardware"). From then on the hypervisor
drives it like a real one: the PF with its own host driver (`NvmeDriver` over host memory mapped into
the PF's IOMMU, separate from any VM's memory) for management, and each VF handed to a VM. Provisioning
gives a VF a namespace, a fixed identity (an exported NVM subsystem from a template, TP4193) and its
queue/interrupt resources; the PF keeps the namespace attached too (NMIC shared), because the PF is the
migration management controller and copies the VM's data during pre-copy with `read_lbas`/`write_lbas`.

Threads (what may run concurrently):
- PF admin commands (`problems`, `provision`, `release`, `exported_state`, `set_rate_limit`,
  `allocated_ranges`, anything a caller runs with `node.pf.admin`) may come from any thread: the admin
  queue pair assigns CIDs and reaps under its lock and each waiter picks up its own CID; host memory
  allocation is locked here. `provision` and `release` are also serialised with each other (VF choice).
  One known cost: two threads waiting on the admin queue at the same moment can miss each other's
  interrupt and then notice their completion only at the driver's 100 ms re-check.
- `read_lbas`, `write_lbas`, `deallocate` use the PF's I/O queues only and are serialised among
  themselves (one transfer at a time); they run alongside admin commands and alongside every VM's
  guest driver on its VF (separate function, memory and queues).
- `map_guest`/`unmap_guest`/`restore_pci` program a VF's function and are for the thread that owns
  that VM (the VM must not be running I/O through the VF while its mapping changes).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nvme_lm.device.model import DeviceModel
from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.device.template import Template
from nvme_lm.host import commands as cmd
from nvme_lm.host import exported as hx
from nvme_lm.host import migration as hm
from nvme_lm.host import rate_limit as hrl
from nvme_lm.host import tracking as ht
from nvme_lm.host import virtualization as hv
from nvme_lm.host.driver import IoQueue, NvmeDriver
from nvme_lm.host.lba_status import allocated_ranges as _allocated_ranges
from nvme_lm.host.qpair import Completion, NvmeCommandError, NvmeTimeout
from nvme_lm.pcie.function import PcieFunction
from nvme_lm.spec import status as st
from nvme_lm.spec.cdq import INVALID_CDQ, MCUDMQ
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.exported import ConfigState, ConfigStateError
from nvme_lm.spec.identify import (
    CNS,
    IdentifyController,
    IdentifyNamespace,
    SecondaryControllerEntry,
    decode_nsid_list,
)
from nvme_lm.spec.opcodes import IoOpcode
from nvme_lm.vm.memory import GuestMemory

__all__ = ["ECNTLID", "ENSID", "HOST_MEM_BASE", "Node", "ProvisionError", "ReleaseError", "VfRequirements",
           "VfSlot"]

HOST_MEM_BASE = 0x10_0000  # bus address of the hypervisor's DMA memory in the PF's IOMMU domain
ENSID = 1  # the NSID a VM uses for its namespace (docs: issue5-design "The guest uses ENSID 1")
ECNTLID = 1  # the CNTLID a VM sees on a freshly provisioned VF (a destination takes the source's)
COPY_CHUNK = 1 << 20  # default bytes per PF copy command (capped by the PF's MDTS: 1 MiB on vendor-a, 128 KiB on B)
BOUNCE_SHARE = 4  # bounce buffers take at most 1/BOUNCE_SHARE of the host memory
DSM_MAX_RANGES = 256
DSM_MAX_NLB = 0xFFFFFFFF
_DSM = np.dtype([("cattr", "<u4"), ("nlb", "<u4"), ("slba", "<u8")])  # Dataset Management range, 16 B


# ============================================================================================ types
@dataclass(frozen=True)
class VfRequirements:
    """What a VM needs from a VF. `template` is a built-in template NAME (its UUID comes from the file)."""

    capacity_bytes: int
    lba_size: int
    template: str = "generic-v1"
    nvq: int = 2  # VQ resources: the admin queue + nvq - 1 I/O queue pairs
    nvi: int = 2  # VI resources: MSI-X vectors
    exported_state: bytes | None = None  # destination: the source's exported configuration state


@dataclass
class VfSlot:
    """A provisioned VF. `cntlid`/`nsid`/`esubid` are this device's; `ecntlid`/`ensid` are what the VM sees."""

    vfn: int
    cntlid: int
    nsid: int
    esubid: int
    ecntlid: int
    ensid: int
    lba_size: int
    nlb: int
    fn: PcieFunction
    nvq: int = 2
    nvi: int = 2
    template: str = "generic-v1"
    mapped_iova: int | None = field(default=None, repr=False)  # guest memory in the VF's IOMMU


class ProvisionError(RuntimeError):
    """Provisioning failed at `step` (with the controller's `status` when a command was refused), or the
    node cannot host the VF at all (`problems`). Whatever had been done was undone."""

    def __init__(self, step: str, message: str, *, status: st.Status | None = None,
                 problems: list[str] | None = None) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.status = status
        self.problems = problems or []


class ReleaseError(RuntimeError):
    """Teardown finished its best effort but something is left (listed in `leftovers`)."""

    def __init__(self, leftovers: list[str]) -> None:
        super().__init__("release left: " + "; ".join(leftovers))
        self.leftovers = leftovers


@functools.cache
def _template(name: str) -> Template | None:
    try:
        return Template.builtin(name)
    except ValueError:
        return None


@functools.cache
def _template_names() -> dict[uuidlib.UUID, str]:
    return {t.uuid: t.name for t in (Template.builtin(n) for n in Template.builtin_names())}


class _HostMemory(GuestMemory):
    """The hypervisor's DMA memory; its allocator is shared by threads (admin commands, copies), so locked."""

    def __init__(self, size: int, base: int) -> None:
        super().__init__(size, base=base)
        self._lock = threading.Lock()

    def alloc(self, nbytes: int) -> int:
        with self._lock:
            return super().alloc(nbytes)

    def free(self, addr: int) -> None:
        with self._lock:
            super().free(addr)


def _status_text(e: NvmeCommandError) -> str:
    dw0 = e.completion.dw0
    return f"{e.status}" + (f", DW0 {dw0:#x}" if dw0 and e.status.sc == 0x44 else "")


# ============================================================================================ node
class Node:
    def __init__(self, name: str, data_dir: Path | str, model: str, *, copy_queues: int = 2, copy_depth: int = 64,
                 host_mem_bytes: int = 64 << 20, copy_chunk: int = COPY_CHUNK, timeout: float = 10.0) -> None:
        if copy_queues < 1 or copy_depth < copy_queues:
            raise ValueError("need at least one copy queue and one command in flight per queue")
        self.name = name
        self.model_name = model
        self.data_dir = Path(data_dir)
        self.ssd = EmulatedSsd(self.data_dir / "ssd", DeviceModel.builtin(model))  # installing the hardware
        try:
            self._start(host_mem_bytes, timeout, copy_queues, copy_depth, copy_chunk)
        except BaseException:
            self.ssd.power_off()
            raise

    def _start(self, host_mem_bytes: int, timeout: float, copy_queues: int, copy_depth: int, copy_chunk: int) -> None:
        """The hypervisor's side of the PF: DMA memory, the started driver, the copy queues."""
        self.mem = _HostMemory(host_mem_bytes, HOST_MEM_BASE)
        self._mem_ptr = np.frombuffer(self.mem.buf, np.uint8).ctypes.data
        self.ssd.pf.iommu.map(self.mem.base, self.mem.buf)
        self.pf = NvmeDriver(self.ssd.pf, self.mem, timeout=timeout)
        self.pf.start()
        self.slots: dict[int, VfSlot] = {}  # by VF number
        self._mgmt = threading.RLock()
        self._copy = threading.Lock()
        self._lba_sizes: dict[int, int] = {}
        idc = IdentifyController.decode(self.pf.identify(CNS.CTRL))
        self.cntlid = idc.cntlid  # the PF's (primary) controller
        page = 4096 << self.pf.cap.mpsmin
        self.mdts_bytes = (page << idc.mdts) if idc.mdts else 1 << 30
        self.copy_chunk = max(page, min(copy_chunk, self.mdts_bytes) // page * page)
        self.copy_depth = copy_depth
        # PF copy queues: all on one vector, so one interrupt wakes the copier whichever queue completed
        per_queue = math.ceil(copy_depth / copy_queues)
        self.pf.set_number_of_queues(copy_queues, copy_queues)
        vector = 1 if self.ssd.pf.msix.nvectors > 1 else 0
        self.copy_queues: list[IoQueue] = [self.pf.create_io_queue(q + 1, per_queue + 1, vector=vector)
                                           for q in range(copy_queues)]
        self._bounce_count = min(copy_depth, max(2, host_mem_bytes // BOUNCE_SHARE // self.copy_chunk))
        self._bounce: list[tuple[int, memoryview, int]] = []  # (address, view, PRP2 for > 2 pages)
        self._copy_broken = False
        self._closed = False

    def _bounce_buffers(self) -> list[tuple[int, memoryview, int]]:
        """Bounce buffers with their PRP entries built once (so a copy command allocates nothing); made on
        first use, as callers that read into `host_buffer` memory never need them."""
        if not self._bounce:
            for _ in range(self._bounce_count):
                addr = self.mem.alloc(self.copy_chunk)
                _, prp2, _lists = self.pf.prp.build(addr, self.copy_chunk)  # list pages kept for the node's life
                self._bounce.append((addr, self.mem.view(addr, self.copy_chunk), prp2))
        return self._bounce

    # ------------------------------------------------------------------------------ queries
    def _offered_templates(self) -> list[uuidlib.UUID]:
        return hx.template_uuids(self.pf)

    def _lba_formats(self) -> dict[int, int]:
        """LBA data size -> format index, for the formats without metadata the device offers (Identify
        Namespace NSID FFFFFFFFh: what Namespace Management's FLBAS indexes)."""
        idns = IdentifyNamespace.decode(self.pf.identify(CNS.NS, nsid=0xFFFFFFFF))
        out: dict[int, int] = {}
        for i, f in enumerate(idns.lbaf[: idns.nlbaf + 1]):
            if f.lbads and not f.ms:
                out.setdefault(1 << f.lbads, i)
        return out

    def model_lba_sizes(self) -> list[int]:
        """The LBA data sizes the device formats namespaces with."""
        return sorted(self._lba_formats())

    def _busy_vfs(self) -> set[int]:
        """CNTLIDs associated with any exported subsystem (persisted ones included)."""
        busy: set[int] = set()
        with self._mgmt:  # a release deleting a subsystem between the two commands is not a failure
            for e in hx.list_subsystems(self.pf):
                busy.update(hx.underlying_controllers(self.pf, e.esubid))
        return busy

    def _free_vf(self) -> SecondaryControllerEntry | None:
        busy = self._busy_vfs()
        for e in sorted(hv.secondary_controllers(self.pf), key=lambda e: e.vfn):
            if not e.online and e.vfn not in self.slots and e.scid not in busy:
                return e
        return None

    def problems(self, req: VfRequirements) -> list[str]:
        """Why this node cannot host `req` (empty: it can). Everything is read through the PF."""
        with self._mgmt:
            return self._problems(req)[0]

    def _problems(self, req: VfRequirements) -> tuple[list[str], ConfigState | None]:
        out: list[str] = []
        pf = self.pf
        t = _template(req.template)
        if t is None:
            out.append(f"template {req.template!r} is unknown (built-in: {', '.join(Template.builtin_names())})")
        else:
            offered = self._offered_templates()
            if t.uuid not in offered:
                names = ", ".join(_template_names().get(u, str(u)) for u in offered)
                out.append(f"template {t.name} ({t.uuid}) is not offered by this {self.model_name} device "
                           f"(it offers: {names or 'none'})")
        model_sizes = self.model_lba_sizes()
        if req.lba_size not in model_sizes:
            out.append(f"LBA size {req.lba_size} is not a format of {self.model_name} ({model_sizes})")
        if t is not None and req.lba_size not in t.lba_sizes:
            out.append(f"LBA size {req.lba_size} is not a format of template {t.name} ({list(t.lba_sizes)})")
        if req.capacity_bytes <= 0 or req.lba_size <= 0 or req.capacity_bytes % req.lba_size:
            out.append(f"capacity {req.capacity_bytes} is not a positive multiple of the LBA size {req.lba_size}")
        idc = IdentifyController.decode(pf.identify(CNS.CTRL))
        if req.capacity_bytes > idc.unvmcap:
            out.append(f"capacity {req.capacity_bytes} bytes exceeds the unallocated {idc.unvmcap} bytes")
        allocated = decode_nsid_list(pf.identify(CNS.ALLOCATED_NS_LIST))
        if len(allocated) >= idc.nn:
            out.append(f"all {idc.nn} namespace identifiers are in use")
        if self._free_vf() is None:
            out.append("no free VF (every secondary controller is online or assigned)")
        caps = hv.primary_capabilities(pf)
        for what, n, least, most, gran, free in (
            ("VQ", req.nvq, 2, caps.vqfrsm, caps.vqgran, caps.vqfrt - caps.vqrfap - caps.vqrfa),
            ("VI", req.nvi, 1, caps.vifrsm, caps.vigran, caps.vifrt - caps.virfap - caps.virfa),
        ):
            if n < least:
                out.append(f"{n} {what} resources: a VF needs at least {least} to go online")
            if n > most:
                out.append(f"{n} {what} resources exceed the {most} one VF may hold")
            if gran and n % gran:
                out.append(f"{n} {what} resources are not a multiple of the granularity {gran}")
            if n > free:
                out.append(f"{n} {what} resources asked, {free} free")
        cs = None
        if req.exported_state is not None:
            try:
                cs = ConfigState.decode(req.exported_state)
            except ConfigStateError as e:
                out.append(f"exported state refused: {e}")
            if cs is not None:
                out += self._state_problems(req, cs, t)
        return out, cs

    def _state_problems(self, req: VfRequirements, cs: ConfigState, t: Template | None) -> list[str]:
        out = []
        if t is not None and cs.template != t.uuid:
            out.append(f"exported state uses template {_template_names().get(cs.template, cs.template)}, "
                       f"not {t.name}")
        if len(cs.controllers) != 1 or len(cs.namespaces) != 1:
            out.append(f"exported state has {len(cs.controllers)} controllers and {len(cs.namespaces)} "
                       "namespaces; a VF slot takes exactly one of each")
        elif req.lba_size > 0:
            ns = cs.namespaces[0]
            if (ns.nsze, 1 << ns.lbads) != (req.capacity_bytes // req.lba_size, req.lba_size):
                out.append(f"exported namespace is {ns.nsze} x {1 << ns.lbads} B, the request "
                           f"{req.capacity_bytes // req.lba_size} x {req.lba_size} B")
        for e in hx.list_subsystems(self.pf):
            if hx.config_state(self.pf, e.esubid).nqn == cs.nqn:
                out.append(f"exported subsystem {cs.nqn} already exists here (ESUBID {e.esubid})")
        return out

    # ------------------------------------------------------------------------------ provisioning
    def provision(self, req: VfRequirements) -> VfSlot:
        """Namespace (shared, attached to the PF too), exported subsystem (new, or recreated from the
        source's state), VF resources and Online. Any failure undoes what was done and raises."""
        with self._mgmt:
            problems, cs = self._problems(req)
            if problems:
                raise ProvisionError("check", "; ".join(problems), problems=problems)
            t = _template(req.template)
            assert t is not None
            entry = self._free_vf()
            assert entry is not None
            vfn, scid = entry.vfn, entry.scid
            nlb = req.capacity_bytes // req.lba_size
            undo: list[tuple[str, Callable[[], object]]] = []
            pf = self.pf

            def step(name: str, fn: Callable[[], object], undo_name: str | None = None,
                     undo_fn: Callable[[], object] | None = None):
                try:
                    result = fn()
                except NvmeCommandError as e:
                    self._undo(undo)
                    raise ProvisionError(name, _status_text(e), status=e.status) from e
                except Exception as e:
                    self._undo(undo)
                    raise ProvisionError(name, f"{type(e).__name__}: {e}") from e
                if undo_fn is not None:
                    undo.append((undo_name or name, undo_fn))
                return result

            lba_index = self._lba_formats()[req.lba_size]
            nsid = step("create namespace", lambda: pf.create_namespace(nlb, lba_index, shared=True))
            assert isinstance(nsid, int)
            undo.append(("delete namespace", lambda: pf.delete_namespace(nsid)))
            step("attach namespace to the PF", lambda: pf.attach_namespace(nsid, [self.cntlid]),
                 "detach namespace from the PF", lambda: pf.detach_namespace(nsid, [self.cntlid]))
            if cs is None:
                ensid, ecntlid = ENSID, ECNTLID
                index = step("find template", lambda: hx.template_index(pf, t.uuid))
                esubid = step("create exported subsystem", lambda: hx.create(pf, index)[0])  # type: ignore[index]
            else:
                ensid, ecntlid = cs.namespaces[0].ensid, cs.controllers[0].ecntlid
                state = req.exported_state
                assert state is not None
                esubid = step("set exported configuration state", lambda: hx.set_config_state(pf, state))
            assert isinstance(esubid, int)
            undo.append(("delete exported subsystem", lambda: hx.delete(pf, esubid)))
            step("associate namespace", lambda: hx.associate_namespace(pf, esubid, ensid, nsid),
                 "disassociate namespace", lambda: hx.disassociate_namespace(pf, esubid, ensid))
            step("associate controller", lambda: hx.associate_controllers(pf, esubid, [(scid, ecntlid)]),
                 "disassociate controller", lambda: hx.disassociate_controllers(pf, esubid, [(scid, ecntlid)]))
            undo.append(("take the VF offline", lambda: hv.offline(pf, scid)))
            step("bring up VF", lambda: hv.bring_up_vf(pf, vfn, req.nvq, req.nvi))
            slot = VfSlot(vfn=vfn, cntlid=scid, nsid=nsid, esubid=esubid, ecntlid=ecntlid, ensid=ensid,
                          lba_size=req.lba_size, nlb=nlb, fn=self.ssd.vf(vfn), nvq=req.nvq, nvi=req.nvi,
                          template=t.name)
            self.slots[vfn] = slot
            self._lba_sizes[nsid] = req.lba_size
            return slot

    @staticmethod
    def _undo(undo: list[tuple[str, Callable[[], object]]]) -> list[str]:
        failed = []
        for name, fn in reversed(undo):
            try:
                fn()
            except Exception as e:  # keep undoing the rest; report what stayed
                failed.append(f"{name}: {e}")
        undo.clear()
        return failed

    def release(self, slot: VfSlot) -> None:
        """Tears a VF down (best effort at every step), then checks through the PF that nothing is left."""
        with self._mgmt:
            pf, failures = self.pf, []

            def attempt(what: str, fn: Callable[[], object]) -> None:
                try:
                    fn()
                except Exception as e:
                    failures.append(f"{what}: {e}")

            # FLR first (what VFIO does when a VM lets its VF go): the controller stops and stops DMA before
            # its memory goes, and a Controller Level Reset ends a Migration Send suspension without running
            # the commands queued at suspend. Offline of a suspended secondary is refused (39h Controller
            # Suspended, docs/controller-state.md) and Resume would run those commands here a second time.
            attempt("reset the VF function (FLR)", slot.fn.flr)
            attempt("unmap guest memory", lambda: self.unmap_guest(slot))
            attempt("stop memory tracking", lambda: self._stop_tracking(slot.cntlid))
            attempt("clear rate limit", lambda: hrl.clear_rate_limit(pf, slot.cntlid))  # limits outlive resets
            attempt("take the VF offline", lambda: hv.offline(pf, slot.cntlid))
            attempt("disassociate controller",
                    lambda: hx.disassociate_controllers(pf, slot.esubid, [(slot.cntlid, slot.ecntlid)]))
            attempt("disassociate namespace", lambda: hx.disassociate_namespace(pf, slot.esubid, slot.ensid))
            attempt("delete exported subsystem", lambda: hx.delete(pf, slot.esubid))
            attempt("detach namespace from the PF", lambda: pf.detach_namespace(slot.nsid, [self.cntlid]))
            attempt("delete namespace", lambda: pf.delete_namespace(slot.nsid))
            self.slots.pop(slot.vfn, None)
            self._lba_sizes.pop(slot.nsid, None)
            left = self._leftovers(slot)
            if left:
                raise ReleaseError(left + [f"({f})" for f in failures])

    def _stop_tracking(self, cntlid: int) -> None:
        comp, _ = self.pf.admin(ht.track_memory_changes(cntlid, False), check=False)
        if not comp.ok and comp.st != st.COMMAND_SEQUENCE_ERROR:  # sequence error: nothing was tracked
            raise NvmeCommandError("Track Send stop", comp)

    def _leftovers(self, slot: VfSlot) -> list[str]:
        left = []
        if slot.nsid in decode_nsid_list(self.pf.identify(CNS.ALLOCATED_NS_LIST)):
            left.append(f"namespace {slot.nsid}")
        if any(e.esubid == slot.esubid for e in hx.list_subsystems(self.pf)):
            left.append(f"exported subsystem {slot.esubid}")
        entry = hv.secondary_for_vf(self.pf, slot.vfn)
        if entry.online or entry.nvq or entry.nvi:
            left.append(f"VF {slot.vfn} online={entry.online} NVQ={entry.nvq} NVI={entry.nvi}")
        if slot.mapped_iova is not None:
            left.append(f"guest memory mapped at {slot.mapped_iova:#x}")
        return left

    def exported_state(self, slot: VfSlot) -> bytes:
        """The exported configuration state a destination recreates the VF's identity from."""
        return hx.get_config_state(self.pf, slot.esubid)

    # ------------------------------------------------------------------------------ inspection, orphans
    def resources(self) -> dict[str, Any]:
        """What the device holds for VMs, read through the PF only: exported subsystems with their associations,
        namespaces, VFs in use with their migration state (suspended: Migration Receive refuses a running
        controller with 3Ah; memory tracking: Track Receive refuses an untracked one with 0Ch; rate limit:
        Get Features 28h) and the PF's UDMQs (Get Features 21h refuses an unknown CDQID with 37h). Track
        Receive drains what it reports: call this between migrations, not during one."""
        pf = self.pf
        with self._mgmt:
            subsystems = [{"esubid": e.esubid,
                           "controllers": [[c.ecntlid, c.cntlid] for c in hx.exported_controllers(pf, e.esubid)],
                           "namespaces": [[n.ensid, n.unsid] for n in hx.exported_namespaces(pf, e.esubid)]}
                          for e in hx.list_subsystems(pf)]
            namespaces = decode_nsid_list(pf.identify(CNS.ALLOCATED_NS_LIST))
            vfs = []
            for e in hv.secondary_controllers(pf):
                if not (e.online or e.nvq or e.nvi):
                    continue
                vf: dict[str, Any] = {"vfn": e.vfn, "cntlid": e.scid, "online": e.online, "nvq": e.nvq, "nvi": e.nvi}
                if e.online:
                    vf["suspended"] = self._probe(hm.get_state(e.scid, 4096), 4096, st.CONTROLLER_NOT_SUSPENDED)
                    vf["tracking"] = self._probe(ht.track_receive(e.scid, 4096), 4096, st.COMMAND_SEQUENCE_ERROR)
                    rl = hrl.get_rate_limit(pf, e.scid)
                    vf["rate_limit"] = {"enabled": rl.enabled, "iops": rl.tiops, "write_iops": rl.wiops,
                                        "bandwidth": rl.tbwv, "write_bandwidth": rl.wbwv, "bwsf": rl.bwsf}
                vfs.append(vf)
            udmqs = [i for i in range(MCUDMQ) if self._probe(ht.cdq_get(i), 512, INVALID_CDQ)]
        return {"exported_subsystems": subsystems, "namespaces": namespaces, "vfs": vfs, "udmqs": udmqs}

    def _probe(self, sqe: SQE, read: int, absent: st.Status) -> bool:
        """True if the command succeeds, False if it fails with `absent`; any other failure raises."""
        comp, _ = self.pf.admin(sqe, read=read, check=False)
        if comp.ok:
            return True
        if (comp.st.sct, comp.st.sc) == (absent.sct, absent.sc):
            return False
        raise NvmeCommandError(f"probe {sqe.opcode:#x}", comp)

    def release_orphans(self) -> list[str]:
        """Everything a VM held on this device, released: for an agent that starts (a VM lives in its agent's
        process, so none survives a restart and whatever the last agent provisioned is an orphan: exported
        subsystems with their associations, namespaces, VFs). Best effort per step; returns what was
        released and, prefixed "left:", what could not be."""
        pf, out = self.pf, []

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
                out.append(what)
            except Exception as e:
                out.append(f"left: {what}: {e}")

        with self._mgmt:
            for e in hx.list_subsystems(pf):
                esubid = e.esubid
                for c in hx.exported_controllers(pf, esubid):
                    if c.cntlid != 0xFFFF:
                        with contextlib.suppress(Exception):
                            hv.offline(pf, c.cntlid)
                        attempt(f"controller {c.cntlid} of exported subsystem {esubid}",
                                functools.partial(hx.disassociate_controllers, pf, esubid, [(c.cntlid, c.ecntlid)]))
                for n in hx.exported_namespaces(pf, esubid):
                    if n.unsid:
                        attempt(f"namespace {n.unsid} of exported subsystem {esubid}",
                                functools.partial(hx.disassociate_namespace, pf, esubid, n.ensid))
                attempt(f"exported subsystem {esubid}", functools.partial(hx.delete, pf, esubid))
            for nsid in decode_nsid_list(pf.identify(CNS.ALLOCATED_NS_LIST)):
                with contextlib.suppress(Exception):
                    pf.detach_namespace(nsid, [self.cntlid])
                attempt(f"namespace {nsid}", functools.partial(pf.delete_namespace, nsid))
            for e in hv.secondary_controllers(pf):
                if e.online or e.nvq or e.nvi:
                    attempt(f"VF {e.vfn}", functools.partial(hv.offline, pf, e.scid))
        return out

    # ------------------------------------------------------------------------------ the VF's PCIe side
    def map_guest(self, slot: VfSlot, mem: GuestMemory) -> None:
        """The hypervisor programs the VF's IOMMU: guest-physical = bus address in the VF's domain."""
        if slot.mapped_iova is not None:
            raise RuntimeError(f"VF {slot.vfn} already maps guest memory at {slot.mapped_iova:#x}")
        slot.fn.iommu.map(mem.base, mem.buf)
        slot.mapped_iova = mem.base

    def unmap_guest(self, slot: VfSlot) -> None:
        if slot.mapped_iova is not None:
            slot.fn.iommu.unmap(slot.mapped_iova)
            slot.mapped_iova = None

    @staticmethod
    def restore_pci(slot: VfSlot) -> None:
        """What a VMM restores on a destination VF before the guest resumes: memory space and bus
        mastering on (PCI command register), MSI-X enabled with every vector unmasked."""
        slot.fn.enable()
        for v in range(slot.fn.msix.nvectors):
            slot.fn.msix.mask(v, False)

    def set_rate_limit(self, slot: VfSlot, iops: int, *, write_mib_s: float = 0, read_mib_s: float = 0) -> None:
        """TP4176 hard limits on the VF's controller, set through the PF: total IOPS (the VM's QoS), write
        bandwidth and read bandwidth (the migration's throttles); 0 is no limit of that kind, all 0 removes it.
        TP4176 has no read-only bucket: a read limit is the total bandwidth bucket set to reads + writes."""
        if iops < 0 or write_mib_s < 0 or read_mib_s < 0:
            raise ValueError("limits must be >= 0")
        if iops or write_mib_s or read_mib_s:
            hrl.set_rate_limit(self.pf, slot.cntlid, iops=iops or None, write_mib_s=write_mib_s or None,
                               mib_s=(read_mib_s + write_mib_s) if read_mib_s else None)
        else:
            hrl.clear_rate_limit(self.pf, slot.cntlid)

    def allocated_ranges(self, slot: VfSlot) -> list[tuple[int, int]]:
        """(slba, nlb) ranges of the VF's namespace that may hold data (Get LBA Status ATYPE 02h on the PF)."""
        return _allocated_ranges(self.pf, slot.nsid)

    # ------------------------------------------------------------------------------ the copy path
    def host_buffer(self, nbytes: int) -> memoryview:
        """A view of the node's DMA memory: `read_lbas`/`write_lbas` move data straight into / out of it
        with no bounce copy. Give it back with `free_host_buffer`."""
        addr = self.mem.alloc(nbytes)
        return self.mem.view(addr, nbytes)

    def free_host_buffer(self, view: memoryview) -> None:
        addr = self._host_addr(view)
        if addr is None:
            raise ValueError("not a host buffer of this node")
        self.mem.free(addr)

    def _host_addr(self, view: memoryview) -> int | None:
        """The bus address of `view` if it lies in the node's DMA memory (dword aligned), else None."""
        if view.nbytes == 0 or not view.c_contiguous:
            return None
        off = np.frombuffer(view, np.uint8).ctypes.data - self._mem_ptr
        if off < 0 or off + view.nbytes > self.mem.size or off % 4:
            return None
        return self.mem.base + off

    def lba_size(self, nsid: int) -> int:
        """The LBA data size of namespace `nsid` (Identify Namespace on the PF, cached)."""
        size = self._lba_sizes.get(nsid)
        if size is None:
            idns = IdentifyNamespace.decode(self.pf.identify(CNS.NS, nsid=nsid))
            if not idns.nsze:
                raise ValueError(f"namespace {nsid} is not attached to the PF")
            index = (idns.flbas & 0xF) | ((idns.flbas >> 5) & 0x3) << 4
            size = self._lba_sizes[nsid] = 1 << idns.lbaf[index].lbads
        return size

    def read_lbas(self, nsid: int, ranges: list[tuple[int, int]], out: memoryview) -> None:
        """Reads the (slba, nlb) ranges back to back into `out` through the PF's I/O queues."""
        self._ranges_transfer(IoOpcode.READ, nsid, ranges, out)

    def write_lbas(self, nsid: int, slba: int, data: memoryview) -> None:
        """Writes `data` (whole LBAs) from `slba` on through the PF's I/O queues."""
        lba = self.lba_size(nsid)
        nbytes = memoryview(data).nbytes
        if nbytes % lba:
            raise ValueError(f"{nbytes} bytes is not a whole number of {lba}-byte LBAs")
        self._ranges_transfer(IoOpcode.WRITE, nsid, [(slba, nbytes // lba)], data)

    def write_ranges(self, nsid: int, ranges: list[tuple[int, int]], data: memoryview) -> None:
        """Writes the (slba, nlb) ranges from `data`, where they lie back to back (read_lbas' mirror):
        scattered changes go out as one batch of commands, many in flight."""
        self._ranges_transfer(IoOpcode.WRITE, nsid, ranges, data)

    def _ranges_transfer(self, opcode: int, nsid: int, ranges: list[tuple[int, int]], buf: memoryview) -> None:
        lba = self.lba_size(nsid)
        buf = memoryview(buf).cast("B") if memoryview(buf).format != "B" else memoryview(buf)
        total = sum(n for _, n in ranges) * lba
        if buf.nbytes != total:
            raise ValueError(f"the buffer holds {buf.nbytes} bytes, the ranges {total}")
        self._transfer(opcode, nsid, lba, self._commands(ranges, lba), buf)

    def _commands(self, ranges: list[tuple[int, int]], lba: int) -> Iterator[tuple[int, int, int]]:
        """(slba, nlb, byte offset in the buffer) of each command: at most one copy chunk each."""
        step = self.copy_chunk // lba
        off = 0
        for slba, nlb in ranges:
            end = slba + nlb
            for s in range(slba, end, step):
                n = min(step, end - s)
                yield s, n, off
                off += n * lba

    def _transfer(self, opcode: int, nsid: int, lba: int, cmds: Iterator[tuple[int, int, int]],
                  buf: memoryview) -> None:
        """Keeps up to `copy_depth` commands in flight over the copy queues: submits a batch (one doorbell
        per queue), sleeps until the copy vector fires, reaps every queue, repeats. If `buf` lies in the
        node's DMA memory (`host_buffer`) the device moves the data straight into / out of it; otherwise
        through the bounce buffers (one memoryview copy per command, as many in flight as buffers)."""
        write = opcode == IoOpcode.WRITE
        base = self._host_addr(buf)
        queues = self.copy_queues
        nq = len(queues)
        with self._copy:
            if self._copy_broken:
                raise RuntimeError(f"the PF copy path is unusable after an earlier timeout on {self.name}")
            bounce = self._bounce_buffers() if base is None else []
            free = list(range(len(bounce)))
            state = {"inflight": 0, "error": None}

            def done(slot: int, off: int, n: int, slba: int, nlb: int, comp: Completion) -> None:
                state["inflight"] -= 1
                if slot >= 0:
                    if comp.ok and not write:
                        buf[off : off + n] = bounce[slot][1][:n]
                    free.append(slot)
                if not comp.ok and state["error"] is None:
                    state["error"] = (slba, nlb, comp)

            rr = 0
            it = iter(cmds)
            nxt = next(it, None)
            irq = queues[0].qp.irq
            page = self.pf.prp.page_size
            while nxt is not None or state["inflight"]:
                rung = []
                while (nxt is not None and state["error"] is None and state["inflight"] < self.copy_depth
                       and (base is not None or free)):
                    slba, nlb, off = nxt
                    n = nlb * lba
                    while queues[rr].qp.free == 0:
                        rr = (rr + 1) % nq
                    q = queues[rr].qp
                    sqe = SQE(opcode=opcode, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                              cdw12=(nlb - 1) & 0xFFFF)
                    if base is not None:
                        slot = -1
                        sqe.prp1, sqe.prp2, lists = self.pf.prp.build(base + off, n)
                    else:
                        slot = free.pop()
                        addr, view, prp2 = bounce[slot]
                        if write:
                            view[:n] = buf[off : off + n]
                        sqe.prp1, lists = addr, []
                        sqe.prp2 = 0 if n <= page else addr + page if n <= 2 * page else prp2
                    q.submit(sqe, callback=functools.partial(done, slot, off, n, slba, nlb), cleanup=lists,
                             ring=False)
                    state["inflight"] += 1
                    if q not in rung:
                        rung.append(q)
                    rr = (rr + 1) % nq
                    nxt = next(it, None)
                for q in rung:
                    q.ring()
                if state["error"] is not None and not state["inflight"]:
                    break
                try:
                    self._wait(irq, queues)
                except NvmeTimeout:
                    self._copy_broken = True  # commands still owned by the device may yet DMA into buffers
                    raise
            err = state["error"]
            if err is not None:
                slba, nlb, comp = err
                what = "write" if write else "read"
                raise NvmeCommandError(f"PF {what} of LBA {slba}+{nlb} on namespace {nsid}", comp)

    def _wait(self, irq: threading.Event, queues: list[IoQueue]) -> None:
        """Until at least one copy command completes (the copy queues share the interrupt vector)."""
        deadline = None
        while True:
            irq.clear()
            if sum(q.qp.reap() for q in queues):
                return
            if deadline is None:
                deadline = time.monotonic() + self.pf.timeout
            elif time.monotonic() > deadline:
                raise NvmeTimeout(f"no PF copy command completed within {self.pf.timeout:.1f}s")
            irq.wait(0.1)

    def deallocate(self, nsid: int, ranges: list[tuple[int, int]]) -> None:
        """Dataset Management deallocate of the (slba, nlb) ranges through the PF (256 ranges a command)."""
        pieces = [(s + i, min(DSM_MAX_NLB, n - i)) for s, n in ranges for i in range(0, n, DSM_MAX_NLB)]
        with self._copy:
            if self._copy_broken:
                raise RuntimeError(f"the PF copy path is unusable after an earlier timeout on {self.name}")
            q = self.copy_queues[0]
            for i in range(0, len(pieces), DSM_MAX_RANGES):
                batch = pieces[i : i + DSM_MAX_RANGES]
                arr = np.zeros(len(batch), dtype=_DSM)
                arr["slba"] = [s for s, _ in batch]
                arr["nlb"] = [n for _, n in batch]
                q.run(cmd.dataset_management(nsid, len(batch)), data=arr.tobytes())

    # ------------------------------------------------------------------------------ power
    def close(self) -> None:
        """Orderly shutdown of the PF driver (which takes every VF Offline), then power off."""
        if self._closed:
            return
        self._closed = True
        for slot in list(self.slots.values()):
            with contextlib.suppress(Exception):
                self.unmap_guest(slot)
        with contextlib.suppress(Exception):
            self.pf.shutdown()
        self.ssd.power_off()
        with contextlib.suppress(Exception):
            self.ssd.pf.iommu.unmap(self.mem.base)
        with contextlib.suppress(BufferError):
            self.mem.close()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
