"""`nvme-lm device show`: install a model's SSD in a scratch directory and inspect it the way
nvme-cli would (`nvme id-ctrl`, `list-ctrl`, `primary-ctrl-caps`, `list-secondary`, `list-ns`,
`get-feature`), optionally after bringing VFs online with a namespace each.

Everything shown comes from admin commands through the PF's host driver (Identify, Get Log Page,
Get Features), never from device objects: what a hypervisor would see, so the output also checks
that the device reports itself consistently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from nvme_lm.device.model import DeviceModel

if TYPE_CHECKING:
    from nvme_lm.host.driver import NvmeDriver

# The device, host and spec modules are imported where they are used, so that `nvme-lm --help` and
# the other commands do not pay for them (numpy, the whole emulator: ~0.4 s).

NSID_ALL = 0xFFFFFFFF
FSUPP = 1 << 0  # FID Supported and Effects: the feature is supported
FID_RATE_LIMITING = 0x28
FID_CDQ = 0x21  # CDQ head pointer (TP4159): needs a CDQID, not a controller-wide value
FID_TIMESTAMP = 0x0E  # its value is an 8-byte data buffer, not DW0


class ShowError(click.ClickException):
    """A bad option or a refusal by the device: printed as `Error: ...`, exit status 1."""


# ------------------------------------------------------------------------------------------ model
def load_model(name: str) -> DeviceModel:
    """A built-in model by name, or a model file (`*.toml`) by path."""
    try:
        if name.endswith(".toml"):
            return DeviceModel.from_toml(Path(name).read_text())
        return DeviceModel.builtin(name)
    except (OSError, ValueError) as e:
        raise ShowError(str(e)) from None


def _flags(value: int, flag_type: type) -> list[str]:
    return [f.name for f in flag_type if value & f]


# ------------------------------------------------------------------------------------------ queries
def _identify_controller(pf: NvmeDriver) -> dict[str, Any]:
    from nvme_lm.spec.identify import CMIC, CNS, OACS, ONCS, IdentifyController

    c = IdentifyController.decode(pf.identify(CNS.CTRL))
    return {
        "vid": c.vid, "ssvid": c.ssvid, "sn": c.sn.strip(), "mn": c.mn.strip(), "fr": c.fr.strip(),
        "ieee": c.ieee, "cntlid": c.cntlid, "ver": f"{c.ver >> 16}.{(c.ver >> 8) & 0xFF}.{c.ver & 0xFF}",
        "mdts": c.mdts, "max_transfer_bytes": (4096 << c.mdts) if c.mdts else None,
        "cmic": {"value": c.cmic, "flags": _flags(c.cmic, CMIC)},
        "oacs": {"value": c.oacs, "flags": _flags(c.oacs, OACS)},
        "oncs": {"value": c.oncs, "flags": _flags(c.oncs, ONCS)},
        "nn": c.nn, "tnvmcap": c.tnvmcap, "unvmcap": c.unvmcap, "sqes": c.sqes, "cqes": c.cqes,
        "acl": c.acl, "aerl": c.aerl, "subnqn": c.subnqn.rstrip("\0"),
    }


def _primary_caps(pf: NvmeDriver) -> dict[str, Any]:
    from nvme_lm.host import virtualization as hv
    from nvme_lm.spec.identify import CRT

    p = hv.primary_capabilities(pf)
    d = dataclasses.asdict(p)
    d["crt"] = _flags(p.crt, CRT)
    return d


def _secondaries(pf: NvmeDriver) -> list[dict[str, Any]]:
    from nvme_lm.host import virtualization as hv

    return [{"scid": e.scid, "pcid": e.pcid, "vfn": e.vfn, "online": e.online, "nvq": e.nvq, "nvi": e.nvi}
            for e in hv.secondary_controllers(pf)]


def _lba_format_index(pf: NvmeDriver, lba_size: int) -> int:
    from nvme_lm.spec.identify import CNS, IdentifyNamespace

    common = IdentifyNamespace.decode(pf.identify(CNS.NS, nsid=NSID_ALL))
    for i, f in enumerate(common.lbaf[: common.nlbaf + 1]):
        if f.lbads and 1 << f.lbads == lba_size and f.ms == 0:
            return i
    sizes = [1 << f.lbads for f in common.lbaf[: common.nlbaf + 1] if f.lbads]
    raise ShowError(f"no LBA format of {lba_size} bytes (the device offers {sizes})")


def _namespaces(pf: NvmeDriver) -> list[dict[str, Any]]:
    from nvme_lm.spec.identify import CNS, IdentifyNamespace, decode_ctrl_list, decode_nsid_list

    out = []
    for nsid in decode_nsid_list(pf.identify(CNS.ALLOCATED_NS_LIST)):
        n = IdentifyNamespace.decode(pf.identify(CNS.ALLOCATED_NS, nsid=nsid))
        lbaf = n.lbaf[n.format_index]
        lba_size = 1 << lbaf.lbads
        attached = decode_ctrl_list(pf.identify(CNS.NS_CTRL_LIST, nsid=nsid))
        out.append({"nsid": nsid, "nsze": n.nsze, "ncap": n.ncap, "nuse": n.nuse, "lba_size": lba_size,
                    "size_bytes": n.nsze * lba_size, "nguid": n.nguid.hex(), "attached": attached})
    return out


def _features(pf: NvmeDriver) -> list[dict[str, Any]]:
    """Current value of every FID the FID Supported and Effects log lists (as `nvme get-feature -f`)."""
    from nvme_lm.host import commands as cmd
    from nvme_lm.host.qpair import NvmeCommandError
    from nvme_lm.spec.features import FEATURE_CODECS, FeatureCapability, FeatureId, FeatureSelect, Timestamp
    from nvme_lm.spec.logs import FidSupportedEffectsLog, LogId

    log = FidSupportedEffectsLog.decode(pf.get_log(LogId.FID_SUPPORTED_EFFECTS, FidSupportedEffectsLog.SIZE))
    out = []
    for fid, effects in enumerate(log.fids):
        if not effects & FSUPP or fid in (FID_RATE_LIMITING, FID_CDQ):  # 28h per target, 21h per CDQ
            continue
        name = FeatureId(fid).name if fid in FeatureId._value2member_map_ else f"FID {fid:#04x}"
        entry: dict[str, Any] = {"fid": fid, "name": name}
        try:
            size = Timestamp.SIZE if fid == FID_TIMESTAMP else 0
            comp, data = pf.admin(cmd.get_features(fid, FeatureSelect.CURRENT), read=size)
            caps = pf.get_features(fid, FeatureSelect.SUPPORTED_CAPABILITIES)
        except NvmeCommandError as e:
            entry["error"] = str(e.status)
            out.append(entry)
            continue
        entry["value"] = comp.dw0
        entry["capabilities"] = _flags(caps, FeatureCapability)
        codec = FEATURE_CODECS.get(fid)  # type: ignore[call-overload]
        if codec is not None:
            entry["decoded"] = dataclasses.asdict(codec.from_dword(comp.dw0))
        elif fid == FeatureId.TIMESTAMP:
            entry["decoded"] = dataclasses.asdict(Timestamp.from_bytes(data))
        out.append(entry)
    return out


def _rate_limits(pf: NvmeDriver, cntlids: list[int]) -> dict[str, Any]:
    """TP4176 limits per controller, when the host side of rate limiting exists and the PF has FID 28h."""
    from nvme_lm.host.qpair import NvmeCommandError
    from nvme_lm.spec import status as st

    try:
        from nvme_lm.host.rate_limit import get_rate_limit
    except ImportError:
        return {"supported": False, "note": "rate limiting is not built into this nvme-lm"}
    out = []
    for cntlid in cntlids:
        try:
            r = get_rate_limit(pf, cntlid)
        except NvmeCommandError as e:
            if e.status == st.INVALID_FIELD and not out:
                return {"supported": False, "note": f"Get Features 28h refused ({e.status})"}
            out.append({"cntlid": cntlid, "error": str(e.status)})
            continue
        out.append({"cntlid": cntlid, "enabled": r.enabled, "mode": "soft" if r.soft else "hard",
                    "iops": r.tiops or None, "write_iops": r.wiops or None,
                    "mib_s": r.total_bytes_s / (1 << 20) if r.tbwv else None,
                    "write_mib_s": r.write_bytes_s / (1 << 20) if r.wbwv else None})
    return {"supported": True, "controllers": out}


def _controllers(pf: NvmeDriver, ident: dict[str, Any], caps: dict[str, Any] | None,
                 secondaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every controller of the subsystem (CNS 13h) with its role and resources (CNS 14h/15h)."""
    from nvme_lm.spec.identify import CNS, decode_ctrl_list

    by_scid = {s["scid"]: s for s in secondaries}
    out = []
    for cntlid in decode_ctrl_list(pf.identify(CNS.CTRL_LIST)):
        if cntlid == ident["cntlid"]:
            vq = vi = None
            if caps is not None:
                vq, vi = caps["vqprt"] + caps["vqrfap"], caps["viprt"] + caps["virfap"]
            out.append({"cntlid": cntlid, "role": "PF", "vfn": None, "state": "online", "vq": vq, "vi": vi})
        elif cntlid in by_scid:
            s = by_scid[cntlid]
            out.append({"cntlid": cntlid, "role": "VF", "vfn": s["vfn"],
                        "state": "online" if s["online"] else "offline", "vq": s["nvq"], "vi": s["nvi"]})
        else:
            out.append({"cntlid": cntlid, "role": "?", "vfn": None, "state": "unknown", "vq": None, "vi": None})
    return out


