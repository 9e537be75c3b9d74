"""An emulated SSD as a piece of hardware: an NVM subsystem plus the PCIe function(s) in
front of its controller(s). Whoever installs the hardware (the host node) builds one of these
and hands out only its functions."""

from __future__ import annotations

from pathlib import Path

from nvme_lm.device.controller import Controller
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.subsystem import NvmSubsystem
from nvme_lm.pcie.function import PcieFunction, PcieIds


class EmulatedSsd:
    def __init__(self, data_dir: Path | str, model: DeviceModel | None = None) -> None:
        self.subsystem = NvmSubsystem(data_dir, model)
        m = self.subsystem.model
        ids = PcieIds(m.vendor_id, m.device_id, m.subsystem_vendor_id, m.subsystem_id)
        self.pf = PcieFunction(ids, msix_vectors=m.msix_vectors, name="pf0")
        self.primary = Controller(self.subsystem, 0, self.pf)

    @property
    def model(self) -> DeviceModel:
        return self.subsystem.model

    def power_off(self) -> None:
        self.subsystem.close()
