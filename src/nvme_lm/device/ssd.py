"""An emulated SSD as a piece of hardware: an NVM subsystem plus the PCIe functions in front of
its controllers. Whoever installs the hardware (the host node) builds one of these and hands
out only its functions: the PF to the hypervisor, each VF to the VM it is assigned to.

With SR-IOV (`model.max_vfs > 0`) the PF carries the primary controller (CNTLID 0) and VF n
carries secondary controller n (CNTLID n), each with its own BAR0, IOMMU domain and MSI-X
table. The resource rules are in `virtualization.py`; this file applies their effects to the
controllers and functions. Decisions are recorded in docs/sriov.md.
"""

from __future__ import annotations

from pathlib import Path

from nvme_lm.device import feature_defaults as F
from nvme_lm.device import rate_limit
from nvme_lm.device.admin import ADMIN_HANDLERS
from nvme_lm.device.admin import cdq as admin_cdq
from nvme_lm.device.admin import exported as admin_exported
from nvme_lm.device.controller import Controller
from nvme_lm.device.exported import ExportedSubsystems
from nvme_lm.device.features import FeatureSpec
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.request import Handler
from nvme_lm.device.subsystem import NvmSubsystem
from nvme_lm.device.virtualization import PRIVILEGED_ADMIN_OPCODES, SecondaryState, SriovResources
from nvme_lm.pcie.function import PcieFunction, PcieIds
from nvme_lm.spec.opcodes import AdminOpcode
from nvme_lm.spec.registers import CC, CSTS, Reg, Shn
from nvme_lm.spec.virtualization import ResourceType

SRIOV_STATE_FILE = "sriov.json"
EXPORTED_STATE_FILE = "exported.json"


def _set_queue_limits(ctrl: Controller, io_queues: int, vectors: int) -> None:
    """What Number of Queues may grant and how many MSI-X vectors the function has."""
    ctrl.max_io_queues = io_queues
    nq = max(io_queues - 1, 0)
    spec = ctrl.features.specs[F.NUMBER_OF_QUEUES]
    ctrl.features.specs[F.NUMBER_OF_QUEUES] = FeatureSpec(spec.fid, nq | nq << 16, spec.saveable, spec.changeable,
                                                          spec.ns_specific)
    ctrl.features.current[F.NUMBER_OF_QUEUES] = nq | nq << 16
    if ctrl.fn.msix.nvectors != vectors:
        ctrl.fn.msix.resize(vectors)


class PrimaryController(Controller):
    """The PF's controller: a reset, disable or shutdown of it takes every secondary Offline."""

    def controller_reset(self, full: bool = False) -> None:
        super().controller_reset(full)
        admin_cdq.reset_mmc(self)  # TP4159: a CLR of the MMC deletes its UDMQs and stops memory tracking
        if self.subsystem.sriov is not None:
            # `full` is an FLR: a Controller Level Reset that also activates the flexible allocation
            self.subsystem.sriov.primary_reset(level=full)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        shn_before = CC.shn(self.cc)
        super().mmio_write(offset, size, value)
        if (offset == Reg.CC and size == 4 and self.subsystem.sriov is not None
                and CC.shn(value) != Shn.NONE and shn_before == Shn.NONE):
            self.subsystem.sriov.primary_reset(level=False)


class SecondaryController(Controller):
    """A VF's controller: Offline it reports CSTS.CFS and ignores CC.EN; Online it may use
    NVQ - 1 I/O queue pairs and NVI vectors."""

    def __init__(self, subsystem: NvmSubsystem, cntlid: int, fn: PcieFunction, state: SecondaryState, *,
                 admin_handlers: dict[int, Handler]) -> None:
        self.state = state
        super().__init__(subsystem, cntlid, fn, admin_handlers=admin_handlers)
        self.apply_resources()

    @property
    def online(self) -> bool:
        return self.state.online

    def apply_resources(self) -> None:
        """Resources change only while Offline, so the limits can follow them at once."""
        _set_queue_limits(self, self.state.io_queues, max(self.state.nvi, 1))

    def mmio_read(self, offset: int, size: int) -> int:
        value = super().mmio_read(offset, size)
        if offset == Reg.CSTS and size == 4 and not self.state.online:
            value |= CSTS.CFS
        return value

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if offset == Reg.CC and size == 4 and not self.state.online:
            value &= ~CC.EN  # an Offline secondary cannot be enabled
        super().mmio_write(offset, size, value)


