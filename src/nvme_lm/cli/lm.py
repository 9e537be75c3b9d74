"""`nvme-lm lm ...`: the TP4159 live-migration commands, in the spirit of nvme-cli's `lm` plugin.

An emulated device lives inside this process, so every subcommand builds one first: a model's PF
(the migration management controller) and one VF brought online with a namespace, driven by its own
guest driver. The requested operation then runs through the PF's driver as admin commands only
(Controller Data Queue, Track Send/Receive, Migration Send/Receive), and the result is printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from nvme_lm.cli.device import ShowError, load_model
from nvme_lm.device.model import DeviceModel

if TYPE_CHECKING:
    from nvme_lm.host.driver import IoQueue, NvmeDriver

GUEST_BYTES = 4 << 20
LBA_SIZE = 4096
NS_BLOCKS = 4096  # 16 MiB namespace for the VF
CDQ_SLOTS = 64
GUEST_WRITES = ((0, 1), (8, 4), (100, 2))  # (SLBA, NLB): a small, recognisable workload


@dataclass
class Rig:
    """The PF (MMC) driver, the VF's guest driver with one I/O queue, and what identifies the VF."""

    pf: NvmeDriver
    guest: NvmeDriver
    q: IoQueue
    vf_cntlid: int
    nsid: int


# ------------------------------------------------------------------------------------------ setup
def _driver(fn: Any) -> NvmeDriver:
    from nvme_lm.host.driver import NvmeDriver
    from nvme_lm.vm.memory import GuestMemory

    mem = GuestMemory(GUEST_BYTES)
    fn.iommu.map(mem.base, mem.buf)
    d = NvmeDriver(fn, mem, timeout=10.0)
    d.start()
    return d


@contextlib.contextmanager
def rig(model_name: str) -> Iterator[Rig]:
    """A fresh device in a temporary directory with VF 1 online, a namespace and a guest I/O queue."""
    from nvme_lm.cli.device import _lba_format_index
    from nvme_lm.device.ssd import EmulatedSsd
    from nvme_lm.host import virtualization as hv
    from nvme_lm.host.qpair import NvmeCommandError

    model = load_model(model_name)
    if not model.max_vfs:
        raise ShowError(f"model {model.name!r} has no VFs: live migration needs a migratable VF")
    with tempfile.TemporaryDirectory(prefix="nvme-lm-lm-") as tmp:
        ssd = EmulatedSsd(Path(tmp) / "ssd", model)
        drivers: list[NvmeDriver] = []
        try:
            pf = _driver(ssd.pf)
            drivers.append(pf)
            entry = hv.bring_up_vf(pf, 1, nvq=3, nvi=2)
            nsid = pf.create_namespace(NS_BLOCKS, _lba_format_index(pf, LBA_SIZE), shared=False)
            pf.attach_namespace(nsid, [entry.scid])
            guest = _driver(ssd.vf(1))
            drivers.append(guest)
            guest.set_number_of_queues(2, 2)
            q = guest.create_io_queue(1, 32, vector=1)
            yield Rig(pf, guest, q, entry.scid, nsid)
        except NvmeCommandError as e:
            raise ShowError(f"the device refused a command: {e}") from None
        finally:
            ssd.power_off()
            for d in drivers:
                d.fn.iommu.clear()
                with contextlib.suppress(BufferError):
                    d.mem.close()


def guest_writes(r: Rig) -> list[dict[str, int]]:
    """The guest's workload through its own driver: a few writes of random data."""
    for slba, nlb in GUEST_WRITES:
        comp = r.q.write(r.nsid, slba, os.urandom(nlb * LBA_SIZE), LBA_SIZE)
        if not comp.ok:
            raise ShowError(f"guest write at LBA {slba} failed: {comp.st}")
    return [{"slba": s, "nlb": n} for s, n in GUEST_WRITES]


def guest_reads(r: Rig) -> None:
    """Reads make the device write guest memory (data and CQEs): what memory tracking reports."""
    for slba, nlb in GUEST_WRITES:
        r.q.read(r.nsid, slba, nlb, LBA_SIZE)


# ------------------------------------------------------------------------------------------ operations
def op_cdq(r: Rig) -> dict[str, Any]:
    """Create a UDMQ for the VF, log user data changes over a guest workload, read the entries, delete."""
    from nvme_lm.host import tracking as ht

    addr = r.pf.mem.alloc(CDQ_SLOTS * 32)
    comp, _ = r.pf.admin(ht.cdq_create(addr, CDQ_SLOTS * 32, r.vf_cntlid))
    cdqid = comp.dw0 & 0xFFFF
    r.pf.admin(ht.log_user_data_changes(cdqid, True))
    writes = guest_writes(r)
    r.pf.admin(ht.cdq_get(cdqid), read=512)  # posts entries the device still holds for coalescing
    entries = ht.CdqReader(lambda off, n: r.pf.mem.view(addr + off, n), CDQ_SLOTS).poll()
    r.pf.admin(ht.log_user_data_changes(cdqid, False))
    r.pf.admin(ht.cdq_delete(cdqid))
    r.pf.mem.free(addr)
    return {"cntlid": r.vf_cntlid, "nsid": r.nsid, "cdqid": cdqid, "slots": CDQ_SLOTS, "guest_writes": writes,
            "entries": entries}


