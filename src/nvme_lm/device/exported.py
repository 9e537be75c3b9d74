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
import functools
import json
import os
import threading
import tomllib
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvme_lm.device import feature_defaults as F
from nvme_lm.device.error_log import ErrorLog
from nvme_lm.device.features import FeatureSpec, FeatureState
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.request import NvmeError
from nvme_lm.spec import status as st
from nvme_lm.spec.exported import ConfigState, ConfigStateError, StateController, StateNamespace
from nvme_lm.spec.identify import (
    OACS,
    ONCS,
    IdentifyController,
    IdentifyNamespace,
    LbaFormat,
    NvmIdentifyController,
    NvmIdentifyNamespace,
    PowerStateDescriptor,
)
from nvme_lm.spec.logs import CmdEffect
from nvme_lm.spec.opcodes import AdminOpcode as A
from nvme_lm.spec.opcodes import IoOpcode as IO
from nvme_lm.spec.registers import CC, CSTS

if TYPE_CHECKING:
    from nvme_lm.device.controller import Controller
    from nvme_lm.device.namespace import Namespace
    from nvme_lm.device.request import Handler, Request
    from nvme_lm.device.subsystem import NvmSubsystem

STATE_FILE = "exported.json"
STATE_VERSION = 1
MAX_EXPORTED_SUBSYSTEMS = 255
MAX_EXPORTED_CONTROLLERS = 64  # per exported subsystem
ECNTLID_LIMIT = 0xFFF0  # FFF0h-FFFFh are not controller identifiers
PEL_CDW10 = 40
PEL_CDW11 = 44
PEL_CDW14 = 56

# Identify fields an exported subsystem (not the template) supplies
DYNAMIC_CTRL_FIELDS = frozenset({"sn", "cntlid", "subnqn", "tnvmcap", "unvmcap", "psd"})
DYNAMIC_NS_FIELDS = frozenset({"nsze", "ncap", "nuse", "nlbaf", "flbas", "nvmcap", "nguid", "eui64", "lbaf"})
REQUIRED_CTRL_FIELDS = ("vid", "ssvid", "mn", "fr", "ieee", "mdts", "oacs", "oncs", "vwc", "sgls", "nn", "sqes",
                        "cqes", "aerl", "acl", "elpe", "kas", "lpa", "ver", "cntrltype")
# What a controller needs to be usable at all (NVMe Base mandatory commands, logs, features, Identify)
REQUIRED_CNS = frozenset({0x00, 0x01, 0x02})
REQUIRED_LOGS = frozenset({0x01, 0x02, 0x03})
REQUIRED_ADMIN = frozenset({A.DELETE_IO_SQ, A.CREATE_IO_SQ, A.GET_LOG_PAGE, A.DELETE_IO_CQ, A.CREATE_IO_CQ,
                            A.IDENTIFY, A.ABORT, A.SET_FEATURES, A.GET_FEATURES, A.ASYNC_EVENT_REQUEST})
REQUIRED_IO = frozenset({IO.FLUSH, IO.WRITE, IO.READ})
REQUIRED_FEATURES = frozenset({F.ARBITRATION, F.POWER_MANAGEMENT, F.TEMPERATURE_THRESHOLD, F.NUMBER_OF_QUEUES,
                               F.INTERRUPT_COALESCING, F.INTERRUPT_VECTOR_CONFIG, F.ASYNC_EVENT_CONFIG})