class EmulatedSsd:
    def __init__(self, data_dir: Path | str, model: DeviceModel | None = None) -> None:
        self.subsystem = NvmSubsystem(data_dir, model)
        m = self.subsystem.model
        ids = PcieIds(m.vendor_id, m.device_id, m.subsystem_vendor_id, m.subsystem_id)
        self.sriov: SriovResources | None = None
        if m.max_vfs > 0:
            self.sriov = SriovResources(m, primary_cntlid=0, state_file=self.subsystem.data_dir / SRIOV_STATE_FILE)
            self.subsystem.sriov = self.sriov
        self.pf = PcieFunction(ids, msix_vectors=m.msix_vectors, name="pf0")
        self.primary = PrimaryController(self.subsystem, 0, self.pf, admin_handlers=self.primary_admin_handlers(m))
        rate_limit.install(self.primary)  # TP4176: the PF manages every controller's limits (FID 28h)
        admin_cdq.install(self.primary)  # TP4159: FID 21h on the PF, the controller that creates CDQs
        self.secondaries: list[SecondaryController] = []
        self.vfs: list[PcieFunction] = []
        self.exported: ExportedSubsystems | None = None
        if self.sriov is not None:
            vf_handlers = self.secondary_admin_handlers()
            for state in self.sriov.secondaries.values():
                fn = PcieFunction(ids, msix_vectors=max(m.vi_max_per_vf, 1), is_virtual=True,
                                  name=f"pf0vf{state.vfn}")
                self.secondaries.append(SecondaryController(self.subsystem, state.scid, fn, state,
                                                            admin_handlers=vf_handlers))
                self.vfs.append(fn)
            self.pf.virtfns = list(self.vfs)
            self.sriov.on_secondary_change = self._secondary_changed
            self.sriov.on_primary_change = self._primary_changed
            self._primary_changed(self.sriov.pools[ResourceType.VQ].primary, self.sriov.pools[ResourceType.VI].primary)
            # TP4193 exported NVM subsystems over the VFs (docs/exported-subsystems.md); saved ones are rebound
            self.exported = ExportedSubsystems(self.subsystem, admin_exported.capabilities_for(m, vf_handlers),
                                               state_file=self.subsystem.data_dir / EXPORTED_STATE_FILE)
            self.subsystem.exported = self.exported

    # --- dispatch tables: privilege is which commands a controller has at all ---------------------
    @staticmethod
    def primary_admin_handlers(model: DeviceModel) -> dict[int, Handler]:
        table = dict(ADMIN_HANDLERS)
        if model.max_vfs == 0:
            table.pop(AdminOpcode.VIRTUALIZATION_MANAGEMENT, None)  # no Virtualization Enhancements
            for op in admin_exported.OPCODES:  # no VFs to export
                table.pop(op, None)
        return table

    @staticmethod
    def secondary_admin_handlers() -> dict[int, Handler]:
        return {op: h for op, h in ADMIN_HANDLERS.items() if op not in PRIVILEGED_ADMIN_OPCODES}

    # --- SR-IOV effects ----------------------------------------------------------------------------
    def _secondary_changed(self, state: SecondaryState, reset: bool) -> None:
        ctrl = self.secondaries[state.vfn - 1]
        if reset:
            ctrl.controller_reset(full=True)  # an Online secondary taken Offline stops like an FLR
        ctrl.apply_resources()

    def _primary_changed(self, vq_flexible: int, vi_flexible: int) -> None:
        m = self.model
        _set_queue_limits(self.primary, m.max_io_queues + vq_flexible, m.msix_vectors + vi_flexible)

    # --- what the installer hands out --------------------------------------------------------------
    @property
    def model(self) -> DeviceModel:
        return self.subsystem.model

    def vf(self, vfn: int) -> PcieFunction:
        """The PCIe function of VF number `vfn` (1-based, as SR-IOV and the Secondary Controller List count)."""
        if not 1 <= vfn <= len(self.vfs):
            raise IndexError(f"VF number {vfn} outside 1..{len(self.vfs)}")
        return self.vfs[vfn - 1]

    def secondary(self, vfn: int) -> SecondaryController:
        """The secondary controller behind VF number `vfn` (for device-side inspection)."""
        if not 1 <= vfn <= len(self.secondaries):
            raise IndexError(f"VF number {vfn} outside 1..{len(self.secondaries)}")
        return self.secondaries[vfn - 1]

    def power_off(self) -> None:
        self.subsystem.close()
