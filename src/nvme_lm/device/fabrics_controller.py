"""NVMe over Fabrics controllers on the device core: the PCIe controllers' command handlers, features,
events, error log and namespaces, with no BAR, doorbells or rings.

A `FabricsSubsystem` is an NVM subsystem as fabrics hosts reach it: an NQN, the namespaces it shows,
an identity (the device's own, an exported subsystem's template, or a discovery controller's) and the
controllers hosts create (dynamic controller model: each admin-queue Connect makes one, CNTLID chosen
here; I/O-queue Connects name it). A `FabricsController` is what handlers get as `req.ctrl`: the same
attributes they use on a PCIe controller (`features`, `namespace()`, `subsystem`, `model`, `cap`,
`error_log`, `aers`, `post_event`, `cntlid`, ...). Commands arrive as capsules, their data sits in a
transport buffer (`Request.buffer`, described by SGL1: PSDT 01b, PRPs are invalid) and completions
leave through the `FabricsQueue` of the connection that carried the command. The registers are
properties (Property Get/Set) over the same register model (spec/registers.py: CAP, VS, CC, CSTS).

Nothing about NVMe commands is written twice: the tables are the PCIe ones, minus what has no meaning
over a fabric (queue creation, Doorbell Buffer Config, interrupt features, the PF-only management
commands), and Identify Controller gets the fabrics fields on top of what the device or the template
says. The transport (fabrics/server.py) moves bytes; formats and decisions are in docs/nvme-tcp.md.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nvme_lm.device import feature_defaults as F
from nvme_lm.device import identity
from nvme_lm.device.admin import ADMIN_HANDLERS
from nvme_lm.device.admin import identify as admin_identify
from nvme_lm.device.controller import CC_WRITABLE
from nvme_lm.device.error_log import ErrorLog
from nvme_lm.device.events import EventDelivery, EventQueue
from nvme_lm.device.features import FeatureSpec, FeatureState
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.nvm_io import IO_HANDLERS
from nvme_lm.device.request import DEFERRED, Handler, NvmeError, Request
from nvme_lm.device.smart import SmartCounters
from nvme_lm.spec import fabrics as fab
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.identify import CMIC, CNS, IDENTIFY_SIZE, IdentifyController
from nvme_lm.spec.logs import CommandEffectsLog, LogId
from nvme_lm.spec.opcodes import AdminOpcode as A
from nvme_lm.spec.opcodes import data_direction
from nvme_lm.spec.registers import CC, CSTS, VS_2_1, Cap, Reg, Shn, cc_enable_problem
from nvme_lm.spec.status import Status

if TYPE_CHECKING:
    from nvme_lm.device.exported import ExportedSubsystem, ExportedSubsystems
    from nvme_lm.device.namespace import Namespace
    from nvme_lm.device.subsystem import NvmSubsystem

log = logging.getLogger(__name__)

CNTRLTYPE_IO = 1
CNTRLTYPE_DISCOVERY = 2
PSDT_SGL = 1  # SQE byte 1 bits 7:6: fabrics commands describe data with SGLs
PEL_FLAGS = 1  # byte offset of FUSE/PSDT in the SQE
PEL_DPTR = 24
DEFAULT_IO_ICD = 8192  # in-capsule data an I/O command may carry: IOCCSZ = (64 + this) / 16
MAX_CONTROLLERS = 64  # per subsystem; one more admin Connect gets Controller Busy
SGLS = (1 << 0) | (1 << 18) | (1 << 20) | (1 << 21)  # SGLs (byte aligned), SGL longer than data, offsets, transport
OFCS_DISCONNECT = 1 << 0  # the Disconnect command deletes single I/O queues
NO_LIMIT_TRANSFER = 1 << 20  # largest buffer accepted when MDTS is 0 (no limit): 1 MiB
ADMIN_QUEUE_ENTRIES = 32  # the largest admin queue (discovery log ASQSZ; Linux hosts use 32)

# Admin commands a fabrics I/O controller runs (the PCIe handlers). Queue creation and Doorbell Buffer
# Config are PCIe mechanics (queues are Connects here); the management families belong to the PF.
FABRICS_ADMIN_OPCODES = frozenset({
    A.GET_LOG_PAGE, A.IDENTIFY, A.ABORT, A.SET_FEATURES, A.GET_FEATURES, A.ASYNC_EVENT_REQUEST, A.KEEP_ALIVE,
    A.GET_LBA_STATUS,
})
DISCOVERY_ADMIN_OPCODES = frozenset({
    A.GET_LOG_PAGE, A.IDENTIFY, A.SET_FEATURES, A.GET_FEATURES, A.ASYNC_EVENT_REQUEST, A.KEEP_ALIVE,
})
# No interrupts over a fabric: Interrupt Coalescing and Interrupt Vector Configuration do not exist.
PCIE_ONLY_FEATURES = frozenset({F.INTERRUPT_COALESCING, F.INTERRUPT_VECTOR_CONFIG})
DISCOVERY_FEATURES = frozenset({F.ASYNC_EVENT_CONFIG, F.KEEP_ALIVE_TIMER})
PROPERTY_SIZES = {Reg.CAP: 8, Reg.VS: 4, Reg.CC: 4, Reg.CSTS: 4}  # the properties of a fabrics controller


class _NoFunction:
    """Handlers ask `ctrl.fn.is_virtual` (CMIC, Get LBA Status): a fabrics controller is no SR-IOV VF."""

    is_virtual = False


class _NoInterrupts:
    """Completions are capsules: nothing to signal (the media pacer flushes `ctrl.irq` after completing)."""

    def add(self, vector: int) -> None:
        pass

    def flush(self) -> float | None:
        return None

    def reset(self) -> None:
        pass


_NO_FUNCTION = _NoFunction()
_NO_INTERRUPTS = _NoInterrupts()


def _runnable_effects(build: Callable[[Request], bytes]) -> Callable[[Request], bytes]:
    """The template's Commands Supported and Effects log (05h) less what this controller does not run: over a
    fabric, queue creation and the other PCIe mechanics the template lists for a VF (the Linux host showed
    them as supported while they were Invalid Opcode)."""

    def effects_log(req: Request) -> bytes:
        ctrl = req.ctrl
        full = CommandEffectsLog.decode(build(req))
        return CommandEffectsLog(acs=[v if op in ctrl.admin_handlers else 0 for op, v in enumerate(full.acs)],
                                 iocs=[v if op in ctrl.io_handlers else 0 for op, v in enumerate(full.iocs)]).encode()

    return effects_log


def fabrics_identify(req: Request) -> Status:
    """Identify on a fabrics controller: CNS 01h carries the fabrics fields on top of the device's (or the
    template's) answer; every other CNS is the shared handler."""
    if req.sqe.cdw10 & 0xFF != CNS.CTRL:
        return admin_identify.identify(req)
    req.write_to_host(req.ctrl.identify_controller().encode(), IDENTIFY_SIZE)
    return st.SUCCESS