def _track_start(r: Rig, granularity: int = 12) -> int:
    from nvme_lm.host import tracking as ht

    data = ht.track_memory_data(granularity, [(r.guest.mem.base, GUEST_BYTES)])
    comp, _ = r.pf.admin(ht.track_memory_changes(r.vf_cntlid, True), data=data)
    return comp.dw0


def op_track_send(r: Rig) -> dict[str, Any]:
    """Start memory tracking over all of the guest's memory; report the granularity the device chose."""
    gran = _track_start(r)
    return {"cntlid": r.vf_cntlid, "tracking": True, "granularity": gran, "granularity_bytes": 1 << gran,
            "ranges": [{"address": r.guest.mem.base, "bytes": GUEST_BYTES}]}


def op_track_recv(r: Rig) -> dict[str, Any]:
    """Start tracking, run guest I/O, and read the memory ranges the device wrote."""
    from nvme_lm.host import tracking as ht

    _track_start(r)
    guest_writes(r)
    guest_reads(r)
    _, data = r.pf.admin(ht.track_receive(r.vf_cntlid, 4096), read=4096)
    t = ht.parse_track_receive(data)
    r.pf.admin(ht.track_memory_changes(r.vf_cntlid, False))
    return {"cntlid": t.cntlid, "granularity": t.granularity, "more": t.more, "suspended": t.suspended,
            "ranges": [{"address": a, "bytes": n} for a, n in t.ranges],
            "dirty_bytes": sum(n for _, n in t.ranges)}


def _vendor_json(vendor: bytes) -> dict[str, Any]:
    from nvme_lm.spec.controller_state import Tlv, decode_vendor

    names = {v: k.lower() for k, v in vars(Tlv).items() if k.isupper()}
    return {names.get(t, f"tlv_{t}"): _plain(v) for t, v in decode_vendor(vendor).items()} if vendor else {}


def _plain(v: Any) -> Any:
    """Tuples and bytes from the TLV decoder as JSON-able lists and hex strings."""
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, bytes | bytearray):
        return v.hex()
    return v


def _state(r: Rig) -> dict[str, Any]:
    """Get Controller State of the (suspended) VF, decoded: header, SQ/CQ records, vendor TLVs."""
    from nvme_lm.host import migration as hm

    blob, csup = hm.read_state(r.pf, r.vf_cntlid)
    cs, nvme = hm.parse_state(blob)
    return {
        "cntlid": r.vf_cntlid, "bytes": len(blob), "csup": csup,
        "header": {"suspended": cs.suspended, "nvme_bytes": len(cs.nvme), "vendor_bytes": len(cs.vendor)},
        "sqs": [dataclasses.asdict(s) for s in nvme.sqs] if nvme else [],
        "cqs": [dataclasses.asdict(c) for c in nvme.cqs] if nvme else [],
        "vendor": _vendor_json(cs.vendor),
    }


def op_migration_send(r: Rig, *, resume: bool) -> dict[str, Any]:
    """Suspend the VF (after a guest workload); with resume, resume it and check guest I/O runs again."""
    from nvme_lm.host import migration as hm

    guest_writes(r)
    hm.suspend_controller(r.pf, r.vf_cntlid)
    out: dict[str, Any] = {"cntlid": r.vf_cntlid, "suspended": _state(r)["header"]["suspended"]}
    if resume:
        hm.resume_controller(r.pf, r.vf_cntlid)
        out["resumed"] = True
        out["guest_io_after_resume"] = r.q.write(r.nsid, 0, bytes(LBA_SIZE), LBA_SIZE).ok
    return out


def op_migration_recv(r: Rig) -> dict[str, Any]:
    """Suspend the VF after a guest workload and read its state (left suspended, as a migration source)."""
    from nvme_lm.host import migration as hm

    guest_writes(r)
    hm.suspend_controller(r.pf, r.vf_cntlid)
    return _state(r)


def op_state(r: Rig) -> dict[str, Any]:
    """Suspend, get and decode the state, resume: a non-destructive look at a running VF."""
    from nvme_lm.host import migration as hm

    d = op_migration_recv(r)
    hm.resume_controller(r.pf, r.vf_cntlid)
    d["resumed"] = True
    return d


