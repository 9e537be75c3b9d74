"""A PCIe function: configuration space IDs, the BAR0 register window, DMA, MSI-X and FLR.

This is the only door between a device and a host. Hosts read and write BAR0, program
MSI-X and set Bus Master Enable; the device behind it implements `RegisterWindow`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from nvme_lm.pcie.iommu import DmaFault, Iommu
from nvme_lm.pcie.msix import MsixTable

CLASS_NVME = 0x010802  # mass storage, non-volatile memory, NVM Express
CMD_MEMORY_SPACE = 1 << 1
CMD_BUS_MASTER = 1 << 2


class RegisterWindow(Protocol):
    """What a device exposes through BAR0."""

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...

    def function_level_reset(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PcieIds:
    vendor_id: int
    device_id: int
    subsystem_vendor_id: int
    subsystem_id: int
    revision: int = 0
    class_code: int = CLASS_NVME


class Bar0:
    """Register accesses of 4 or 8 bytes, naturally aligned, as a CPU would issue them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.device: RegisterWindow | None = None

    def _check(self, offset: int, size: int) -> None:
        if size not in (4, 8) or offset % size or offset < 0 or offset + size > self.size:
            raise ValueError(f"BAR0 access of {size} bytes at {offset:#x} is not a valid register access")

    def read32(self, offset: int) -> int:
        self._check(offset, 4)
        return self.device.mmio_read(offset, 4) if self.device else 0xFFFFFFFF

    def read64(self, offset: int) -> int:
        self._check(offset, 8)
        return self.device.mmio_read(offset, 8) if self.device else (1 << 64) - 1

    def write32(self, offset: int, value: int) -> None:
        self._check(offset, 4)
        if self.device:
            self.device.mmio_write(offset, 4, value & 0xFFFFFFFF)

    def write64(self, offset: int, value: int) -> None:
        self._check(offset, 8)
        if self.device:
            self.device.mmio_write(offset, 8, value & 0xFFFFFFFFFFFFFFFF)


class PcieFunction:
    """One physical or virtual function: IDs, config space, BAR0, IOMMU domain, MSI-X."""

    def __init__(self, ids: PcieIds, *, msix_vectors: int, bar0_size: int = 0x4000,
                 is_virtual: bool = False, name: str = "") -> None:
        self.ids = ids
        self.is_virtual = is_virtual
        self.name = name
        self.bar0 = Bar0(bar0_size)
        self.iommu = Iommu()
        self.msix = MsixTable(msix_vectors)
        self.command = 0
        self.flr_count = 0
        self.virtfns: list[PcieFunction] = []  # a PF's SR-IOV VFs, VF number n at [n - 1]

    def attach(self, device: RegisterWindow) -> None:
        """Installs the device behind this function (done once, by whoever builds the hardware)."""
        self.bar0.device = device

    # --- configuration space -------------------------------------------------------------
    def config_read(self, offset: int, size: int = 4) -> int:
        """Reads the standard type-0 header fields that hosts look at."""
        space = self._config_space()
        if size not in (1, 2, 4) or not 0 <= offset <= len(space) - size:
            raise ValueError(f"config read of {size} bytes at {offset:#x} is out of range")
        return int.from_bytes(space[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0x04 and size in (2, 4):
            old, self.command = self.command, value & 0x0406
            if (old ^ self.command) & CMD_BUS_MASTER:
                self.iommu.invalidate()  # cached queue views must not outlive bus mastering
        # other writable fields (BARs, latency timer...) are not modelled

    def _config_space(self) -> bytes:
        vid = 0xFFFF if self.is_virtual else self.ids.vendor_id  # VFs read VID/DID as FFFFh
        did = 0xFFFF if self.is_virtual else self.ids.device_id
        hdr = bytearray(64)
        struct.pack_into("<HHHH", hdr, 0, vid, did, self.command, 0x0010)
        hdr[8] = self.ids.revision
        hdr[9:12] = self.ids.class_code.to_bytes(3, "little")
        struct.pack_into("<HH", hdr, 0x2C, self.ids.subsystem_vendor_id, self.ids.subsystem_id)
        return bytes(hdr)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & CMD_BUS_MASTER)

    def enable(self) -> None:
        """What a host driver does first: memory space and bus mastering on, MSI-X enabled."""
        self.config_write(0x04, 2, CMD_MEMORY_SPACE | CMD_BUS_MASTER)
        self.msix.enable(True)

    # --- DMA --------------------------------------------------------------------------------
    def dma_view(self, iova: int, length: int, write: bool = False) -> memoryview:
        if not self.bus_master:
            raise DmaFault(iova, length, write, "bus mastering disabled")
        return self.iommu.view(iova, length, write)

    # --- reset ------------------------------------------------------------------------------
    def flr(self) -> None:
        """Function Level Reset: the device resets, the function loses bus mastering and MSI-X."""
        self.flr_count += 1
        self.command = 0
        self.iommu.invalidate()
        self.msix.reset()
        if self.bar0.device:
            self.bar0.device.function_level_reset()
