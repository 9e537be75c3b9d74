"""Exported NVM subsystems (Base 2.4, TP4193) and configuration templates: the "consistent lie".

A configuration template (`templates/*.toml`, identified by UUID) fixes everything the host of a VF
sees: Identify Controller and Namespace fields, the Commands Supported and Effects log, the supported
log pages and what they report, the supported features and their capabilities. An exported NVM
subsystem applies one template to secondary controllers (VFs) and underlying namespaces of this
device and gives them the identifiers a VM keeps for life: ECNTLID, ENSID, serial number, subsystem
NQN, NGUID/EUI64/UUID. They are drawn once, kept in the data directory, and carried to another
device by the exported configuration state (spec/exported.py), so the VM sees the same SSD after a
migration to a different model.

A controller associated with an exported subsystem is *bound*: `ctrl.export` holds an
`ExportBinding`; Identify (device/identity.py), Get Log Page and Identify CNS dispatch consult it, its
dispatch tables hold only the template's commands, its features only the template's features,
`ctrl.model` and CAP show the template's limits (so MDTS, NN, AERL, ACL, KAS are enforced as reported),
and `ctrl.nsid_map` translates ENSIDs to underlying NSIDs (no underlying NSID is visible).

A template is checked against what the device can do (`DeviceCapabilities`) before it is offered;
one that asks for more (a larger MDTS, an LBA format or command the device lacks...) is refused with
every reason. The rules, the formats and the status choices are in docs/exported-subsystems.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvme_lm.device import feature_defaults as F
from nvme_lm.device import persist
from nvme_lm.device.error_log import ErrorLog
from nvme_lm.device.features import FeatureState
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.request import NvmeError
from nvme_lm.spec import status as st
from nvme_lm.spec.exported import ConfigState, ConfigStateError, StateController, StateNamespace
from nvme_lm.spec.identify import (
    IdentifyController,
    IdentifyNamespace,
    NvmIdentifyController,
    NvmIdentifyNamespace,
    PowerStateDescriptor,
)
from nvme_lm.spec.registers import CC, CSTS

if TYPE_CHECKING:
    from nvme_lm.device.controller import Controller
    from nvme_lm.device.namespace import Namespace
    from nvme_lm.device.request import Handler
    from nvme_lm.device.subsystem import NvmSubsystem

from nvme_lm.device.template import (
    PEL_CDW11,
    PEL_CDW14,
    DeviceCapabilities,
    Template,
    TemplateError,
)

STATE_FILE = "exported.json"
STATE_VERSION = 1
MAX_EXPORTED_SUBSYSTEMS = 255
MAX_EXPORTED_CONTROLLERS = 64  # per exported subsystem
ECNTLID_LIMIT = 0xFFF0  # FFF0h-FFFFh are not controller identifiers

__all__ = ["DeviceCapabilities", "ExportBinding", "ExportedSubsystems", "Template", "TemplateError"]


@dataclass
class ExportedNamespace:
    """An exported namespace: its identity for life, and the underlying namespace behind it (if any)."""

    ensid: int
    nsze: int
    lba_size: int
    nguid: bytes
    eui64: bytes
    uuid: bytes
    unsid: int | None = None  # None: reserved by a configuration state, not associated yet


@dataclass
class ExportedController:
    ecntlid: int
    cntlid: int | None = None  # the underlying (secondary) controller, None while not associated


@dataclass
class ExportedSubsystem:
    esubid: int
    template: Template
    nqn: str
    serial: str
    controllers: dict[int, ExportedController] = field(default_factory=dict)  # by ECNTLID
    namespaces: dict[int, ExportedNamespace] = field(default_factory=dict)  # by ENSID
    # ENSID -> underlying NSID of the associated namespaces. Bound controllers share this very dict as
    # `ctrl.nsid_map`, so it is changed in place, never replaced.
    nsid_map: dict[int, int] = field(default_factory=dict)

    @property
    def associated_controllers(self) -> dict[int, int]:
        """CNTLID -> ECNTLID of the associated controllers."""
        return {c.cntlid: c.ecntlid for c in self.controllers.values() if c.cntlid is not None}

    @property
    def busy(self) -> bool:
        return bool(self.associated_controllers or self.nsid_map)

    def namespace_of(self, unsid: int) -> ExportedNamespace | None:
        for rec in self.namespaces.values():
            if rec.unsid == unsid:
                return rec
        return None

    def config_state(self) -> ConfigState:
        return ConfigState(
            template=self.template.uuid, nqn=self.nqn, serial=self.serial,
            controllers=tuple(StateController(e) for e in sorted(self.controllers)),
            namespaces=tuple(StateNamespace(n.ensid, n.nsze, n.lba_size.bit_length() - 1, n.nguid, n.eui64, n.uuid)
                             for n in sorted(self.namespaces.values(), key=lambda n: n.ensid)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "esubid": self.esubid, "template": str(self.template.uuid), "nqn": self.nqn, "serial": self.serial,
            "controllers": [{"ecntlid": c.ecntlid, "cntlid": c.cntlid} for c in self.controllers.values()],
            "namespaces": [{"ensid": n.ensid, "nsze": n.nsze, "lba_size": n.lba_size, "nguid": n.nguid.hex(),
                            "eui64": n.eui64.hex(), "uuid": n.uuid.hex(), "unsid": n.unsid}
                           for n in self.namespaces.values()],
        }


@dataclass
class _Saved:
    """A controller's own personality, put back when it leaves its exported subsystem."""

    admin_handlers: dict[int, Handler]
    io_handlers: dict[int, Handler]
    model: DeviceModel
    cap: Any
    features: FeatureState
    error_log: ErrorLog