def run(model_name: str, op: Callable[[Rig], dict[str, Any]]) -> dict[str, Any]:
    with rig(model_name) as r:
        return {"model": load_model(model_name).name, "vf_cntlid": r.vf_cntlid, "nsid": r.nsid, **op(r)}


# ------------------------------------------------------------------------------------------ rendering
def _console() -> Console:
    c = Console()
    return c if c.is_terminal else Console(width=max(c.width, 110))


def emit(d: dict[str, Any], as_json: bool, table: Callable[[dict[str, Any]], Table] | None = None) -> None:
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    console = _console()
    if table is not None:
        console.print(table(d))
    rest = {k: v for k, v in d.items() if not isinstance(v, list | dict)}
    console.print(" ".join(f"{k}={v}" for k, v in rest.items()))


def _cdq_table(d: dict[str, Any]) -> Table:
    t = Table(title=f"UDMQ {d['cdqid']} entries (controller {d['cntlid']})", title_justify="left")
    for col in ("NSID", "SLBA", "NLB", "ESA", "DLBA", "LBACIR"):
        t.add_column(col, justify="right")
    for e in d["entries"]:
        t.add_row(*(str(e[k]) for k in ("nsid", "slba", "nlb", "esa", "dlba", "lbacir")))
    return t


def _ranges_table(d: dict[str, Any]) -> Table:
    t = Table(title=f"Memory ranges (controller {d['cntlid']})", title_justify="left")
    t.add_column("address", justify="right")
    t.add_column("bytes", justify="right")
    for e in d["ranges"]:
        t.add_row(f"{e['address']:#x}", f"{e['bytes']:,}")
    return t


def _queues_table(d: dict[str, Any]) -> Table:
    t = Table(title=f"I/O queues in the controller state (controller {d['cntlid']})", title_justify="left")
    for col in ("kind", "QID", "CQID/IV", "size", "head", "tail", "PRP1"):
        t.add_column(col, justify="left" if col == "kind" else "right")
    for s in d["sqs"]:
        t.add_row("SQ", str(s["qid"]), str(s["cqid"]), str(s["qsize"] + 1), str(s["head"]), str(s["tail"]),
                  f"{s['prp1']:#x}")
    for c in d["cqs"]:
        t.add_row("CQ", str(c["qid"]), str(c["iv"]), str(c["qsize"] + 1), str(c["head"]), str(c["tail"]),
                  f"{c['prp1']:#x}")
    return t


# ------------------------------------------------------------------------------------------ click
_model = click.option("--model", "model_name", default="vendor-a", show_default=True,
                      help=f"A built-in model ({', '.join(DeviceModel.builtin_names())}) or a model .toml file.")
_json = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@click.group("lm")
def lm() -> None:
    """Live-migration commands (TP4159) on a fresh device with one VF online and a guest workload."""


@lm.command("cdq")
@_model
@_json
def cdq_cmd(model_name: str, as_json: bool) -> None:
    """Create a UDMQ for the VF, log user data changes over guest writes, print the entries, delete."""
    emit(run(model_name, op_cdq), as_json, _cdq_table)


@lm.command("track-send")
@_model
@_json
def track_send_cmd(model_name: str, as_json: bool) -> None:
    """Start memory tracking of the VF over all of guest memory."""
    emit(run(model_name, op_track_send), as_json, _ranges_table)


@lm.command("track-recv")
@_model
@_json
def track_recv_cmd(model_name: str, as_json: bool) -> None:
    """Track memory, run guest I/O, print the memory ranges the device wrote."""
    emit(run(model_name, op_track_recv), as_json, _ranges_table)


@lm.command("migration-send")
@click.option("--suspend", "action", flag_value="suspend", default=True, help="Suspend the VF (default).")
@click.option("--resume", "action", flag_value="resume", help="Suspend, then resume the VF.")
@_model
@_json
def migration_send_cmd(action: str, model_name: str, as_json: bool) -> None:
    """Migration Send: suspend (and optionally resume) the VF."""
    emit(run(model_name, lambda r: op_migration_send(r, resume=action == "resume")), as_json)


@lm.command("migration-recv")
@_model
@_json
def migration_recv_cmd(model_name: str, as_json: bool) -> None:
    """Migration Receive: suspend the VF and print its controller state, decoded."""
    emit(run(model_name, op_migration_recv), as_json, _queues_table)


@lm.command("state")
@_model
@_json
def state_cmd(model_name: str, as_json: bool) -> None:
    """Suspend, get and decode the VF's controller state, resume."""
    emit(run(model_name, op_state), as_json, _queues_table)
