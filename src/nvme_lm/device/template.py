"""Configuration templates of exported NVM subsystems (TP4193): what a VF's host sees, as data.

A template (`templates/*.toml`, identified by UUID) fixes Identify fields, the effects log, the
supported log pages and features. `Template.problems(caps)` lists every reason a device cannot
present it, so a template is checked before it is offered. Exported subsystems that apply
templates are in `exported.py`; the rules are in docs/exported-subsystems.md.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from nvme_lm.device import feature_defaults as F
from nvme_lm.device.features import FeatureSpec
from nvme_lm.device.model import DeviceModel
from nvme_lm.spec.identify import (
    OACS,
    ONCS,
    IdentifyController,
    IdentifyNamespace,
    LbaFormat,
    NvmIdentifyController,
    NvmIdentifyNamespace,
)
from nvme_lm.spec.logs import CmdEffect
from nvme_lm.spec.opcodes import AdminOpcode as A
from nvme_lm.spec.opcodes import IoOpcode as IO

if TYPE_CHECKING:
    from nvme_lm.device.request import Request

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