class ExportBinding:
    """Installed as `ctrl.export` while a controller is associated with an exported subsystem: what
    it says about itself comes from here (template + exported subsystem), never from the device."""

    def __init__(self, esub: ExportedSubsystem, ecntlid: int, cns_handlers: Mapping[int, Callable],
                 log_builders: Mapping[int, Callable], saved: _Saved) -> None:
        self.esub = esub
        self.ecntlid = ecntlid
        t = esub.template
        self.cns_handlers = {c: h for c, h in cns_handlers.items() if c in t.cns}
        self.log_builders = {lid: b for lid, b in log_builders.items() if lid in t.logs}
        self.changed: list[int] = []  # ENSIDs for the Changed Namespace List
        self.saved = saved

    @property
    def template(self) -> Template:
        return self.esub.template

    def identify_controller(self, ctrl: Controller) -> IdentifyController:
        t = self.template
        psd = [PowerStateDescriptor() for _ in range(32)]
        psd[0] = PowerStateDescriptor(mp=t.power[0], enlat=t.power[1], exlat=t.power[2])
        capacity = sum(n.nsze * n.lba_size for n in self.esub.namespaces.values())
        return IdentifyController(**t.identify_controller, sn=self.esub.serial, cntlid=self.ecntlid,
                                  subnqn=self.esub.nqn, tnvmcap=capacity, unvmcap=0, psd=psd)

    def identify_namespace(self, ns: Namespace | None) -> IdentifyNamespace:
        t = self.template
        fmts = list(t.lba_formats)
        nlbaf = len(fmts) - 1
        if ns is None:  # NSID FFFFFFFFh: what every namespace has in common
            return IdentifyNamespace(**t.identify_namespace, nlbaf=nlbaf, lbaf=fmts)
        rec = self.esub.namespace_of(ns.nsid)
        if rec is None:
            return IdentifyNamespace()
        index = t.format_index(rec.lba_size) or 0
        nuse = rec.nsze if t.nuse == "nsze" else min(ns.nuse, rec.nsze)
        return IdentifyNamespace(
            **t.identify_namespace, nsze=rec.nsze, ncap=rec.nsze, nuse=nuse, nlbaf=nlbaf,
            flbas=(index & 0xF) | ((index >> 4) & 0x3) << 5, nvmcap=rec.nsze * rec.lba_size,
            nguid=rec.nguid, eui64=rec.eui64, lbaf=fmts,
        )

    def nvm_identify_controller(self) -> NvmIdentifyController:
        return NvmIdentifyController(**self.template.nvm_identify_controller)

    def nvm_identify_namespace(self) -> NvmIdentifyNamespace:
        return NvmIdentifyNamespace(**self.template.nvm_identify_namespace)

    def active_nsids(self, ctrl: Controller) -> list[int]:
        return sorted(e for e in self.esub.nsid_map if ctrl.namespace(e) is not None)


