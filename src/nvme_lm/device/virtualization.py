"""SR-IOV controller resources (NVMe Base §8.2.6, Virtualization Enhancements) as state and rules.

One primary controller (the PF) and its secondary controllers (one per VF) share two resource
types: VQ (a submission/completion queue pair, its id the queue id) and VI (an MSI-X vector, its
id the vector number). The primary owns private VQs (its admin queue included, at least two) and
private VIs (vector 0 included) that never move; the flexible pool is split between the primary
(Primary Controller Flexible Allocation, effective after the primary's next FLR, persistent) and
the secondaries (Secondary Controller Assign, only while the secondary is Offline). A secondary
has no private resources: its VQ ids are 0..NVQ-1 and its VI ids 0..NVI-1.

This module knows only numbers and rules. Each action checks everything before it changes
anything, so a refused command leaves the state exactly as it was. The effects on controllers
and PCIe functions (reset an offlined VF, resize its MSI-X table) are applied by whoever owns
them through `on_secondary_change` / `on_primary_change` (see `ssd.py`).
Status choices where the specification leaves room are recorded in docs/sriov.md.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nvme_lm.device import persist
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.request import NvmeError
from nvme_lm.spec import status as st
from nvme_lm.spec.identify import (
    CRT,
    SECONDARY_CTRL_MAX,
    PrimaryControllerCapabilities,
    SecondaryControllerEntry,
    SecondaryControllerList,
)
from nvme_lm.spec.opcodes import AdminOpcode as A
from nvme_lm.spec.virtualization import ResourceType, VirtAction

PEL_ACT = 40  # byte offsets in the SQE, for the Error Information log
PEL_RT = 41
PEL_CNTLID = 42
PEL_NR = 44
STATE_VERSION = 1
MIN_ONLINE_VQ = 2  # an admin queue pair and one I/O queue pair
MIN_ONLINE_VI = 1  # vector 0

# Admin commands only the primary controller runs (privileged actions, Base 2.2 recommends
# primary-only): they change or reveal the NVM subsystem beyond one VF, or are migration
# management (TP4159: migratable controllers must not support them). A VF's dispatch table
# leaves them out, so they are Invalid Opcode there and absent from its Commands Supported
# and Effects log and its OACS bits.
PRIVILEGED_ADMIN_OPCODES: frozenset[int] = frozenset({
    A.NS_MANAGEMENT,
    A.NS_ATTACHMENT,
    A.VIRTUALIZATION_MANAGEMENT,
    A.FORMAT_NVM,
    A.SANITIZE,
    A.FIRMWARE_COMMIT,
    A.FIRMWARE_DOWNLOAD,
    A.DEVICE_SELF_TEST,
    A.CAPACITY_MANAGEMENT,
    A.LOCKDOWN,
    A.NVME_MI_SEND,
    A.NVME_MI_RECEIVE,
    A.CLEAR_EXPORTED_NVM_RESOURCE_CONFIG,
    A.MANAGE_EXPORTED_NVM_SUBSYSTEM_RECEIVE,
    A.MANAGE_EXPORTED_NVM_SUBSYSTEM_SEND,
    A.MANAGE_EXPORTED_NAMESPACE,
    A.CROSS_CONTROLLER_RESET,
    A.TRACK_SEND,
    A.TRACK_RECEIVE,
    A.MIGRATION_SEND,
    A.MIGRATION_RECEIVE,
    A.CONTROLLER_DATA_QUEUE,
    A.GET_LBA_STATUS,  # TP4165 allocation data is for the migration host (docs/allocation-tracking.md)
})


@dataclass
class Pool:
    """One resource type: the primary's private count and the flexible pool."""

    rt: ResourceType
    private: int  # VQPRT / VIPRT
    flexible: int  # VQFRT / VIFRT
    max_per_secondary: int  # VQFRSM / VIFRSM
    granularity: int  # VQGRAN / VIGRAN
    primary: int = 0  # VQRFAP / VIRFAP: flexible resources the primary uses now
    primary_next: int = 0  # what the primary will use after its next FLR

    @property
    def supported(self) -> bool:
        return self.flexible > 0