def _tables(admin: Iterable[int], io: Mapping[int, Handler]) -> tuple[dict[int, Handler], dict[int, Handler]]:
    table = {op: ADMIN_HANDLERS[op] for op in admin if op in ADMIN_HANDLERS}
    if A.IDENTIFY in table:
        table[A.IDENTIFY] = fabrics_identify
    return table, dict(io)


def _fabrics_specs(specs: Mapping[int, FeatureSpec], keep: Callable[[int], bool]) -> dict[int, FeatureSpec]:
    return {fid: s for fid, s in specs.items() if keep(fid)}


def fabrics_cap(model: DeviceModel, mqes: int | None = None, to: int | None = None) -> Cap:
    """CAP of a fabrics controller: the PCIe controller's, with no doorbells (DSTRD 0) and one memory
    page size (CC.MPS 0), which is all a fabric's hosts use."""
    return Cap(mqes=model.max_queue_entries - 1 if mqes is None else mqes, cqr=False,
               to=model.timeout_500ms if to is None else to, dstrd=0, css=0x41, mpsmin=0, mpsmax=0)


@dataclass(frozen=True)
class Personality:
    """What every controller of a fabrics subsystem is: tables, limits, features and identity source."""

    model: DeviceModel
    cap: Cap
    admin_handlers: Mapping[int, Handler]
    io_handlers: Mapping[int, Handler]
    feature_specs: Mapping[int, FeatureSpec]
    error_log_entries: int
    cntrltype: int = CNTRLTYPE_IO
    # builds `ctrl.export`, the object identity.py and the Identify / Get Log Page handlers ask first
    binding: Callable[[FabricsController], Any] | None = None


