"""The NVM subsystem: namespaces on files in a data directory, the controllers that reach
them, which namespace is attached to which controller, and the counters they share.

The subsystem's configuration (namespaces, attachments, serial) is saved as JSON beside the
namespace files, so a device restarted on the same directory comes back with the same data.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from nvme_lm.device import persist
from nvme_lm.device.media import MediaPacer
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.namespace import Namespace, NamespaceInfo
from nvme_lm.device.smart import SmartCounters

if TYPE_CHECKING:
    from nvme_lm.device.controller import Controller
    from nvme_lm.device.exported import ExportedSubsystems
    from nvme_lm.device.rate_limit import RateLimits
    from nvme_lm.device.virtualization import SriovResources

STATE_FILE = "subsystem.json"


class NvmSubsystem:
    def __init__(self, data_dir: Path | str, model: DeviceModel | None = None, serial: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        persist.ensure_reserve(self.data_dir)  # metadata must still be saved when user data fills the disk
        self.model = model or DeviceModel()
        self.lock = threading.RLock()
        self.namespaces: dict[int, Namespace] = {}
        self.attached: dict[int, set[int]] = {}  # nsid -> cntlids
        self.controllers: dict[int, Controller] = {}
        self.sriov: SriovResources | None = None  # SR-IOV resource pools (device/virtualization.py), if any
        self.exported: ExportedSubsystems | None = None  # TP4193 exported subsystems (device/exported.py), if any
        self.rate_limits: RateLimits | None = None  # TP4176 limits (device/rate_limit.py), installed with the PF
        self.smart = SmartCounters()
        self.media = MediaPacer.for_model(self.model)  # the model's latency/bandwidth; None = no delay
        state = self._load_state()
        self.serial = serial or state.get("serial") or f"{self.model.serial_prefix}{os.urandom(6).hex().upper()}"
        self.nqn = state.get("nqn") or f"nqn.2024-01.io.nvme-lm:subsys.{self.serial.lower()}"
        for nsid_s, cntlids in state.get("attached", {}).items():
            nsid = int(nsid_s)
            self.namespaces[nsid] = Namespace.open(self.data_dir, nsid)
            self.attached[nsid] = set(cntlids)
        if state.get("unsafe_shutdowns") is not None:
            self.smart.unsafe_shutdowns = state["unsafe_shutdowns"]
            self.smart.power_cycles = state.get("power_cycles", 0) + 1
        self.save()

    # --- persistence ----------------------------------------------------------------------
    def _load_state(self) -> dict:
        path = self.data_dir / STATE_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def save(self) -> None:
        state = {
            "serial": self.serial,
            "nqn": self.nqn,
            "attached": {str(n): sorted(c) for n, c in sorted(self.attached.items())},
            "unsafe_shutdowns": self.smart.unsafe_shutdowns,
            "power_cycles": self.smart.power_cycles,
        }
        tmp = self.data_dir / (STATE_FILE + ".tmp")
        persist.with_reserve(self.data_dir, lambda: tmp.write_text(json.dumps(state, indent=2)))
        os.replace(tmp, self.data_dir / STATE_FILE)

    # --- capacity --------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.model.capacity_bytes

    @property
    def allocated_capacity_bytes(self) -> int:
        return sum(ns.nsze * ns.lba_size for ns in self.namespaces.values())

    @property
    def unallocated_capacity_bytes(self) -> int:
        return self.capacity_bytes - self.allocated_capacity_bytes

    # --- namespace management ---------------------------------------------------------------
    def free_nsid(self) -> int | None:
        for nsid in range(1, self.model.max_namespaces + 1):
            if nsid not in self.namespaces:
                return nsid
        return None

    def create_namespace(self, nsze: int, lba_size: int, nsid: int | None = None) -> Namespace:
        with self.lock:
            nsid = nsid or self.free_nsid()
            if nsid is None or nsid in self.namespaces:
                raise ValueError("no namespace identifier available")
            ns = Namespace.create(self.data_dir, NamespaceInfo.new(nsid, nsze, lba_size))
            self.namespaces[nsid] = ns
            self.attached[nsid] = set()
            self.save()
            return ns

    def delete_namespace(self, nsid: int) -> list[int]:
        """Deletes a namespace; returns the controllers it was attached to."""
        with self.lock:
            ns = self.namespaces.pop(nsid)
            cntlids = sorted(self.attached.pop(nsid, set()))
            ns.destroy()
            self.save()
            return cntlids

    def attach(self, nsid: int, cntlid: int) -> None:
        with self.lock:
            self.attached[nsid].add(cntlid)
            self.save()

    def detach(self, nsid: int, cntlid: int) -> None:
        with self.lock:
            self.attached[nsid].discard(cntlid)
            self.save()

    def is_attached(self, nsid: int, cntlid: int) -> bool:
        return cntlid in self.attached.get(nsid, ())

    def attached_namespaces(self, cntlid: int) -> list[int]:
        return sorted(n for n, c in self.attached.items() if cntlid in c)

    # --- controllers -------------------------------------------------------------------------
    def register(self, ctrl: Controller) -> None:
        self.controllers[ctrl.cntlid] = ctrl

    def flush_all(self) -> None:
        for ns in list(self.namespaces.values()):
            if ns.dirty:
                ns.flush()

    def close(self) -> None:
        """Orderly power-off: stop the controllers, flush the caches, close the files."""
        if self.media is not None:
            self.media.stop()
        for ctrl in list(self.controllers.values()):
            ctrl.stop()
        self.flush_all()
        self.save()
        for ns in self.namespaces.values():
            ns.close()