@dataclass
class SecondaryState:
    """One secondary controller as the Secondary Controller List reports it."""

    scid: int  # its CNTLID
    vfn: int  # its VF number (1-based, as the SR-IOV capability numbers VFs)
    online: bool = False
    nvq: int = 0
    nvi: int = 0

    def assigned(self, rt: ResourceType) -> int:
        return self.nvq if rt == ResourceType.VQ else self.nvi

    def _set(self, rt: ResourceType, n: int) -> None:
        if rt == ResourceType.VQ:
            self.nvq = n
        else:
            self.nvi = n

    @property
    def io_queues(self) -> int:
        """I/O queue pairs the VF can use: its VQs minus the admin queue pair."""
        return max(self.nvq - 1, 0)


SecondaryHook = Callable[[SecondaryState, bool], None]  # (new state, the controller must be reset)
PrimaryHook = Callable[[int, int], None]  # (flexible VQs, flexible VIs) the primary now uses


class SriovResources:
    """The resource pools of one primary controller and the state of its secondaries."""

    def __init__(self, model: DeviceModel, *, primary_cntlid: int = 0, first_scid: int = 1,
                 state_file: Path | str | None = None) -> None:
        if model.vq_private < 2 or model.vi_private < 1:
            raise ValueError("a primary controller needs at least 2 private VQs and 1 private VI (vector 0)")
        if model.vq_granularity < 1 or model.vi_granularity < 1:
            raise ValueError("resource granularity must be at least 1")
        self.model = model
        self.primary_cntlid = primary_cntlid
        self.lock = threading.RLock()
        self.pools = {
            ResourceType.VQ: Pool(ResourceType.VQ, model.vq_private, model.vq_flexible,
                                  min(model.vq_max_per_vf, model.vq_flexible), model.vq_granularity),
            ResourceType.VI: Pool(ResourceType.VI, model.vi_private, model.vi_flexible,
                                  min(model.vi_max_per_vf, model.vi_flexible), model.vi_granularity),
        }
        self.secondaries: dict[int, SecondaryState] = {
            first_scid + i: SecondaryState(first_scid + i, i + 1) for i in range(model.max_vfs)
        }
        self.on_secondary_change: SecondaryHook | None = None
        self.on_primary_change: PrimaryHook | None = None
        self.state_file = Path(state_file) if state_file is not None else None
        self._load()

    # ================================================================ persistence
    def _load(self) -> None:
        """The primary's flexible allocation persists; at power-on it is in effect (power-on resets)."""
        if self.state_file is None or not self.state_file.exists():
            return
        state = json.loads(self.state_file.read_text())
        for rt, key in ((ResourceType.VQ, "vqrfap"), (ResourceType.VI, "virfap")):
            pool = self.pools[rt]
            n = int(state.get(key, 0))
            if 0 <= n <= pool.flexible:
                pool.primary = pool.primary_next = n

    def _save(self) -> None:
        if self.state_file is None:
            return
        state = {"version": STATE_VERSION, "vqrfap": self.pools[ResourceType.VQ].primary_next,
                 "virfap": self.pools[ResourceType.VI].primary_next}
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        persist.with_reserve(tmp.parent, lambda: tmp.write_text(json.dumps(state, indent=2)))
        os.replace(tmp, self.state_file)

    # ================================================================ queries
    def assigned_to_secondaries(self, rt: ResourceType) -> int:
        """VQRFA / VIRFA."""
        return sum(s.assigned(rt) for s in self.secondaries.values())

    def free(self, rt: ResourceType) -> int:
        """Flexible resources neither the primary uses nor a secondary holds."""
        pool = self.pools[rt]
        return pool.flexible - pool.primary - self.assigned_to_secondaries(rt)

    def primary_resources(self, rt: ResourceType) -> int:
        """What the primary can use now: private plus its flexible allocation in effect."""
        pool = self.pools[rt]
        return pool.private + pool.primary

    def by_vfn(self, vfn: int) -> SecondaryState:
        for sec in self.secondaries.values():
            if sec.vfn == vfn:
                return sec
        raise KeyError(f"no VF number {vfn}")

    def primary_capabilities(self) -> PrimaryControllerCapabilities:
        """Identify CNS 14h."""
        vq, vi = self.pools[ResourceType.VQ], self.pools[ResourceType.VI]
        with self.lock:
            return PrimaryControllerCapabilities(
                cntlid=self.primary_cntlid, portid=0,
                crt=(CRT.VQ if vq.supported else 0) | (CRT.VI if vi.supported else 0),
                vqfrt=vq.flexible, vqrfa=self.assigned_to_secondaries(ResourceType.VQ), vqrfap=vq.primary,
                vqprt=vq.private, vqfrsm=vq.max_per_secondary, vqgran=vq.granularity,
                vifrt=vi.flexible, virfa=self.assigned_to_secondaries(ResourceType.VI), virfap=vi.primary,
                viprt=vi.private, vifrsm=vi.max_per_secondary, vigran=vi.granularity,
            )

    def secondary_list(self, first_scid: int = 0) -> SecondaryControllerList:
        """Identify CNS 15h: secondaries with SCID >= `first_scid`, at most 127 of them."""
        with self.lock:
            entries = [
                SecondaryControllerEntry(scid=s.scid, pcid=self.primary_cntlid, scs=int(s.online), vfn=s.vfn,
                                         nvq=s.nvq, nvi=s.nvi)
                for s in sorted(self.secondaries.values(), key=lambda s: s.scid) if s.scid >= first_scid
            ]
        return SecondaryControllerList.of(entries[:SECONDARY_CTRL_MAX])

    # ================================================================ Virtualization Management
    def execute(self, act: int, rt: int, cntlid: int, nr: int) -> int:
        """Runs one Virtualization Management action; returns completion DW0 (resources modified)."""
        if act == VirtAction.PRIMARY_FLEXIBLE_ALLOCATION:
            return self.allocate_primary(cntlid, rt, nr)
        if act == VirtAction.SECONDARY_OFFLINE:
            return self.offline(cntlid)
        if act == VirtAction.SECONDARY_ASSIGN:
            return self.assign(cntlid, rt, nr)
        if act == VirtAction.SECONDARY_ONLINE:
            return self.online(cntlid)
        raise NvmeError(st.INVALID_FIELD, f"Virtualization Management action {act:#x} is reserved", PEL_ACT)

    def _secondary(self, cntlid: int) -> SecondaryState:
        sec = self.secondaries.get(cntlid)
        if sec is None:
            raise NvmeError(st.INVALID_CONTROLLER_IDENTIFIER, f"CNTLID {cntlid:#x} is not a secondary controller "
                            f"of primary {self.primary_cntlid}", PEL_CNTLID)
        return sec

    def _pool(self, rt: int) -> Pool:
        pool = self.pools[ResourceType(rt)] if rt in iter(ResourceType) else None
        if pool is None or not pool.supported:
            raise NvmeError(st.INVALID_RESOURCE_IDENTIFIER, f"resource type {rt} is not a flexible resource here",
                            PEL_RT)
        return pool

    @staticmethod
    def _check_granularity(pool: Pool, nr: int) -> None:
        if nr % pool.granularity:
            raise NvmeError(st.INVALID_NUMBER_OF_CONTROLLER_RESOURCES,
                            f"{nr} {pool.rt.name} is not a multiple of the granularity {pool.granularity}", PEL_NR)

    def allocate_primary(self, cntlid: int, rt: int, nr: int) -> int:
        """ACT 1h: the primary's flexible allocation from its next FLR on (and across power cycles)."""
        with self.lock:
            if cntlid != self.primary_cntlid:
                raise NvmeError(st.INVALID_CONTROLLER_IDENTIFIER,
                                f"CNTLID {cntlid:#x} is not the primary controller {self.primary_cntlid}", PEL_CNTLID)
            pool = self._pool(rt)
            self._check_granularity(pool, nr)
            held = self.assigned_to_secondaries(pool.rt)
            if nr > pool.flexible - held:
                raise NvmeError(st.INVALID_NUMBER_OF_CONTROLLER_RESOURCES,
                                f"{nr} {pool.rt.name} requested, {pool.flexible} flexible of which secondaries "
                                f"hold {held}", PEL_NR)
            pool.primary_next = nr
            self._save()
            return nr

    def assign(self, cntlid: int, rt: int, nr: int) -> int:
        """ACT 8h: the Offline secondary `cntlid` holds exactly `nr` resources of type `rt`."""
        with self.lock:
            sec = self._secondary(cntlid)
            pool = self._pool(rt)
            if sec.online:
                raise NvmeError(st.INVALID_SECONDARY_CONTROLLER_STATE,
                                f"secondary {cntlid} is Online; resources change only while Offline", PEL_ACT)
            self._check_granularity(pool, nr)
            if nr > pool.max_per_secondary:
                raise NvmeError(st.INVALID_NUMBER_OF_CONTROLLER_RESOURCES,
                                f"{nr} {pool.rt.name} exceeds the per-secondary maximum {pool.max_per_secondary}",
                                PEL_NR)
            more = nr - sec.assigned(pool.rt)
            if more > self.free(pool.rt):
                raise NvmeError(st.INVALID_NUMBER_OF_CONTROLLER_RESOURCES,
                                f"{more} more {pool.rt.name} requested, {self.free(pool.rt)} free", PEL_NR)
            sec._set(pool.rt, nr)
            self._notify(sec, reset=False)
            return nr

    def online(self, cntlid: int) -> int:
        """ACT 9h: the secondary becomes usable (CC.EN may be set) if it holds enough resources."""
        with self.lock:
            sec = self._secondary(cntlid)
            if sec.online:
                return 0
            if sec.nvq < MIN_ONLINE_VQ or sec.nvi < MIN_ONLINE_VI:
                raise NvmeError(st.INVALID_SECONDARY_CONTROLLER_STATE,
                                f"secondary {cntlid} holds {sec.nvq} VQ / {sec.nvi} VI; Online needs at least "
                                f"{MIN_ONLINE_VQ} VQ and {MIN_ONLINE_VI} VI", PEL_ACT)
            sec.online = True
            self._notify(sec, reset=False)
            return 0

    def offline(self, cntlid: int) -> int:
        """ACT 7h: the secondary stops (if it ran) and gives all its flexible resources back."""
        with self.lock:
            self._go_offline(self._secondary(cntlid))
            return 0

    def _go_offline(self, sec: SecondaryState) -> None:
        was_online = sec.online
        if not was_online and sec.nvq == 0 and sec.nvi == 0:
            return
        sec.online = False
        sec.nvq = sec.nvi = 0
        self._notify(sec, reset=was_online)

    def _notify(self, sec: SecondaryState, reset: bool) -> None:
        if self.on_secondary_change is not None:
            self.on_secondary_change(sec, reset)

    # ================================================================ implicit transitions
    def primary_reset(self, level: bool) -> None:
        """The primary was disabled, reset or shut down: every secondary goes Offline (§18).

        `level` (an FLR of the primary, not a plain CC.EN reset) also puts the pending Primary
        Controller Flexible Allocation into effect, once the secondaries gave their resources back.
        """
        with self.lock:
            for sec in self.secondaries.values():
                self._go_offline(sec)
            if not level:
                return
            changed = False
            for pool in self.pools.values():
                if pool.primary != pool.primary_next:
                    pool.primary = pool.primary_next
                    changed = True
            if changed and self.on_primary_change is not None:
                self.on_primary_change(self.pools[ResourceType.VQ].primary, self.pools[ResourceType.VI].primary)