# ------------------------------------------------------------------------------------------ the run
def show_device(model_name: str, *, vfs: int = 0, vq: int | None = None, vi: int | None = None,
                ns_mib: int = 64, lba_size: int = 4096) -> dict[str, Any]:
    """Installs `model_name` in a temporary directory, brings its PF up (and `vfs` VFs with a namespace
    each), and returns everything the PF reports, as one JSON-able dict."""
    from nvme_lm.device.ssd import EmulatedSsd
    from nvme_lm.host.driver import NvmeDriver
    from nvme_lm.host.qpair import NvmeCommandError
    from nvme_lm.vm.memory import GuestMemory

    model = load_model(model_name)
    with tempfile.TemporaryDirectory(prefix="nvme-lm-show-") as tmp:
        ssd = EmulatedSsd(Path(tmp) / "ssd", model)
        mem = GuestMemory(16 << 20)
        ssd.pf.iommu.map(mem.base, mem.buf)
        pf = NvmeDriver(ssd.pf, mem, timeout=10.0)
        try:
            pf.start()
            return _inspect(pf, model, vfs=vfs, vq=vq, vi=vi, ns_mib=ns_mib, lba_size=lba_size)
        except NvmeCommandError as e:
            raise ShowError(f"the device refused a command: {e}") from None
        finally:
            with contextlib.suppress(Exception):
                pf.shutdown()
            ssd.power_off()
            ssd.pf.iommu.clear()
            with contextlib.suppress(BufferError):
                mem.close()


