"""The single-host demo: one emulated SSD, guest memory mapped into its PF's IOMMU, the host
driver bringing the controller up, a namespace, I/O queues and a verified random workload.

`SingleHost` is also the rig `nvme-lm bench io` measures, so the demo and the benchmark
exercise exactly the same path: host driver -> SQ -> doorbell -> controller engine ->
namespace file -> CQ -> MSI-X -> host driver.
"""

from __future__ import annotations

import contextlib
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.host.driver import IoQueue, NvmeDriver
from nvme_lm.host.qpair import NvmeCommandError
from nvme_lm.spec import status as st
from nvme_lm.vm.memory import GuestMemory
from nvme_lm.vm.workload import Workload, WorkloadConfig, WorkloadStats

CNS_NAMESPACE = 0x00
CNS_CONTROLLER = 0x01
NSID_ALL = 0xFFFFFFFF


class SingleHost:
    """An EmulatedSsd plus guest memory and a started host driver on its PF.

    With no `data_dir` everything lives in a temporary directory removed by `close()`.
    """

    def __init__(self, data_dir: Path | str | None = None, *, mem_size: int = 64 << 20,
                 timeout: float = 10.0) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="nvme-lm-") if data_dir is None else None
        self.data_dir = Path(self._tmp.name if self._tmp else data_dir)  # type: ignore[arg-type]
        self.ssd = EmulatedSsd(self.data_dir / "ssd")
        self.mem = GuestMemory(mem_size)
        self.ssd.pf.iommu.map(self.mem.base, self.mem.buf)
        self.driver = NvmeDriver(self.ssd.pf, self.mem, timeout=timeout)
        self.driver.start()
        self.created_via = "subsystem"

    def create_namespace(self, size_bytes: int, lba_size: int) -> int:
        """A namespace attached to the primary controller; returns its NSID.

        Goes through Namespace Management + Namespace Attachment (the LBA format index found by
        Identify Namespace FFFFFFFFh, the controller ID by Identify Controller) when the driver and
        the controller support them; otherwise creates it on the subsystem directly, as a vendor
        tool would at the factory. `created_via` says which path was taken, and why.
        """
        d = self.driver
        nsze = size_bytes // lba_size
        if hasattr(d, "create_namespace") and hasattr(d, "attach_namespace"):
            try:
                index = lba_format_index(d.identify(CNS_NAMESPACE, nsid=NSID_ALL), lba_size)
                cntlid = decode_identify_controller(d.identify(CNS_CONTROLLER))["cntlid"]
                if index is None:
                    raise LookupError(f"no LBA format of {lba_size} bytes")
                nsid = int(d.create_namespace(nsze, index))
                d.attach_namespace(nsid, [cntlid])
                self.created_via = "admin: Namespace Management + Attachment"
                return nsid
            except (NvmeCommandError, LookupError) as e:
                why = f"admin path refused ({e})"
        else:
            why = "host driver has no Namespace Management"
        sub = self.ssd.subsystem
        ns = sub.create_namespace(nsze=nsze, lba_size=lba_size)
        sub.attach(ns.nsid, self.ssd.primary.cntlid)
        self.created_via = f"subsystem (factory tool): {why}"
        return ns.nsid

    def namespace_file(self, nsid: int) -> Path:
        """The file backing `nsid` (benchmarks use it for the raw preadv/pwritev baseline)."""
        return self.ssd.subsystem.namespaces[nsid].path

    def io_queue(self, depth: int, qid: int = 1) -> IoQueue:
        if not self.driver.io_queues:
            self.driver.set_number_of_queues(1, 1)
        return self.driver.create_io_queue(qid, depth)

    def close(self) -> None:
        try:
            if self.driver.admin_q is not None:
                self.driver.shutdown()
        finally:
            self.ssd.power_off()
            self.ssd.pf.iommu.clear()
            with contextlib.suppress(BufferError):  # views still referenced somewhere: the GC unmaps it
                self.mem.close()
            if self._tmp is not None:
                self._tmp.cleanup()

    def __enter__(self) -> SingleHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ identify
def _ascii(b: bytes) -> str:
    return b.decode("ascii", "replace").rstrip(" \0")


def decode_identify_controller(data: bytes) -> dict[str, Any]:
    """The fields the demo shows, via `spec.identify` when present, else straight from spec offsets (§20.7)."""
    try:
        from nvme_lm.spec.identify import IdentifyController

        c = IdentifyController.decode(data)
        return {"vid": c.vid, "ssvid": c.ssvid, "sn": c.sn.strip(), "mn": c.mn.strip(), "fr": c.fr.strip(),
                "mdts": c.mdts, "cntlid": c.cntlid, "ver": c.ver, "nn": c.nn, "oacs": c.oacs, "oncs": c.oncs}
    except ImportError:
        vid, ssvid = struct.unpack_from("<HH", data, 0)
        return {"vid": vid, "ssvid": ssvid, "sn": _ascii(data[4:24]), "mn": _ascii(data[24:64]),
                "fr": _ascii(data[64:72]), "mdts": data[77], "cntlid": struct.unpack_from("<H", data, 78)[0],
                "ver": struct.unpack_from("<I", data, 80)[0], "nn": struct.unpack_from("<I", data, 516)[0],
                "oacs": struct.unpack_from("<H", data, 256)[0], "oncs": struct.unpack_from("<H", data, 520)[0]}