# Identify bits that announce commands: a bit is set exactly when all its commands are in the template
OACS_COMMANDS: dict[int, tuple[int, ...]] = {
    OACS.SSRS: (A.SECURITY_SEND, A.SECURITY_RECEIVE),
    OACS.FORMAT: (A.FORMAT_NVM,),
    OACS.FW: (A.FIRMWARE_COMMIT, A.FIRMWARE_DOWNLOAD),
    OACS.NS_MGMT: (A.NS_MANAGEMENT,),
    OACS.SELF_TEST: (A.DEVICE_SELF_TEST,),
    OACS.DIRECTIVES: (A.DIRECTIVE_SEND, A.DIRECTIVE_RECEIVE),
    OACS.MI: (A.NVME_MI_SEND, A.NVME_MI_RECEIVE),
    OACS.VMS: (A.VIRTUALIZATION_MANAGEMENT,),
    OACS.DBBUF: (A.DOORBELL_BUFFER_CONFIG,),
    OACS.GET_LBA_STATUS: (A.GET_LBA_STATUS,),
    OACS.LOCKDOWN: (A.LOCKDOWN,),
    OACS.HMLMS: (A.MIGRATION_SEND, A.MIGRATION_RECEIVE),
}
ONCS_COMMANDS: dict[int, tuple[int, ...]] = {
    ONCS.COMPARE: (IO.COMPARE,),
    ONCS.WRITE_UNCORRECTABLE: (IO.WRITE_UNCORRECTABLE,),
    ONCS.DSM: (IO.DATASET_MANAGEMENT,),
    ONCS.WRITE_ZEROES: (IO.WRITE_ZEROES,),
    ONCS.RESERVATIONS: (IO.RESERVATION_REGISTER, IO.RESERVATION_REPORT, IO.RESERVATION_ACQUIRE,
                        IO.RESERVATION_RELEASE),
    ONCS.VERIFY: (IO.VERIFY,),
    ONCS.COPY: (IO.COPY,),
}
LPA_CMD_EFFECTS = 1 << 1
VWC_PRESENT = 1 << 0
DEVICE_SQES, DEVICE_CQES = 0x66, 0x44  # the controller fetches 64-byte SQEs and posts 16-byte CQEs only
NS_ID_POLICIES = ("generate", "none")
NUSE_POLICIES = ("nsze", "actual")
SMART_FIELDS = {"temperature": 0xFFFF, "avail_spare": 0xFF, "spare_thresh": 0xFF, "percent_used": 0xFF}


class TemplateError(ValueError):
    """A template file is malformed, or asks for something the device cannot do."""


# ======================================================================================== templates
@dataclass(frozen=True)
class DeviceCapabilities:
    """What the hardware under a VF can do, against which a template is checked, and the Identify /
    log builders an exported controller may use (built by `admin/exported.capabilities_for`)."""

    model: DeviceModel
    admin_effects: Mapping[int, int]  # a VF's admin opcodes -> the effects dword the device reports
    io_effects: Mapping[int, int]
    features: Mapping[int, FeatureSpec]
    dlfeat: int  # what the device guarantees for deallocated blocks (Identify Namespace DLFEAT)
    vwc: int  # Identify Controller VWC of the device
    cns_handlers: Mapping[int, Callable[[Request], bytes]]  # Identify CNS an exported controller may answer
    log_builders: Mapping[int, Callable[[Request], bytes]]  # log pages an exported controller may report


def _int_keys(table: Mapping[str, Any], what: str) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for key, value in table.items():
        try:
            n = int(key, 0)
        except ValueError:
            raise TemplateError(f"{what}: key {key!r} is not a number (write 0x..)") from None
        if not 0 <= n <= 0xFF:
            raise TemplateError(f"{what}: {key} is not an 8-bit identifier")
        out[n] = value
    return out