def _inspect(pf: NvmeDriver, model: DeviceModel, *, vfs: int, vq: int | None, vi: int | None, ns_mib: int,
             lba_size: int) -> dict[str, Any]:
    from nvme_lm.host import virtualization as hv
    from nvme_lm.spec.identify import OACS

    ident = _identify_controller(pf)
    sriov = bool(ident["oacs"]["value"] & OACS.VMS)
    caps = _primary_caps(pf) if sriov else None
    vf_setup: dict[str, Any] | None = None
    if vfs:
        if caps is None:
            raise ShowError(f"model {model.name!r} has no SR-IOV (no Virtualization Management): --vfs needs VFs")
        total = len(_secondaries(pf))
        if vfs > total:
            raise ShowError(f"model {model.name!r} has {total} VFs; --vfs {vfs} asks for more")
        # a fair share of the flexible pools unless told otherwise, capped by the per-VF maximum
        nvq = vq if vq is not None else min(caps["vqfrsm"], caps["vqfrt"] // total)
        nvi = vi if vi is not None else min(caps["vifrsm"], caps["vifrt"] // total)
        index = _lba_format_index(pf, lba_size)
        nsze = (ns_mib << 20) // lba_size
        for vfn in range(1, vfs + 1):
            entry = hv.bring_up_vf(pf, vfn, nvq, nvi)
            nsid = pf.create_namespace(nsze, index, shared=False)
            pf.attach_namespace(nsid, [entry.scid])
        vf_setup = {"vfs": vfs, "vq_per_vf": nvq, "vi_per_vf": nvi, "namespace_mib": ns_mib, "lba_size": lba_size}
        ident = _identify_controller(pf)  # UNVMCAP moved with the namespaces
    caps = _primary_caps(pf) if sriov else None  # again: the VFs took from the pools
    secondaries = _secondaries(pf) if sriov else []
    controllers = _controllers(pf, ident, caps, secondaries)
    return {
        "model": model.name,
        "setup": vf_setup,
        "identify": ident,
        "controllers": controllers,
        "primary_capabilities": caps,
        "secondary_controllers": secondaries,
        "namespaces": _namespaces(pf),
        "features": _features(pf),
        "rate_limits": _rate_limits(pf, [c["cntlid"] for c in controllers]),
    }


# ------------------------------------------------------------------------------------------ rendering
_WORDS = {"role", "state", "name", "decoded", "capabilities", "enabled", "mode", "attached to"}


def _table(title: str, *columns: str) -> Table:
    """Numbers right-aligned, words left-aligned."""
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c in _WORDS else "right")
    return t


def _opt(v: Any) -> str:
    return "-" if v is None else str(v)


def render(d: dict[str, Any], console: Console) -> None:
    i = d["identify"]
    t = Table(title=f"Identify Controller ({d['model']})", title_justify="left", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    t.add_row("VID / SSVID", f"{i['vid']:#06x} / {i['ssvid']:#06x}")
    t.add_row("SN", i["sn"])
    t.add_row("MN", i["mn"])
    t.add_row("FR", i["fr"])
    t.add_row("IEEE OUI", f"{i['ieee']:06x}")
    t.add_row("VER", i["ver"])
    mdts = "no limit" if not i["mdts"] else f"{i['mdts']} ({i['max_transfer_bytes'] >> 10} KiB)"
    t.add_row("MDTS", mdts)
    for key in ("cmic", "oacs", "oncs"):
        t.add_row(key.upper(), f"{i[key]['value']:#06x}  {' '.join(i[key]['flags']) or '-'}")
    t.add_row("NN", str(i["nn"]))
    t.add_row("TNVMCAP / UNVMCAP", f"{i['tnvmcap']:,} / {i['unvmcap']:,} bytes")
    t.add_row("SUBNQN", i["subnqn"])
    console.print(t)

    c = _table("Controllers (CNS 13h)", "CNTLID", "role", "VF", "state", "VQ", "VI")
    for row in d["controllers"]:
        style = "green" if row["state"] == "online" else "dim"
        c.add_row(str(row["cntlid"]), row["role"], _opt(row["vfn"]), f"[{style}]{row['state']}[/{style}]",
                  _opt(row["vq"]), _opt(row["vi"]))
    console.print(c)

    p = d["primary_capabilities"]
    if p is not None:
        pc = Table(title="Primary Controller Capabilities (CNS 14h)", title_justify="left")
        for col in ("", "total flexible", "allocated", "allocated to PF", "PF private", "max per VF", "granularity"):
            pc.add_column(col, justify="right" if col else "left")
        pc.add_row("VQ", *(str(p[k]) for k in ("vqfrt", "vqrfa", "vqrfap", "vqprt", "vqfrsm", "vqgran")))
        pc.add_row("VI", *(str(p[k]) for k in ("vifrt", "virfa", "virfap", "viprt", "vifrsm", "vigran")))
        console.print(pc)
        console.print(f"[dim]CNTLID {p['cntlid']}, CRT {' '.join(p['crt']) or '-'}[/dim]")
        s = _table("Secondary Controller List (CNS 15h)", "SCID", "PCID", "VFN", "state", "NVQ", "NVI")
        for e in d["secondary_controllers"]:
            s.add_row(str(e["scid"]), str(e["pcid"]), str(e["vfn"]), "online" if e["online"] else "offline",
                      str(e["nvq"]), str(e["nvi"]))
        console.print(s)

    n = _table("Namespaces", "NSID", "size", "LBA size", "NSZE", "NUSE", "attached to")
    for ns in d["namespaces"]:
        n.add_row(str(ns["nsid"]), f"{ns['size_bytes'] >> 20} MiB", str(ns["lba_size"]), f"{ns['nsze']:,}",
                  f"{ns['nuse']:,}", ", ".join(str(x) for x in ns["attached"]) or "-")
    if not d["namespaces"]:
        n.add_row("-", "none allocated", "", "", "", "")
    console.print(n)

    f = _table("Features (Get Features, current)", "FID", "name", "value", "decoded", "capabilities")
    for e in d["features"]:
        if "error" in e:
            f.add_row(f"{e['fid']:02x}h", e["name"], f"[red]{e['error']}[/red]", "", "")
            continue
        dec = " ".join(f"{k}={v}" for k, v in (e.get("decoded") or {}).items() if v)  # the set fields
        f.add_row(f"{e['fid']:02X}h", e["name"], f"{e['value']:#010x}", dec or "-", " ".join(e["capabilities"]).lower())
    console.print(f)

    r = d["rate_limits"]
    if not r["supported"]:
        console.print(f"[dim]Rate limits: {r['note']}[/dim]")
        return
    rl = _table("Rate limits (Feature 28h)", "CNTLID", "enabled", "mode", "IOPS", "write IOPS", "MiB/s",
                "write MiB/s")
    online = {c["cntlid"] for c in d["controllers"] if c["state"] == "online"}
    hidden = 0
    for e in r["controllers"]:
        if e["cntlid"] not in online and not e.get("enabled") and "error" not in e:
            hidden += 1  # an offline VF with no limit: nothing to say
            continue
        if "error" in e:
            rl.add_row(str(e["cntlid"]), f"[red]{e['error']}[/red]", "", "", "", "", "")
            continue
        rl.add_row(str(e["cntlid"]), "yes" if e["enabled"] else "no", e["mode"], _opt(e["iops"]),
                   _opt(e["write_iops"]), _opt(e["mib_s"]), _opt(e["write_mib_s"]))
    console.print(rl)
    if hidden:
        console.print(f"[dim]{hidden} offline controllers without limits not shown (see --json)[/dim]")


# ------------------------------------------------------------------------------------------ click
@click.group("device")
def device() -> None:
    """Inspect emulated devices."""


@device.command("show")
@click.option("--model", "model_name", required=True,
              help=f"A built-in model ({', '.join(DeviceModel.builtin_names())}) or a model .toml file.")
@click.option("--vfs", type=click.IntRange(0), default=0, show_default=True,
              help="Bring this many VFs online, each with a namespace of its own.")
@click.option("--vq", type=click.IntRange(2), default=None,
              help="VQ resources per VF (admin queue included); default: a fair share of the pool.")
@click.option("--vi", type=click.IntRange(1), default=None, help="VI resources per VF; default: a fair share.")
@click.option("--ns-mib", type=click.IntRange(1), default=64, show_default=True, help="Size of each VF's namespace.")
@click.option("--lba-size", type=click.Choice(["512", "4096"]), default="4096", show_default=True,
              help="LBA size of the VF namespaces.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
def show(model_name: str, vfs: int, vq: int | None, vi: int | None, ns_mib: int, lba_size: str,
         as_json: bool) -> None:
    """Controllers, VFs and their resources, namespaces, identity, features and limits of a model's SSD."""
    d = show_device(model_name, vfs=vfs, vq=vq, vi=vi, ns_mib=ns_mib, lba_size=int(lba_size))
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 110))  # piped: keep the tables whole
        render(d, console)