def decode_identify_namespace(data: bytes) -> dict[str, Any]:
    """NSZE/NCAP/NUSE and the LBA data size of the format in use (§20.8)."""
    try:
        from nvme_lm.spec.identify import IdentifyNamespace

        n = IdentifyNamespace.decode(data)
        nsze, ncap, nuse, flbas = n.nsze, n.ncap, n.nuse, n.flbas
        lbads = n.lbaf[n.format_index].lbads
    except ImportError:
        nsze, ncap, nuse = struct.unpack_from("<QQQ", data, 0)
        flbas = data[26]
        index = (flbas & 0xF) | ((flbas >> 5) & 0x3) << 4
        lbads = data[128 + 4 * index + 2]
    lba_size = 1 << lbads if lbads else 0
    return {"nsze": nsze, "ncap": ncap, "nuse": nuse, "flbas": flbas, "lba_size": lba_size,
            "size_bytes": nsze * lba_size}


def lba_format_index(data: bytes, lba_size: int) -> int | None:
    """The index of the LBA format with `lba_size`-byte blocks and no metadata, from Identify Namespace."""
    nlbaf = data[25]
    for i in range(min(nlbaf + 1, 64)):
        ms, lbads = struct.unpack_from("<HB", data, 128 + 4 * i)
        if lbads and ms == 0 and 1 << lbads == lba_size:
            return i
    return None


def identify(driver: NvmeDriver, cns: int, nsid: int = 0) -> tuple[dict[str, Any] | None, str | None]:
    """(decoded fields, None) or (None, why not): a controller without Identify is reported, not fatal."""
    try:
        data = driver.identify(cns, nsid=nsid)
    except NvmeCommandError as e:
        if e.status == st.INVALID_OPCODE:
            return None, "Identify not implemented by this controller (Invalid Command Opcode)"
        return None, f"Identify CNS {cns:#04x} failed: {e.status}"
    decode = decode_identify_controller if cns == CNS_CONTROLLER else decode_identify_namespace
    try:
        return decode(data), None
    except Exception as e:  # a malformed structure is the device's bug; the demo reports it
        return None, f"Identify CNS {cns:#04x} data could not be decoded: {e}"


# ------------------------------------------------------------------------------------------ the demo
@dataclass
class DemoResult:
    data_dir: str
    nsid: int
    created_via: str
    lba_size: int
    namespace_bytes: int
    qd: int
    controller: dict[str, Any] | None
    controller_note: str | None
    namespace: dict[str, Any] | None
    namespace_note: str | None
    run: WorkloadStats
    sweep: WorkloadStats
    notes: list[str] = field(default_factory=list)

    @property
    def verify_failures(self) -> int:
        return len(self.run.verify_failures) + len(self.sweep.verify_failures)

    @property
    def errors(self) -> int:
        return self.run.errors + self.sweep.errors

    @property
    def ok(self) -> bool:
        return self.verify_failures == 0 and self.errors == 0 and self.run.ios > 0

    def to_dict(self) -> dict[str, Any]:
        run = self.run.to_dict()
        lat = run["latency_us"]["all"]
        return {
            "ok": self.ok,
            "data_dir": self.data_dir,
            "identify": {
                "controller": self.controller, "controller_note": self.controller_note,
                "namespace": self.namespace, "namespace_note": self.namespace_note,
            },
            "namespace": {"nsid": self.nsid, "created_via": self.created_via, "lba_size": self.lba_size,
                          "size_bytes": self.namespace_bytes},
            "workload": {"qd": self.qd, "block_size": self.run.block_size, **run},
            "sweep": self.sweep.to_dict(),
            "iops": run["iops"],
            "latency_us": {k: lat[k] for k in ("p50", "p90", "p99", "p99.9")},
            "verify_failures": self.verify_failures,
            "errors": self.errors,
            "notes": self.notes,
        }


def run_demo(*, data_dir: Path | str | None = None, seconds: float = 3.0, qd: int = 8,
             size_mib: int = 64, lba_size: int = 512, region_mib: int = 16, seed: int | None = None,
             progress: Any = None) -> DemoResult:
    """Runs the whole demo; `progress(phase, done, total)` is told how far each phase got."""
    def report(phase: str, total: float | None):
        return (lambda done: progress(phase, done, total)) if progress is not None else None

    with SingleHost(data_dir) as host:
        ctrl, ctrl_note = identify(host.driver, CNS_CONTROLLER)
        nsid = host.create_namespace(size_mib << 20, lba_size)
        ns, ns_note = identify(host.driver, CNS_NAMESPACE, nsid)
        if ns is not None and ns["lba_size"] and ns["lba_size"] != lba_size:
            lba_size = ns["lba_size"]
        q = host.io_queue(depth=max(64, 2 * qd))
        nblocks = min(region_mib << 20, size_mib << 20) // 4096
        cfg = WorkloadConfig(nsid=nsid, lba_size=lba_size, block_size=4096, nblocks=nblocks, qd=qd, seed=seed)
        with Workload(q, host.mem, cfg) as w:
            run = w.run(seconds, progress=report("random 4 KiB read/write", None))
            sweep = w.verify_all(progress=report("verify sweep", nblocks))
        if ns is not None:
            after, _ = identify(host.driver, CNS_NAMESPACE, nsid)
            ns["nuse_after_run"] = after["nuse"] if after is not None else None  # blocks the workload allocated
        notes = [f"workload region: {nblocks} blocks of 4 KiB at LBA 0; every read checked against "
                 "its header (LBA, generation, CRC-32) or zeroes if never written"]
        where = str(host.data_dir) if data_dir is not None else "(temporary directory, removed)"
        return DemoResult(where, nsid, host.created_via, lba_size, size_mib << 20, qd,
                          ctrl, ctrl_note, ns, ns_note, run, sweep, notes)