def _known(table: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
    unknown = set(table) - set(allowed)
    if unknown:
        raise TemplateError(f"{what}: unknown keys {', '.join(sorted(unknown))}")


def _layout_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class Template:
    """One configuration template, parsed and structurally checked (see `check` for the device)."""

    uuid: uuidlib.UUID
    name: str
    description: str
    serial_prefix: str
    nqn_pattern: str
    mqes: int  # CAP.MQES (0's based)
    cap_to: int  # CAP.TO (500 ms units)
    power: tuple[int, int, int]  # PSD 0: MP (centiwatts), ENLAT, EXLAT (µs)
    identify_controller: Mapping[str, Any]
    identify_namespace: Mapping[str, Any]
    nvm_identify_controller: Mapping[str, Any]
    nvm_identify_namespace: Mapping[str, Any]
    nuse: str
    nguid: str
    eui64: str
    ns_uuid: str
    lba_formats: tuple[LbaFormat, ...]
    cns: frozenset[int]
    logs: tuple[int, ...]
    smart: Mapping[str, int]
    admin: Mapping[int, int]  # opcode -> Commands Supported and Effects dword
    io: Mapping[int, int]
    features: Mapping[int, FeatureSpec]  # Number of Queues' default is filled in from the VF's resources

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_toml(cls, text: str) -> Template:
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise TemplateError(f"template is not valid TOML: {e}") from None
        name = d.get("name", "?")
        try:
            return cls._parse(d)
        except TemplateError as e:
            raise TemplateError(f"template {name!r}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TemplateError(f"template {name!r}: malformed ({type(e).__name__}: {e})") from None

    @classmethod
    def _parse(cls, d: dict[str, Any]) -> Template:
        sections = ("uuid", "name", "description", "identity", "registers", "power_state", "identify_controller",
                    "identify_namespace", "namespace", "nvm_identify_controller", "nvm_identify_namespace",
                    "identify", "logs", "commands", "features")
        _known(d, sections, "top level")
        for key in ("uuid", "name", "identity", "registers", "power_state", "identify_controller", "namespace",
                    "identify", "logs", "commands", "features"):
            if key not in d:
                raise TemplateError(f"missing {key!r}")
        ident = d["identity"]
        _known(ident, ("serial_prefix", "nqn"), "[identity]")
        regs = d["registers"]
        _known(regs, ("mqes", "to"), "[registers]")
        ps = d["power_state"]
        _known(ps, ("mp", "enlat", "exlat"), "[power_state]")

        idc = dict(d["identify_controller"])
        _known(idc, _layout_fields(IdentifyController) - DYNAMIC_CTRL_FIELDS, "[identify_controller]")
        missing = [k for k in REQUIRED_CTRL_FIELDS if k not in idc]
        if missing:
            raise TemplateError(f"[identify_controller] lacks {', '.join(missing)}")
        idn = dict(d.get("identify_namespace", {}))
        _known(idn, _layout_fields(IdentifyNamespace) - DYNAMIC_NS_FIELDS, "[identify_namespace]")
        nvc = dict(d.get("nvm_identify_controller", {}))
        _known(nvc, _layout_fields(NvmIdentifyController), "[nvm_identify_controller]")
        nvn = dict(d.get("nvm_identify_namespace", {}))
        _known(nvn, _layout_fields(NvmIdentifyNamespace) - {"elbaf"}, "[nvm_identify_namespace]")
        for struct_cls, values, what in ((IdentifyController, idc, "[identify_controller]"),
                                         (IdentifyNamespace, idn, "[identify_namespace]"),
                                         (NvmIdentifyController, nvc, "[nvm_identify_controller]"),
                                         (NvmIdentifyNamespace, nvn, "[nvm_identify_namespace]")):
            try:
                struct_cls(**values).encode()
            except (ValueError, TypeError) as e:
                raise TemplateError(f"{what}: {e}") from None

        ns = d["namespace"]
        _known(ns, ("nuse", "nguid", "eui64", "uuid", "lba_formats"), "[namespace]")
        for key, allowed in (("nuse", NUSE_POLICIES), ("nguid", NS_ID_POLICIES), ("eui64", NS_ID_POLICIES),
                             ("uuid", NS_ID_POLICIES)):
            if ns.get(key) not in allowed:
                raise TemplateError(f"[namespace] {key} must be one of {', '.join(allowed)}")
        fmts = []
        for i, f in enumerate(ns.get("lba_formats", [])):
            _known(f, ("ms", "lbads", "rp"), f"[namespace] lba_formats[{i}]")
            fmts.append(LbaFormat(ms=f.get("ms", 0), lbads=f["lbads"], rp=f.get("rp", 0)))
        if not 1 <= len(fmts) <= 64:
            raise TemplateError("[namespace] lba_formats must list 1..64 formats")
        if len({f.lbads for f in fmts}) != len(fmts):
            raise TemplateError("[namespace] lba_formats repeats a data size")
        for f in fmts:
            if not 9 <= f.lbads <= 16 or not 0 <= f.rp <= 3:
                raise TemplateError(f"[namespace] LBA format lbads {f.lbads} / rp {f.rp} out of range")

        ident_t = d["identify"]
        _known(ident_t, ("cns",), "[identify]")
        logs_t = d["logs"]
        _known(logs_t, ("supported", "smart"), "[logs]")
        smart = dict(logs_t.get("smart", {}))
        _known(smart, SMART_FIELDS, "[logs.smart]")
        for key, top in SMART_FIELDS.items():
            if not 0 <= int(smart.setdefault(key, 0)) <= top:
                raise TemplateError(f"[logs.smart] {key} out of range")
        cmds = d["commands"]
        _known(cmds, ("admin", "io"), "[commands]")
        admin = _int_keys(cmds.get("admin", {}), "[commands.admin]")
        io = _int_keys(cmds.get("io", {}), "[commands.io]")
        for table, what in ((admin, "admin"), (io, "io")):
            for op, effects in table.items():
                if not isinstance(effects, int) or not 0 <= effects <= 0xFFFFFFFF:
                    raise TemplateError(f"[commands.{what}] {op:#04x}: effects must be a 32-bit dword")
                if not effects & CmdEffect.CSUPP:
                    raise TemplateError(f"[commands.{what}] {op:#04x}: effects lack CSUPP (bit 0)")

        features: dict[int, FeatureSpec] = {}
        for fid, spec in _int_keys(d["features"], "[features]").items():
            _known(spec, ("default", "saveable", "changeable", "ns_specific"), f"[features.{fid:#04x}]")
            if fid == F.NUMBER_OF_QUEUES:
                if "default" in spec:
                    raise TemplateError("[features.0x07] Number of Queues has no default: it follows the VF's "
                                        "VQ resources")
                default = 0
            else:
                default = spec.get("default")
                if not isinstance(default, int) or isinstance(default, bool) or not 0 <= default <= 0xFFFFFFFF:
                    raise TemplateError(f"[features.{fid:#04x}] needs a 32-bit default")
            for key in ("saveable", "changeable"):
                if not isinstance(spec.get(key), bool):
                    raise TemplateError(f"[features.{fid:#04x}] needs {key} = true/false")
            features[fid] = FeatureSpec(fid, default, spec["saveable"], spec["changeable"],
                                        bool(spec.get("ns_specific", False)))

        prefix = ident["serial_prefix"]
        if not isinstance(prefix, str) or not prefix.isascii() or not prefix.isprintable() or len(prefix) > 8:
            raise TemplateError("[identity] serial_prefix must be at most 8 printable ASCII characters")
        pattern = ident["nqn"]
        try:
            sample = pattern.format(uuid=uuidlib.UUID(int=0), serial="X" * 20)
        except (KeyError, IndexError, ValueError) as e:
            raise TemplateError(f"[identity] nqn: only {{uuid}} and {{serial}} may be substituted ({e})") from None
        if not sample.startswith("nqn.") or not sample.isascii() or len(sample) > 223:
            raise TemplateError("[identity] nqn must be an ASCII 'nqn.' name of at most 223 characters")

        return cls(
            uuid=uuidlib.UUID(d["uuid"]), name=str(d["name"]), description=str(d.get("description", "")),
            serial_prefix=prefix, nqn_pattern=pattern, mqes=int(regs["mqes"]), cap_to=int(regs["to"]),
            power=(int(ps["mp"]), int(ps.get("enlat", 0)), int(ps.get("exlat", 0))),
            identify_controller=idc, identify_namespace=idn, nvm_identify_controller=nvc,
            nvm_identify_namespace=nvn, nuse=ns["nuse"], nguid=ns["nguid"], eui64=ns["eui64"], ns_uuid=ns["uuid"],
            lba_formats=tuple(fmts), cns=frozenset(int(c) for c in ident_t.get("cns", [])),
            logs=tuple(sorted({int(lid) for lid in logs_t.get("supported", [])})), smart=smart,
            admin=admin, io=io, features=features,
        )

    @staticmethod
    def builtin_names() -> list[str]:
        folder = resources.files("nvme_lm.device").joinpath("templates")
        return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))

    @classmethod
    def builtin(cls, name: str) -> Template:
        names = cls.builtin_names()
        if name not in names:
            raise ValueError(f"no built-in template named {name!r} (built-in: {', '.join(names)})")
        return _load_builtin(name)

    @classmethod
    def builtin_all(cls) -> list[Template]:
        return [cls.builtin(n) for n in cls.builtin_names()]

    # ---------------------------------------------------------------- derived values
    def ctrl(self, key: str) -> int:
        return int(self.identify_controller.get(key, 0))

    @property
    def lba_sizes(self) -> tuple[int, ...]:
        return tuple(1 << f.lbads for f in self.lba_formats)

    def format_index(self, lba_size: int) -> int | None:
        sizes = self.lba_sizes
        return sizes.index(lba_size) if lba_size in sizes else None

    def presented_model(self, device: DeviceModel) -> DeviceModel:
        """The device model as a bound controller presents it: the template's limits (enforced where
        the controller checks `ctrl.model`), the device's speeds and resources."""
        return dataclasses.replace(
            device, vendor_id=self.ctrl("vid"), subsystem_vendor_id=self.ctrl("ssvid"), ieee_oui=self.ctrl("ieee"),
            model_number=str(self.identify_controller["mn"]), firmware_revision=str(self.identify_controller["fr"]),
            serial_prefix=self.serial_prefix, mdts=self.ctrl("mdts"), max_queue_entries=self.mqes + 1,
            max_namespaces=self.ctrl("nn"), lba_data_sizes=self.lba_sizes, aerl=self.ctrl("aerl"),
            acl=self.ctrl("acl"), error_log_entries=self.ctrl("elpe") + 1,
            keep_alive_granularity_ms=self.ctrl("kas") * 100, timeout_500ms=self.cap_to,
            power_state_watts=self.power[0] / 100,
        )

    # ---------------------------------------------------------------- against a device
    def problems(self, caps: DeviceCapabilities) -> list[str]:
        """Everything this template asks that the device cannot do, or that contradicts itself."""
        m = caps.model
        out: list[str] = []
        c = self.ctrl
        if m.mdts and not 0 < c("mdts") <= m.mdts:
            out.append(f"MDTS {c('mdts')} exceeds the device's MDTS {m.mdts}")
        if not 1 <= self.mqes <= m.max_queue_entries - 1:
            out.append(f"CAP.MQES {self.mqes} exceeds the device's {m.max_queue_entries - 1}")
        if self.cap_to < m.timeout_500ms:
            out.append(f"CAP.TO {self.cap_to} promises a faster ready than the device's {m.timeout_500ms}")
        if (c("sqes"), c("cqes")) != (DEVICE_SQES, DEVICE_CQES):
            out.append(f"SQES/CQES {c('sqes'):#x}/{c('cqes'):#x}: the device uses 64-byte SQEs and 16-byte CQEs only")
        if c("sgls"):
            out.append("SGLS: the device does not support SGLs")
        if c("aerl") > m.aerl:
            out.append(f"AERL {c('aerl')} exceeds the device's {m.aerl}")
        if c("acl") > m.acl:
            out.append(f"ACL {c('acl')} exceeds the device's {m.acl}")
        if c("elpe") + 1 > m.error_log_entries:
            out.append(f"ELPE {c('elpe')} exceeds the device's error log of {m.error_log_entries} entries")
        gran = max(1, m.keep_alive_granularity_ms)
        if c("kas") < 1 or (c("kas") * 100) % gran:
            out.append(f"KAS {c('kas')} x 100 ms is not a multiple of the device's {gran} ms keep alive granularity")
        if not 1 <= c("nn") <= m.max_namespaces:
            out.append(f"NN {c('nn')} outside 1..{m.max_namespaces}, the namespaces the device can back")
        if c("wctemp") != F.WARNING_COMPOSITE_TEMPERATURE_K:
            out.append(f"WCTEMP {c('wctemp')} differs from the {F.WARNING_COMPOSITE_TEMPERATURE_K} K threshold "
                       "the device's temperature feature enforces")
        if self.power[0] < round(m.power_state_watts * 100):
            out.append(f"power state 0 MP {self.power[0]} cW is below the device's {m.power_state_watts} W")
        if c("vwc") & ~caps.vwc:
            out.append(f"VWC {c('vwc'):#x} claims more than the device's {caps.vwc:#x}")
        if bool(c("vwc") & VWC_PRESENT) != (F.VOLATILE_WRITE_CACHE in self.features):
            out.append("VWC present and feature 06h (Volatile Write Cache) must come together")
        # formats
        for f in self.lba_formats:
            if f.ms:
                out.append(f"LBA format {1 << f.lbads} B + {f.ms} B metadata: the device has no metadata formats")
            elif (1 << f.lbads) not in m.lba_data_sizes:
                out.append(f"LBA format {1 << f.lbads} B is not one of the device's {list(m.lba_data_sizes)}")
        dl = int(self.identify_namespace.get("dlfeat", 0))
        if dl & ~0xF or (dl & 0x7) not in (0, caps.dlfeat & 0x7) or (dl & 0x8 and not caps.dlfeat & 0x8):
            out.append(f"DLFEAT {dl:#x} claims more than the device's {caps.dlfeat:#x}")
        if dl & 0x8 and IO.WRITE_ZEROES not in self.io:
            out.append("DLFEAT bit 3 (Write Zeroes deallocates) without Write Zeroes")
        nsfeat = int(self.identify_namespace.get("nsfeat", 0))
        if nsfeat & ~0x1:
            out.append(f"NSFEAT {nsfeat:#x}: the device reports only thin provisioning (bit 0)")
        if nsfeat & 0x1 and self.nuse != "actual":
            out.append("NSFEAT thin provisioning needs nuse = \"actual\"")
        # commands
        for op in sorted(REQUIRED_ADMIN - set(self.admin)):
            out.append(f"mandatory admin command {op:#04x} missing")
        for op in sorted(REQUIRED_IO - set(self.io)):
            out.append(f"mandatory I/O command {op:#04x} missing")
        for table, device, what in ((self.admin, caps.admin_effects, "admin"), (self.io, caps.io_effects, "I/O")):
            for op, effects in sorted(table.items()):
                if op not in device:
                    out.append(f"{what} command {op:#04x}: the device does not implement it for a VF")
                elif device[op] & 0x1F & ~effects:
                    out.append(f"{what} command {op:#04x}: effects {effects:#010x} hide effects the device has "
                               f"({device[op]:#010x})")
        oacs, oncs = c("oacs"), c("oncs")
        for bits, value, table, mapping, what in (("OACS", oacs, self.admin, OACS_COMMANDS, "admin"),
                                                  ("ONCS", oncs, self.io, ONCS_COMMANDS, "I/O")):
            known = 0
            for bit, ops in mapping.items():
                known |= bit
                listed = [op in table for op in ops]
                if bool(value & bit) != all(listed) or (not value & bit and any(listed)):
                    out.append(f"{bits} bit {int(bit).bit_length() - 1} and {what} command(s) "
                               f"{', '.join(f'{op:#04x}' for op in ops)} disagree")
            if bits == "ONCS":
                known |= ONCS.SAVE_SELECT | ONCS.TIMESTAMP
            if value & ~known:
                out.append(f"{bits} {value:#x} sets bits the device does not define")
        saveable = any(s.saveable for s in self.features.values())
        if saveable and not oncs & ONCS.SAVE_SELECT:
            out.append("a saveable feature needs ONCS bit 4 (Save/Select)")
        if bool(oncs & ONCS.TIMESTAMP) != (F.TIMESTAMP in self.features):
            out.append("ONCS bit 6 (Timestamp) and feature 0Eh must come together")
        aocs = int(self.nvm_identify_controller.get("aocs", 0))
        if aocs & 0x1 and A.GET_LBA_STATUS not in self.admin:
            out.append("AOCS bit 0 needs Get LBA Status")
        # Identify, logs, features
        for cns in sorted(REQUIRED_CNS - self.cns):
            out.append(f"mandatory Identify CNS {cns:#04x} missing")
        for cns in sorted(self.cns - set(caps.cns_handlers)):
            out.append(f"Identify CNS {cns:#04x} cannot be answered by an exported controller")
        for lid in sorted(REQUIRED_LOGS - set(self.logs)):
            out.append(f"mandatory log page {lid:#04x} missing")
        for lid in self.logs:
            if lid not in caps.log_builders:
                out.append(f"log page {lid:#04x} cannot be reported by an exported controller")
        if bool(c("lpa") & LPA_CMD_EFFECTS) != (0x05 in self.logs):
            out.append("LPA bit 1 and log page 05h (Commands Supported and Effects) must come together")
        for fid in sorted(REQUIRED_FEATURES - set(self.features)):
            out.append(f"mandatory feature {fid:#04x} missing")
        for fid, spec in sorted(self.features.items()):
            dev = caps.features.get(fid)
            if dev is None:
                out.append(f"feature {fid:#04x}: the device does not support it")
                continue
            if spec.saveable and not dev.saveable:
                out.append(f"feature {fid:#04x} cannot be saveable on this device")
            if spec.changeable and not dev.changeable:
                out.append(f"feature {fid:#04x} cannot be changeable on this device")
            if spec.ns_specific != dev.ns_specific:
                out.append(f"feature {fid:#04x} namespace specific must be {dev.ns_specific}")
        return out

    def check(self, caps: DeviceCapabilities) -> None:
        """Raises TemplateError naming every reason the device cannot present this template."""
        problems = self.problems(caps)
        if problems:
            raise TemplateError(f"template {self.name!r} ({self.uuid}) cannot be presented by device model "
                                f"{caps.model.name!r}: " + "; ".join(problems))


@functools.cache
def _load_builtin(name: str) -> Template:
    """Shipped templates are parsed once per process (every SR-IOV device checks them at power-on)."""
    return Template.from_toml(resources.files("nvme_lm.device").joinpath("templates", f"{name}.toml").read_text())


# ======================================================================================== exported subsystems
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
        tmp.write_text(json.dumps(state, indent=2))
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