class DiscoveryBinding:
    """`ctrl.export` of a discovery controller: Identify CNS 01h only, and the discovery log (70h)."""

    def __init__(self, log_page: Callable[[Request], bytes], sub: FabricsSubsystem) -> None:
        self.cns_handlers: dict[int, Callable[[Request], bytes]] = {}  # CNS 01h is fabrics_identify's
        self.log_builders = {fab.DISCOVERY_LOG_ID: log_page}
        self.sub = sub

    def identify_controller(self, ctrl: FabricsController) -> IdentifyController:
        m = ctrl.model
        return IdentifyController(
            vid=m.vendor_id, ssvid=m.subsystem_vendor_id, sn=self.sub.serial, mn=f"{m.model_number} discovery"[:40],
            fr=m.firmware_revision, ieee=m.ieee_oui, mdts=0, cntlid=ctrl.cntlid, ver=VS_2_1,
            lpa=identity.LPA_EXTENDED_DATA, aerl=m.aerl, elpe=ctrl.error_log.capacity - 1,
            kas=max(1, m.keep_alive_granularity_ms // 100), cntrltype=CNTRLTYPE_DISCOVERY, subnqn=fab.DISCOVERY_NQN,
        )


class ConnectError(Exception):
    """A Connect the controller refuses: complete it with `status`, DW0 = `dw0` (IPO/IATTR), PEL `pel`."""

    def __init__(self, status: Status, message: str, *, dw0: int = 0, pel: int = 0xFFFF) -> None:
        super().__init__(message)
        self.status = status
        self.dw0 = dw0
        self.pel = pel


# ================================================================================= the subsystem
class FabricsSubsystem:
    """One NVM subsystem as NVMe-oF hosts see it: an NQN, its namespaces, its dynamic controllers.

    Duck-types what handlers reach through `ctrl.subsystem` (namespaces, attachments, controllers,
    SMART counters, the media pacer): every controller of the subsystem sees every namespace, as on
    Linux's nvmet. Build one with `of_device()` (the device's namespaces and identity), `of_exported()` (an
    exported NVM subsystem: its ENSIDs, NQN, serial and template) or `for_discovery()`.
    """

    sriov = None  # no SR-IOV, no exported-subsystem management, no TP4176 limits behind a fabric
    exported = None
    rate_limits = None

    def __init__(self, nvm: NvmSubsystem | None, *, nqn: str, serial: str, personality: Personality,
                 allowed_hosts: Iterable[str] = (), esub: ExportedSubsystem | None = None,
                 io_icd: int = DEFAULT_IO_ICD, max_controllers: int = MAX_CONTROLLERS) -> None:
        if io_icd < 0 or io_icd % 16:
            raise ValueError("in-capsule data size must be a multiple of 16 bytes")
        self.nvm = nvm
        self.nqn = nqn
        self.serial = serial
        self.personality = personality
        self.model = personality.model
        self.allowed_hosts = frozenset(allowed_hosts)  # empty: any host
        self.esub = esub
        self.io_icd = io_icd
        self.max_controllers = max_controllers
        self.controllers: dict[int, FabricsController] = {}
        self.lock = threading.RLock()
        self.smart = nvm.smart if nvm is not None else SmartCounters()
        self.media = nvm.media if nvm is not None else None
        self._next_cntlid = 1

    # ---- construction
    @classmethod
    def of_device(cls, nvm: NvmSubsystem, *, nqn: str | None = None, allowed_hosts: Iterable[str] = (),
            io_icd: int = DEFAULT_IO_ICD) -> FabricsSubsystem:
        """The device's namespaces under its own identity (model, serial, NQN)."""
        m = nvm.model
        admin, io = _tables(FABRICS_ADMIN_OPCODES, IO_HANDLERS)
        p = Personality(model=m, cap=fabrics_cap(m), admin_handlers=admin, io_handlers=io,
                        feature_specs=_fabrics_specs(F.default_feature_specs(m), lambda f: f not in PCIE_ONLY_FEATURES),
                        error_log_entries=m.error_log_entries)
        return cls(nvm, nqn=nqn or nvm.nqn, serial=nvm.serial, personality=p, allowed_hosts=allowed_hosts,
                   io_icd=io_icd)

    @classmethod
    def of_exported(cls, nvm: NvmSubsystem, exports: ExportedSubsystems, esub: ExportedSubsystem, *,
                 allowed_hosts: Iterable[str] = (), io_icd: int = DEFAULT_IO_ICD) -> FabricsSubsystem:
        """An exported NVM subsystem (TP4193): its ENSIDs, NQN and serial, and everything its template says
        (tables, limits, features, Identify), as a VF bound to it would present them."""
        from nvme_lm.device.exported import ExportBinding

        t = esub.template
        model = t.presented_model(nvm.model)
        admin, io = _tables((op for op in FABRICS_ADMIN_OPCODES if op in t.admin),
                            {op: h for op, h in IO_HANDLERS.items() if op in t.io})
        specs = dict(t.features)
        nq = model.max_io_queues - 1
        specs[F.NUMBER_OF_QUEUES] = dataclasses.replace(specs[F.NUMBER_OF_QUEUES], default=nq | nq << 16)
        caps = exports.caps

        logs = dict(caps.log_builders)
        if LogId.CMD_EFFECTS in logs:
            logs[LogId.CMD_EFFECTS] = _runnable_effects(logs[LogId.CMD_EFFECTS])

        def binding(ctrl: FabricsController) -> ExportBinding:
            # ECNTLID = the dynamic CNTLID: a fabrics host checks Identify's CNTLID against its Connect's
            return ExportBinding(esub, ctrl.cntlid, caps.cns_handlers, logs, None)  # type: ignore[arg-type]

        p = Personality(model=model, cap=fabrics_cap(model, t.mqes, t.cap_to), admin_handlers=admin, io_handlers=io,
                        feature_specs=_fabrics_specs(specs, lambda f: f not in PCIE_ONLY_FEATURES),
                        error_log_entries=t.ctrl("elpe") + 1, binding=binding)
        return cls(nvm, nqn=esub.nqn, serial=esub.serial, personality=p, allowed_hosts=allowed_hosts, esub=esub,
                   io_icd=io_icd)

    @classmethod
    def for_discovery(cls, log_page: Callable[[Request], bytes], *, model: DeviceModel | None = None,
                  serial: str = "NVMELM-DISCOVERY") -> FabricsSubsystem:
        """The discovery subsystem (well-known NQN): Identify, Get Log Page 70h, features KATO and AEC."""
        m = dataclasses.replace(model or DeviceModel(), mdts=0)
        admin, _ = _tables(DISCOVERY_ADMIN_OPCODES, {})
        p = Personality(model=m, cap=fabrics_cap(m), admin_handlers=admin, io_handlers={},
                        feature_specs=_fabrics_specs(F.default_feature_specs(m), lambda f: f in DISCOVERY_FEATURES),
                        error_log_entries=m.error_log_entries, cntrltype=CNTRLTYPE_DISCOVERY,
                        binding=lambda ctrl: DiscoveryBinding(log_page, ctrl.subsystem))
        return cls(None, nqn=fab.DISCOVERY_NQN, serial=serial, personality=p)

    @property
    def is_discovery(self) -> bool:
        return self.personality.cntrltype == CNTRLTYPE_DISCOVERY

    @property
    def ioccsz(self) -> int:
        """I/O Queue Command Capsule Supported Size, 16-byte units (the SQE plus in-capsule data)."""
        return (64 + self.io_icd) // 16

    # ---- namespaces, as handlers ask for them
    def namespace(self, nsid: int) -> Namespace | None:
        nvm = self.nvm
        if nvm is None:
            return None
        if self.esub is not None:
            unsid = self.esub.nsid_map.get(nsid)
            return nvm.namespaces.get(unsid) if unsid is not None else None
        return nvm.namespaces.get(nsid)

    @property
    def namespaces(self) -> dict[int, Namespace]:
        """NSID (ENSID for an exported subsystem) -> namespace, every one visible to every controller."""
        nvm = self.nvm
        if nvm is None:
            return {}
        if self.esub is not None:
            return {e: nvm.namespaces[u] for e, u in sorted(self.esub.nsid_map.items()) if u in nvm.namespaces}
        return dict(nvm.namespaces)

    @property
    def attached(self) -> dict[int, set[int]]:
        ids = set(self.controllers)
        return {nsid: set(ids) for nsid in self.namespaces}

    def attached_namespaces(self, cntlid: int) -> list[int]:
        return sorted(self.namespaces) if cntlid in self.controllers else []

    def is_attached(self, nsid: int, cntlid: int) -> bool:
        return cntlid in self.controllers and self.namespace(nsid) is not None

    @property
    def capacity_bytes(self) -> int:
        return self.nvm.capacity_bytes if self.nvm is not None else 0

    @property
    def unallocated_capacity_bytes(self) -> int:
        return self.nvm.unallocated_capacity_bytes if self.nvm is not None else 0

    def flush(self) -> None:
        """Commits every namespace's volatile write cache (a clean target shutdown)."""
        for ns in self.namespaces.values():
            if ns.dirty:
                ns.flush()

    # ---- hosts and controllers
    def host_allowed(self, hostnqn: str) -> bool:
        return self.is_discovery or not self.allowed_hosts or hostnqn in self.allowed_hosts

    def register(self, ctrl: FabricsController) -> None:
        self.controllers[ctrl.cntlid] = ctrl

    def remove(self, ctrl: FabricsController) -> None:
        with self.lock:
            if self.controllers.get(ctrl.cntlid) is ctrl:
                del self.controllers[ctrl.cntlid]

    def _allocate_cntlid(self) -> int | None:
        """Round robin over 1..FFEFh, so a CNTLID is not handed out again right after it was freed."""
        if len(self.controllers) >= self.max_controllers:
            return None
        cntlid = self._next_cntlid
        while cntlid in self.controllers:
            cntlid = cntlid % fab.CNTLID_MAX + 1
        self._next_cntlid = cntlid % fab.CNTLID_MAX + 1
        return cntlid

    def create_controller(self, hostnqn: str, hostid: bytes, kato_ms: int) -> FabricsController:
        with self.lock:
            cntlid = self._allocate_cntlid()
            if cntlid is None:
                raise ConnectError(fab.CONNECT_CONTROLLER_BUSY, f"{self.nqn}: {self.max_controllers} controllers "
                                   "already", pel=fab.OFF_FCTYPE)
            ctrl = FabricsController(self, cntlid, hostnqn=hostnqn, hostid=hostid, kato_ms=kato_ms)
            self.register(ctrl)
            return ctrl

    def find_controller(self, cntlid: int, hostnqn: str, hostid: bytes) -> FabricsController | None:
        ctrl = self.controllers.get(cntlid)
        if ctrl is None or ctrl.hostnqn != hostnqn or ctrl.hostid != bytes(hostid) or ctrl.torn_down:
            return None
        return ctrl


# ================================================================================= queues
class FabricsQueue:
    """A queue pair of a fabrics controller, carried by one transport connection. Commands arrive as
    capsules; `sink(req, status_field)` takes each completion (from any thread: the media pacer
    completes deferred commands on its own); `on_delete()` ends the connection when the controller
    deletes the queue (reset, Keep Alive expiry, teardown)."""

    __slots__ = ("ctrl", "disconnect", "head", "inflight", "on_delete", "owner", "qid", "sink", "size",
                 "sq_flow_control", "tail")

    def __init__(self, ctrl: FabricsController, qid: int, size: int, *, sq_flow_control: bool,
                 sink: Callable[[Request, int], None], on_delete: Callable[[], None], owner: object = None) -> None:
        self.ctrl = ctrl
        self.qid = qid
        self.size = size  # entries (SQSIZE + 1)
        self.sq_flow_control = sq_flow_control
        self.sink = sink
        self.on_delete = on_delete
        self.owner = owner  # the transport's connection object
        self.head = 0  # SQ head: commands consumed, modulo size (reported as SQHD)
        self.tail = 0  # Abort looks for unfetched commands between head and tail: capsules are never queued
        self.inflight = 0  # commands whose handler returned DEFERRED
        self.disconnect = False  # a Disconnect completed: the transport closes after the response

    def consumed(self) -> None:
        self.head = self.tail = (self.head + 1) % self.size

    @property
    def sqhd(self) -> int:
        return self.head if self.sq_flow_control else 0xFFFF


def basic_refusal(sqe: SQE) -> NvmeError | None:
    """What every fabrics command is checked for first: no fused commands, and SGLs (PSDT 01b)."""
    if sqe.fuse:
        return NvmeError(st.INVALID_FIELD, "fused operations are not supported", PEL_FLAGS)
    if sqe.psdt != PSDT_SGL:
        return NvmeError(st.INVALID_FIELD, f"PSDT {sqe.psdt}: fabrics commands use SGLs (PSDT 01b)", PEL_FLAGS)
    return None


def writes_data(sqe: SQE) -> bool:
    """Data moves host to controller (the opcode's, or for a Fabrics command the FCTYPE's, bit 0)."""
    code = fab.fctype(sqe) if sqe.opcode == fab.FABRICS_OPCODE else sqe.opcode
    return bool(data_direction(code) & 1)


# ================================================================================= the controller
class FabricsController(EventDelivery):
    """A controller of a fabrics subsystem (see the module doc). Thread safety: commands run under `_lock`
    (the transport's event loop runs them); deferred completions may come from the media pacer's thread."""

    def __init__(self, subsystem: FabricsSubsystem, cntlid: int, *, hostnqn: str, hostid: bytes,
                 kato_ms: int = 0) -> None:
        p = subsystem.personality
        self.subsystem = subsystem
        self.cntlid = cntlid
        self.hostnqn = hostnqn
        self.hostid = bytes(hostid)
        self.model = p.model
        self.cap = p.cap
        self.admin_handlers: dict[int, Handler] = dict(p.admin_handlers)
        self.io_handlers: dict[int, Handler] = dict(p.io_handlers)
        self.features = FeatureState(dict(p.feature_specs))
        self.error_log = ErrorLog(p.error_log_entries)
        self.events = EventQueue()
        self.aers: deque[Request] = deque()
        self.changed_namespaces: list[int] = []
        self.abort_marks: dict[tuple[int, int], FabricsQueue] = {}
        # the connected queues (QID 0 = admin); a fabrics queue is an SQ/CQ pair, so both names are one dict
        self.sqs: dict[int, FabricsQueue] = {}
        self.cqs = self.sqs
        self.overflow: dict[int, deque[Any]] = {}  # never used: a capsule response cannot overflow a CQ
        self.shadow = None
        self.rate_limiter = None
        self.suspended = False
        self.fn = _NO_FUNCTION
        self.irq = _NO_INTERRUPTS
        self.page_size = 4096
        self.max_io_queues = 0 if p.cntrltype == CNTRLTYPE_DISCOVERY else p.model.max_io_queues
        self.nsqa = self.ncqa = 0
        self.queues_requested = False
        self.nsid_map = None  # the subsystem translates ENSIDs itself
        self.cc = 0
        self.csts = 0
        self.shut_down = False
        self.torn_down = False
        self.keep_alive_deadline: float | None = None
        self.commands_completed = 0
        self._lock = threading.RLock()
        self.export = p.binding(self) if p.binding is not None else None
        if kato_ms:
            gran = max(1, self.model.keep_alive_granularity_ms)
            self.features.set(F.KEEP_ALIVE_TIMER, -(-kato_ms // gran) * gran)
        self._kato = self.features.get(F.KEEP_ALIVE_TIMER) if F.KEEP_ALIVE_TIMER in self.features.specs else 0
        self.restart_keep_alive()  # the timer runs from the admin Connect on, enabled or not

    def __repr__(self) -> str:
        return f"FabricsController({self.subsystem.nqn!r}, cntlid={self.cntlid}, host={self.hostnqn!r})"

    # ---- identity
    @property
    def is_discovery(self) -> bool:
        return self.subsystem.is_discovery

    @property
    def ready(self) -> bool:
        return bool(self.csts & CSTS.RDY)

    def identify_controller(self) -> IdentifyController:
        """Identify Controller: the device's or the template's fields (identity.py), with the fabrics ones."""
        base = identity.identify_controller(self)  # type: ignore[arg-type]
        maxcmd = min(self.cap.mqes + 1, 0xFFFF)
        if self.is_discovery:
            return dataclasses.replace(base, cntlid=self.cntlid, cntrltype=CNTRLTYPE_DISCOVERY, maxcmd=maxcmd,
                                       sgls=SGLS, subnqn=self.subsystem.nqn)
        return dataclasses.replace(
            base, cntlid=self.cntlid, cntrltype=CNTRLTYPE_IO, cmic=(base.cmic & ~CMIC.SRIOV_VF) | CMIC.MULTI_CTRL,
            maxcmd=maxcmd, sgls=SGLS, subnqn=self.subsystem.nqn, ioccsz=self.subsystem.ioccsz, iorcsz=1, icdoff=0,
            fcatt=0, msdbd=1, ofcs=OFCS_DISCONNECT,
        )

    @property
    def max_transfer(self) -> int:
        """The largest data buffer (SGL length) a command may describe: MDTS, or 1 MiB when unlimited,
        and never less than the 8 KiB a Fabrics or admin capsule may carry."""
        mdts = self.model.mdts
        limit = (4096 << (self.cap.mpsmin + mdts)) if mdts else NO_LIMIT_TRANSFER
        return max(limit, 8192)

    @property
    def io_queue_limit(self) -> int:
        """Highest I/O QID a Connect may name: what Number of Queues granted, else what the controller has."""
        return self.nsqa if self.queues_requested else self.max_io_queues

    # ---- lookups for handlers
    def namespace(self, nsid: int) -> Namespace | None:
        return self.subsystem.namespace(nsid)

    def kick(self) -> None:
        """No engine to wake: commands run as their capsules arrive."""

    # ---- queues
    def add_queue(self, q: FabricsQueue) -> None:
        with self._lock:
            self.sqs[q.qid] = q

    def remove_queue(self, q: FabricsQueue) -> None:
        """The transport carrying `q` is gone: an I/O queue is deleted; the admin queue ends the association."""
        if q.qid == 0:
            self.close()
            return
        with self._lock:
            if self.sqs.get(q.qid) is q:
                del self.sqs[q.qid]

    def close(self) -> None:
        """Tears the controller down (admin queue gone, Keep Alive expired, target shutting down): every
        queue's connection ends, outstanding commands complete nowhere, the CNTLID is free again."""
        with self._lock:
            if self.torn_down:
                return
            self.torn_down = True
            queues = list(self.sqs.values())
            self.sqs.clear()
            self.aers.clear()
            self.events.clear()
            self.keep_alive_deadline = None
        self.subsystem.remove(self)
        log.info("%r: association ended (%d queue(s) closed)", self, len(queues))
        for q in queues:
            q.on_delete()

    # ---- commands
    def refusal(self, req: Request) -> NvmeError | None:
        """Refusals decided from the SQE alone, before any data moves (a write is refused without its data)."""
        sqe = req.sqe
        err = basic_refusal(sqe)
        if err is not None:
            return err
        qid = req.sq.qid
        if sqe.opcode == fab.FABRICS_OPCODE:
            ft = fab.fctype(sqe)
            if ft == fab.FabricsType.CONNECT:
                return NvmeError(st.COMMAND_SEQUENCE_ERROR, "this queue is connected already", fab.OFF_QID)
            if ft in (fab.FabricsType.PROPERTY_GET, fab.FabricsType.PROPERTY_SET) and qid == 0:
                return None
            if ft == fab.FabricsType.DISCONNECT:
                return None
            return NvmeError(st.INVALID_OPCODE, f"Fabrics command type {ft:#04x} not supported on queue {qid}",
                             fab.OFF_FCTYPE)
        if not self.cc & CC.EN or not self.csts & CSTS.RDY:
            return NvmeError(st.COMMAND_SEQUENCE_ERROR, f"opcode {sqe.opcode:#04x} while the controller is not "
                             "ready", 0)
        if sqe.opcode not in (self.admin_handlers if qid == 0 else self.io_handlers):
            return NvmeError(st.INVALID_OPCODE, f"opcode {sqe.opcode:#04x} not supported", 0)
        return None

    def execute(self, req: Request, *, checked: bool = False) -> None:
        """Runs one command through the handler tables; its completion reaches `req.sq` now, or later when
        the handler deferred it (AER, media pacing). `checked`: `refusal()` already passed."""
        with self._lock:
            pel = 0xFFFF
            try:
                err = None if checked else self.refusal(req)
                if err is not None:
                    raise err
                sqe = req.sqe
                if sqe.opcode == fab.FABRICS_OPCODE:
                    status = self._fabrics_command(req)
                else:
                    status = (self.admin_handlers if req.sq.qid == 0 else self.io_handlers)[sqe.opcode](req)
            except NvmeError as e:
                status, pel = e.status, e.pel
                log.debug("%r: q%d opcode %#x CID %#x refused: %s", self, req.sq.qid, req.sqe.opcode, req.sqe.cid, e)
            except Exception:
                log.exception("%r: opcode %#x failed", self, req.sqe.opcode)
                status = st.INTERNAL_ERROR
            if status is DEFERRED:
                req.sq.inflight += 1
                return
            self.complete(req, status, pel)

    def complete(self, req: Request, status: Status, pel: int = 0xFFFF) -> None:
        """Hands the completion to the queue's transport (or drops it: the queue is gone)."""
        with self._lock:
            q = req.sq
            if self.sqs.get(q.qid) is not q:
                return
            field = 0 if status is st.SUCCESS else status.field
            if field:
                self.error_log.record(q.qid, req.sqe.cid, field, pel, nsid=req.sqe.nsid)
            self.commands_completed += 1
            q.sink(req, field)

    def complete_deferred(self, req: Request, status: Status) -> None:
        req.sq.inflight -= 1
        self.complete(req, status)

    def _fabrics_command(self, req: Request) -> Status:
        sqe = req.sqe
        ft = fab.fctype(sqe)
        if ft == fab.FabricsType.PROPERTY_GET:
            value = self.property_get(fab.PropertyFields.of(sqe))
            req.dw0, req.dw1 = value & 0xFFFFFFFF, value >> 32
        elif ft == fab.FabricsType.PROPERTY_SET:
            self.property_set(fab.PropertyFields.of(sqe))
        elif ft == fab.FabricsType.DISCONNECT:
            if req.sq.qid == 0:
                raise NvmeError(fab.INVALID_QUEUE_TYPE, "Disconnect on the admin queue", 0)
            if sqe.cdw10 & 0xFFFF:
                raise NvmeError(fab.CONNECT_INCOMPATIBLE_FORMAT, f"Disconnect RECFMT {sqe.cdw10 & 0xFFFF}",
                                fab.OFF_RECFMT)
            req.sq.disconnect = True  # the transport ends the connection once the response is out
        return st.SUCCESS

    # ---- properties (the register model of spec/registers.py)
    def property_get(self, f: fab.PropertyFields) -> int:
        size = f.size
        if size is None:
            raise NvmeError(st.INVALID_FIELD, f"Property Get ATTRIB {f.attrib:#x}", fab.OFF_ATTRIB)
        if PROPERTY_SIZES.get(f.offset) != size:  # type: ignore[call-overload]
            raise NvmeError(st.INVALID_FIELD, f"no {size}-byte property at {f.offset:#x}", fab.OFF_OFFSET)
        if f.offset == Reg.CAP:
            return self.cap.encode()
        return {Reg.VS: VS_2_1, Reg.CC: self.cc, Reg.CSTS: self.csts}[f.offset]  # type: ignore[index]

    def property_set(self, f: fab.PropertyFields) -> None:
        if f.size != 4:
            raise NvmeError(st.INVALID_FIELD, f"Property Set ATTRIB {f.attrib:#x}", fab.OFF_ATTRIB)
        if f.offset != Reg.CC:
            raise NvmeError(st.INVALID_FIELD, f"property {f.offset:#x} is not writable", fab.OFF_OFFSET)
        self._write_cc(f.value & 0xFFFFFFFF)

    def _write_cc(self, value: int) -> None:
        with self._lock:
            old = self.cc
            value &= CC_WRITABLE
            self.cc = value
            if value & CC.EN and not old & CC.EN:
                self._enable()
            elif not value & CC.EN and old & CC.EN:
                self.controller_reset()
            if CC.shn(value) != Shn.NONE and CC.shn(old) == Shn.NONE:
                self._shutdown()

    def _enable(self) -> None:
        cc = self.cc
        problem = cc_enable_problem(cc, self.cap)
        if problem is None and not self.is_discovery and (CC.iosqes(cc) != 6 or CC.iocqes(cc) != 4):
            problem = f"CC.IOSQES {CC.iosqes(cc)} / IOCQES {CC.iocqes(cc)}: entries are 64 / 16 bytes"
        if problem is not None:
            log.warning("%r failed to enable: %s", self, problem)
            self.csts |= CSTS.CFS
            return
        self.shut_down = False
        self.csts = CSTS.RDY
        self.restart_keep_alive()

    def controller_reset(self) -> None:
        """CC.EN 1->0: I/O queues are deleted (their connections end), AERs dropped, features back to
        saved values; the admin queue, and the KATO the Connect set, stay with the association."""
        with self._lock:
            io = [q for qid, q in self.sqs.items() if qid]
            for q in io:
                del self.sqs[q.qid]
            self.aers.clear()
            self.abort_marks.clear()
            self.events.clear()
            self.features.reset()
            if F.KEEP_ALIVE_TIMER in self.features.specs:
                self.features.set(F.KEEP_ALIVE_TIMER, self._kato)
            self.nsqa = self.ncqa = 0
            self.queues_requested = False
            self.shut_down = False
            self.csts &= CSTS.SHST_MASK
        for q in io:
            q.on_delete()

    def _shutdown(self) -> None:
        """CC.SHN: the write cache reaches the media, then SHST says complete (at once: no engine)."""
        self.csts = (self.csts & ~CSTS.SHST_MASK) | CSTS.SHST_OCCURRING
        for nsid in self.subsystem.attached_namespaces(self.cntlid):
            ns = self.subsystem.namespace(nsid)
            if ns is not None and ns.dirty:
                ns.flush()
        self.shut_down = True
        self.csts = (self.csts & ~CSTS.SHST_MASK) | CSTS.SHST_COMPLETE

    # ---- keep alive
    def restart_keep_alive(self) -> None:
        kato = self.features.current.get(F.KEEP_ALIVE_TIMER, 0)
        self._kato = kato
        self.keep_alive_deadline = time.monotonic() + kato / 1000 if kato else None

    def keep_alive_expired(self, now: float) -> bool:
        """True once the host let KATO pass without a Keep Alive: the error is logged and CSTS.CFS set;
        the caller tears the controller down (`close()`)."""
        deadline = self.keep_alive_deadline
        if deadline is None or now <= deadline or self.torn_down:
            return False
        with self._lock:
            self.keep_alive_deadline = None
            self.error_log.record(0, 0xFFFF, st.KEEP_ALIVE_EXPIRED.field)
            self.csts |= CSTS.CFS
        return True


# ================================================================================= Connect
def connect(find: Callable[[str], FabricsSubsystem | None], sqe: SQE, data: bytes | memoryview,
            make_queue: Callable[[FabricsController, int, int, bool], FabricsQueue]) -> FabricsQueue:
    """A Connect command (admin queue: creates a controller; I/O queue: joins the one named). Raises
    ConnectError with the status, IPO/IATTR and PEL to answer; checks in the order Linux's nvmet uses.
    `make_queue(ctrl, qid, entries, sq_flow_control)` builds the transport's queue object."""
    f = fab.ConnectFields.of(sqe)
    invalid = fab.CONNECT_INVALID_PARAMETERS
    if len(data) != fab.CONNECT_DATA_SIZE:
        raise ConnectError(st.DATA_SGL_LENGTH_INVALID, f"Connect data of {len(data)} bytes", pel=PEL_DPTR)
    if f.recfmt != 0:
        raise ConnectError(fab.CONNECT_INCOMPATIBLE_FORMAT, f"RECFMT {f.recfmt}", pel=fab.OFF_RECFMT)
    cd = fab.ConnectData.decode(data)
    mv = memoryview(data)
    if f.qid == 0 and cd.cntlid != fab.CNTLID_DYNAMIC:
        raise ConnectError(invalid, f"admin Connect for CNTLID {cd.cntlid:#x} (only the dynamic model, FFFFh)",
                           dw0=fab.connect_ipo(fab.OFF_DATA_CNTLID, True))
    subnqn = fab.decode_nqn(mv[fab.OFF_DATA_SUBNQN:fab.OFF_DATA_SUBNQN + fab.NQN_FIELD])
    sub = find(subnqn) if subnqn is not None else None
    if sub is None:
        raise ConnectError(invalid, f"no subsystem {subnqn!r}", dw0=fab.connect_ipo(fab.OFF_DATA_SUBNQN, True))
    hostnqn = fab.decode_nqn(mv[fab.OFF_DATA_HOSTNQN:fab.OFF_DATA_HOSTNQN + fab.NQN_FIELD])
    if hostnqn is None:
        raise ConnectError(invalid, "host NQN is not an NQN", dw0=fab.connect_ipo(fab.OFF_DATA_HOSTNQN, True))
    if f.qid == 0:
        if not sub.host_allowed(hostnqn):
            raise ConnectError(fab.CONNECT_INVALID_HOST, f"host {hostnqn} may not reach {sub.nqn}",
                               dw0=fab.connect_ipo(fab.OFF_DATA_HOSTNQN, True))
        if f.sqsize == 0 or f.sqsize >= ADMIN_QUEUE_ENTRIES:
            raise ConnectError(invalid, f"admin SQSIZE {f.sqsize} (0's based; at most {ADMIN_QUEUE_ENTRIES} "
                               "entries)", dw0=fab.connect_ipo(fab.OFF_SQSIZE, False), pel=fab.OFF_SQSIZE)
        ctrl = sub.create_controller(hostnqn, cd.hostid, f.kato)
    else:
        found = sub.find_controller(cd.cntlid, hostnqn, cd.hostid)
        if found is None:
            raise ConnectError(invalid, f"no controller {cd.cntlid} of {sub.nqn} for host {hostnqn}",
                               dw0=fab.connect_ipo(fab.OFF_DATA_CNTLID, True))
        ctrl = found
        if f.qid > ctrl.io_queue_limit:
            raise ConnectError(invalid, f"QID {f.qid} beyond {ctrl.io_queue_limit} I/O queues",
                               dw0=fab.connect_ipo(fab.OFF_QID, False), pel=fab.OFF_QID)
        if f.sqsize == 0 or f.sqsize > ctrl.cap.mqes:
            raise ConnectError(invalid, f"SQSIZE {f.sqsize} (MQES {ctrl.cap.mqes})",
                               dw0=fab.connect_ipo(fab.OFF_SQSIZE, False), pel=fab.OFF_SQSIZE)
        if not ctrl.ready:
            raise ConnectError(st.COMMAND_SEQUENCE_ERROR, f"controller {ctrl.cntlid} is not enabled",
                               pel=fab.OFF_QID)
        if f.qid in ctrl.sqs:
            raise ConnectError(st.COMMAND_SEQUENCE_ERROR, f"queue {f.qid} is connected already", pel=fab.OFF_QID)
    q = make_queue(ctrl, f.qid, f.sqsize + 1, not f.cattr & fab.CATTR_DISABLE_SQ_FLOW)
    ctrl.add_queue(q)
    return q


__all__ = [
    "ADMIN_QUEUE_ENTRIES",
    "CNTRLTYPE_DISCOVERY",
    "CNTRLTYPE_IO",
    "ConnectError",
    "DiscoveryBinding",
    "FabricsController",
    "FabricsQueue",
    "FabricsSubsystem",
    "Personality",
    "basic_refusal",
    "connect",
    "fabrics_identify",
    "writes_data",
]