class ExportedSubsystems:
    """The exported NVM subsystems of one device: templates it can present, the subsystems, their
    associations, persistence. Every action checks everything before it changes anything and raises
    NvmeError with the status the admin command returns (docs/exported-subsystems.md)."""

    def __init__(self, subsystem: NvmSubsystem, caps: DeviceCapabilities, *, state_file: Path | str | None = None,
                 templates: Iterable[Template] | None = None) -> None:
        self.subsystem = subsystem
        self.caps = caps
        self.lock = threading.RLock()
        self.templates: list[Template] = []  # what this device can present, in Identify CNS 22h order
        self.refused: dict[uuidlib.UUID, str] = {}  # templates it cannot, and why
        for t in sorted(Template.builtin_all() if templates is None else templates, key=lambda t: t.name):
            problems = t.problems(caps)
            if problems:
                self.refused[t.uuid] = "; ".join(problems)
            else:
                self.templates.append(t)
        self.subsystems: dict[int, ExportedSubsystem] = {}
        self.state_file = Path(state_file) if state_file is not None else None
        self._load()

    # ================================================================ queries
    def template(self, uuid: uuidlib.UUID | str) -> Template | None:
        u = uuidlib.UUID(str(uuid))
        return next((t for t in self.templates if t.uuid == u), None)

    def get(self, esubid: int) -> ExportedSubsystem:
        esub = self.subsystems.get(esubid)
        if esub is None:
            raise NvmeError(st.INVALID_NVM_SUBSYSTEM, f"no exported NVM subsystem {esubid:#x}", PEL_CDW14 + 2)
        return esub

    def export_of(self, cntlid: int) -> ExportedSubsystem | None:
        for esub in self.subsystems.values():
            if cntlid in esub.associated_controllers:
                return esub
        return None

    def underlying_controllers(self) -> list[int]:
        """Controllers that may be associated with an exported subsystem: the secondaries (VFs)."""
        sriov = self.subsystem.sriov
        return sorted(sriov.secondaries) if sriov is not None else []

    # ================================================================ Receive 00h / Send 01h
    def create(self, index: int) -> ExportedSubsystem:
        """A new exported subsystem with template `index` of the CNS 22h list; SN and NQN drawn now, once."""
        with self.lock:
            if not 0 <= index < len(self.templates):
                raise NvmeError(st.INVALID_FIELD, f"template index {index} beyond the {len(self.templates)} "
                                "templates this device offers", PEL_CDW11)
            t = self.templates[index]
            esubid = self._free_esubid()
            serial = f"{t.serial_prefix}{os.urandom(6).hex().upper()}"
            esub = ExportedSubsystem(esubid, t, t.nqn_pattern.format(uuid=uuidlib.uuid4(), serial=serial), serial)
            self.subsystems[esubid] = esub
            self._save()
            return esub

    def _free_esubid(self) -> int:
        if len(self.subsystems) >= MAX_EXPORTED_SUBSYSTEMS:
            raise NvmeError(st.INVALID_FIELD, f"already {MAX_EXPORTED_SUBSYSTEMS} exported NVM subsystems")
        return next(i for i in range(1, MAX_EXPORTED_SUBSYSTEMS + 2) if i not in self.subsystems)

    def delete(self, esubid: int) -> None:
        with self.lock:
            esub = self.get(esubid)
            if esub.busy:
                raise NvmeError(st.COMMAND_SEQUENCE_ERROR, f"exported NVM subsystem {esubid} still has associated "
                                f"controllers {sorted(esub.associated_controllers)} or namespaces "
                                f"{sorted(esub.nsid_map)}")
            del self.subsystems[esubid]
            self._save()

    # ================================================================ Send 05h
    def _check_inactive(self, cntlid: int) -> None:
        """A VF changes personality only while its host cannot be looking: Offline, or not enabled."""
        ctrl = self.subsystem.controllers[cntlid]
        sec = self.subsystem.sriov.secondaries[cntlid] if self.subsystem.sriov is not None else None
        if (sec is None or sec.online) and (ctrl.cc & CC.EN or ctrl.csts & CSTS.RDY):
            raise NvmeError(st.CONTROLLER_ACTIVE, f"controller {cntlid} is enabled; disable it or take it Offline")

    def associate_controllers(self, esubid: int, pairs: list[tuple[int, int]]) -> None:
        with self.lock:
            esub = self.get(esubid)
            if not pairs:
                raise NvmeError(st.INVALID_FIELD, "empty controller list")
            secondaries = set(self.underlying_controllers())
            new = sum(1 for _, e in pairs if e not in esub.controllers)
            if len(esub.controllers) + new > MAX_EXPORTED_CONTROLLERS:
                raise NvmeError(st.INVALID_EXPORTED_ASSOCIATION, f"more than {MAX_EXPORTED_CONTROLLERS} "
                                "exported controllers")
            seen_c: set[int] = set()
            seen_e: set[int] = set()
            for cntlid, ecntlid in pairs:
                if cntlid not in secondaries:
                    raise NvmeError(st.INVALID_CONTROLLER_IDENTIFIER, f"CNTLID {cntlid:#x} is not a secondary "
                                    "controller of this device")
                if cntlid in seen_c or ecntlid in seen_e:
                    raise NvmeError(st.INVALID_EXPORTED_ASSOCIATION, f"pair {cntlid}/{ecntlid} repeats an entry")
                seen_c.add(cntlid)
                seen_e.add(ecntlid)
                if ecntlid >= ECNTLID_LIMIT:
                    raise NvmeError(st.INVALID_EXPORTED_ASSOCIATION, f"ECNTLID {ecntlid:#x} is not a controller id")
                owner = self.export_of(cntlid)
                if owner is not None:
                    raise NvmeError(st.INVALID_EXPORTED_ASSOCIATION, f"controller {cntlid} is already associated "
                                    f"with exported NVM subsystem {owner.esubid}")
                rec = esub.controllers.get(ecntlid)
                if rec is not None and rec.cntlid is not None:
                    raise NvmeError(st.INVALID_EXPORTED_ASSOCIATION, f"ECNTLID {ecntlid} is taken by controller "
                                    f"{rec.cntlid}")
                self._check_inactive(cntlid)
            for cntlid, ecntlid in pairs:
                rec = esub.controllers.setdefault(ecntlid, ExportedController(ecntlid))
                rec.cntlid = cntlid
                self._bind(self.subsystem.controllers[cntlid], esub, ecntlid)
            self._save()

    def disassociate_controllers(self, esubid: int, pairs: list[tuple[int, int]]) -> None:
        with self.lock:
            esub = self.get(esubid)
            if not pairs:
                raise NvmeError(st.INVALID_FIELD, "empty controller list")
            bound = esub.associated_controllers
            for cntlid, ecntlid in pairs:
                if bound.get(cntlid) != ecntlid:
                    raise NvmeError(st.INVALID_EXPORTED_ASSOCIATION, f"controller {cntlid} is not associated as "
                                    f"ECNTLID {ecntlid} with exported NVM subsystem {esubid}")
                self._check_inactive(cntlid)
            for cntlid, ecntlid in pairs:
                self._unbind(self.subsystem.controllers[cntlid], esub)
                esub.controllers[ecntlid].cntlid = None  # the ECNTLID stays reserved for this subsystem
            self._save()

    # ================================================================ Manage Exported Namespace
    def associate_namespace(self, esubid: int, ensid: int, unsid: int) -> list[int]:
        """ENSID -> the underlying namespace UNSID; returns the controllers whose namespaces changed."""
        with self.lock:
            esub = self.get(esubid)
            t = esub.template
            if not 1 <= ensid <= t.ctrl("nn"):
                raise NvmeError(st.INVALID_NAMESPACE, f"ENSID {ensid:#x} outside 1..NN ({t.ctrl('nn')})")
            ns = self.subsystem.namespaces.get(unsid)
            if ns is None:
                raise NvmeError(st.INVALID_NAMESPACE, f"underlying namespace {unsid:#x} does not exist")
            for other in self.subsystems.values():
                if other.namespace_of(unsid) is not None:
                    raise NvmeError(st.INVALID_EXPORTED_ASSOCIATION, f"namespace {unsid} is already exported by "
                                    f"exported NVM subsystem {other.esubid}")
            rec = esub.namespaces.get(ensid)
            if rec is not None and rec.unsid is not None:
                raise NvmeError(st.INVALID_EXPORTED_ASSOCIATION, f"ENSID {ensid} is already associated")
            if t.format_index(ns.lba_size) is None:
                raise NvmeError(st.INVALID_EXPORTED_ASSOCIATION, f"namespace {unsid}'s {ns.lba_size}-byte blocks "
                                f"are not an LBA format of template {t.name}")
            if rec is not None and (rec.nsze, rec.lba_size) != (ns.nsze, ns.lba_size):
                raise NvmeError(st.INVALID_EXPORTED_ASSOCIATION, f"ENSID {ensid} is {rec.nsze} x {rec.lba_size} B; "
                                f"namespace {unsid} is {ns.nsze} x {ns.lba_size} B")
            if rec is None:
                u = uuidlib.uuid4()
                nguid = os.urandom(16) if t.nguid == "generate" else bytes(16)
                eui64 = os.urandom(8) if t.eui64 == "generate" else bytes(8)
                rec = ExportedNamespace(ensid, ns.nsze, ns.lba_size, nguid, eui64,
                                        u.bytes if t.ns_uuid == "generate" else bytes(16))
                esub.namespaces[ensid] = rec
            rec.unsid = unsid
            esub.nsid_map[ensid] = unsid
            cntlids = sorted(esub.associated_controllers)
            for cntlid in cntlids:
                self.subsystem.attach(unsid, cntlid)
            self._save()
            return cntlids

    def disassociate_namespace(self, esubid: int, ensid: int) -> list[int]:
        with self.lock:
            esub = self.get(esubid)
            rec = esub.namespaces.get(ensid)
            if rec is None or rec.unsid is None:
                raise NvmeError(st.INVALID_EXPORTED_ASSOCIATION, f"ENSID {ensid:#x} is not associated")
            cntlids = sorted(esub.associated_controllers)
            for cntlid in cntlids:
                if rec.unsid in self.subsystem.namespaces:
                    self.subsystem.detach(rec.unsid, cntlid)
            del esub.nsid_map[ensid]
            rec.unsid = None  # the ENSID keeps its identifiers for the life of the exported subsystem
            self._save()
            return cntlids

    # ================================================================ configuration state
    def get_state(self, esubid: int) -> bytes:
        with self.lock:
            return self.get(esubid).config_state().encode()

    def set_state(self, esubid: int | None, blob: bytes | bytearray | memoryview) -> int:
        """Recreates an exported subsystem from a configuration state (into `esubid`, which must have no
        associations, or a new one when None). Raises ConfigStateError for the blob (nothing changed)."""
        with self.lock:
            esub = None
            if esubid is not None:
                esub = self.get(esubid)
                if esub.busy:
                    raise NvmeError(st.COMMAND_SEQUENCE_ERROR, f"exported NVM subsystem {esubid} has associations")
            cs = ConfigState.decode(blob)
            t = self._check_state(cs, esubid)
            if esub is None:
                esub = ExportedSubsystem(self._free_esubid(), t, cs.nqn, cs.serial)
                self.subsystems[esub.esubid] = esub
            esub.template, esub.nqn, esub.serial = t, cs.nqn, cs.serial
            esub.controllers = {c.ecntlid: ExportedController(c.ecntlid) for c in cs.controllers}
            esub.namespaces = {n.ensid: ExportedNamespace(n.ensid, n.nsze, 1 << n.lbads, n.nguid, n.eui64, n.uuid)
                               for n in cs.namespaces}
            esub.nsid_map.clear()
            self._save()
            return esub.esubid

    def _check_state(self, cs: ConfigState, esubid: int | None) -> Template:
        t = self.template(cs.template)
        if t is None:
            why = self.refused.get(cs.template, "unknown to this device")
            raise ConfigStateError(f"template {cs.template} cannot be presented here: {why}", cs.TEMPLATE_DWORD)
        if not cs.nqn.startswith("nqn.") or len(cs.nqn) > 223:
            raise ConfigStateError(f"ESUBNQN {cs.nqn!r} is not an NQN", cs.NQN_DWORD)
        for other in self.subsystems.values():
            if other.esubid != esubid and other.nqn == cs.nqn:
                raise ConfigStateError(f"ESUBNQN is already used by exported NVM subsystem {other.esubid}",
                                       cs.NQN_DWORD)
        if len(cs.controllers) > MAX_EXPORTED_CONTROLLERS:
            raise ConfigStateError(f"more than {MAX_EXPORTED_CONTROLLERS} controllers", 8)
        seen: set[int] = set()
        for i, c in enumerate(cs.controllers):
            if c.ecntlid >= ECNTLID_LIMIT or c.ecntlid in seen:
                raise ConfigStateError(f"ECNTLID {c.ecntlid:#x} invalid or repeated", cs.controller_dword(i))
            seen.add(c.ecntlid)
        seen.clear()
        for i, n in enumerate(cs.namespaces):
            if not 1 <= n.ensid <= t.ctrl("nn") or n.ensid in seen:
                raise ConfigStateError(f"ENSID {n.ensid:#x} invalid or repeated", cs.namespace_dword(i))
            seen.add(n.ensid)
            if not n.nsze:
                raise ConfigStateError("NSZE 0", cs.namespace_dword(i, "nsze"))
            if not 9 <= n.lbads <= 16 or t.format_index(1 << n.lbads) is None:
                raise ConfigStateError(f"LBADS {n.lbads} is not an LBA format of {t.name}",
                                       cs.namespace_dword(i, "lbads"))
        return t

    # ================================================================ binding
    def _bind(self, ctrl: Controller, esub: ExportedSubsystem, ecntlid: int) -> None:
        t = esub.template
        with ctrl._lock:
            saved = _Saved(ctrl.admin_handlers, ctrl.io_handlers, ctrl.model, ctrl.cap, ctrl.features, ctrl.error_log)
            specs = dict(t.features)
            nq = ctrl.features.specs[F.NUMBER_OF_QUEUES]
            specs[F.NUMBER_OF_QUEUES] = dataclasses.replace(specs[F.NUMBER_OF_QUEUES], default=nq.default)
            ctrl.admin_handlers = {op: h for op, h in ctrl.admin_handlers.items() if op in t.admin}
            ctrl.io_handlers = {op: h for op, h in ctrl.io_handlers.items() if op in t.io}
            ctrl.model = t.presented_model(saved.model)
            ctrl.cap = dataclasses.replace(ctrl.cap, mqes=t.mqes, to=t.cap_to)
            ctrl.features = FeatureState(specs)
            ctrl.features.apply_interrupts(ctrl.irq)
            ctrl.error_log = ErrorLog(t.ctrl("elpe") + 1)
            ctrl.export = ExportBinding(esub, ecntlid, self.caps.cns_handlers, self.caps.log_builders, saved)
            ctrl.nsid_map = esub.nsid_map
        for unsid in esub.nsid_map.values():
            if unsid in self.subsystem.namespaces:
                self.subsystem.attach(unsid, ctrl.cntlid)

    def _unbind(self, ctrl: Controller, esub: ExportedSubsystem) -> None:
        binding = ctrl.export
        if binding is None:
            return
        s = binding.saved
        with ctrl._lock:
            ctrl.export = None
            ctrl.nsid_map = None
            ctrl.admin_handlers, ctrl.io_handlers = s.admin_handlers, s.io_handlers
            ctrl.model, ctrl.cap, ctrl.features, ctrl.error_log = s.model, s.cap, s.features, s.error_log
            apply_resources = getattr(ctrl, "apply_resources", None)
            if apply_resources is not None:
                apply_resources()  # resources may have changed while bound
            ctrl.features.apply_interrupts(ctrl.irq)
        for unsid in esub.nsid_map.values():
            if unsid in self.subsystem.namespaces:
                self.subsystem.detach(unsid, ctrl.cntlid)

    # ================================================================ persistence
    def _save(self) -> None:
        if self.state_file is None:
            return
        state = {"version": STATE_VERSION, "subsystems": [e.to_json() for _, e in sorted(self.subsystems.items())]}
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        persist.with_reserve(tmp.parent, lambda: tmp.write_text(json.dumps(state, indent=2)))
        os.replace(tmp, self.state_file)

    def _load(self) -> None:
        """Exported subsystems, their identities and associations survive power cycles; a data directory
        naming a template this device cannot present is refused rather than silently changed."""
        if self.state_file is None or not self.state_file.exists():
            return
        state = json.loads(self.state_file.read_text())
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.state_file}: exported subsystem state version {state.get('version')} "
                             f"not supported")
        for d in state.get("subsystems", []):
            t = self.template(d["template"])
            if t is None:
                raise ValueError(f"{self.state_file}: exported NVM subsystem {d['esubid']} uses template "
                                 f"{d['template']}, which this device cannot present: "
                                 f"{self.refused.get(uuidlib.UUID(d['template']), 'unknown template')}")
            esub = ExportedSubsystem(int(d["esubid"]), t, d["nqn"], d["serial"])
            for n in d["namespaces"]:
                rec = ExportedNamespace(n["ensid"], n["nsze"], n["lba_size"], bytes.fromhex(n["nguid"]),
                                        bytes.fromhex(n["eui64"]), bytes.fromhex(n["uuid"]), n["unsid"])
                esub.namespaces[rec.ensid] = rec
                if rec.unsid is not None:
                    esub.nsid_map[rec.ensid] = rec.unsid
            self.subsystems[esub.esubid] = esub
            for c in d["controllers"]:
                esub.controllers[c["ecntlid"]] = ExportedController(c["ecntlid"])
                cntlid = c["cntlid"]
                if cntlid is not None and cntlid in self.underlying_controllers():
                    esub.controllers[c["ecntlid"]].cntlid = cntlid
                    self._bind(self.subsystem.controllers[cntlid], esub, c["ecntlid"])
