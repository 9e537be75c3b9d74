"""A device personality as data: identity strings, limits and speeds of one SSD model.

Issue 3 loads these from `models/*.toml`; the defaults describe a small, generic data-centre
SSD so that a subsystem can be built with no configuration at all.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class DeviceModel:
    name: str = "nvme-lm-generic"
    vendor_id: int = 0x1B36
    device_id: int = 0x0010
    subsystem_vendor_id: int = 0x1AF4
    subsystem_id: int = 0x1100
    ieee_oui: int = 0x525400
    model_number: str = "nvme-lm emulated SSD"
    firmware_revision: str = "1.0"
    serial_prefix: str = "NVMELM"
    capacity_bytes: int = 64 << 30
    mdts: int = 7  # 2^7 * 4 KiB = 512 KiB per command
    max_queue_entries: int = 1024  # CAP.MQES + 1
    max_io_queues: int = 64  # the primary controller's private I/O queues (VQPRT - 1)
    msix_vectors: int = 65  # the primary controller's private MSI-X vectors (VIPRT)
    max_namespaces: int = 256
    lba_data_sizes: tuple[int, ...] = (512, 4096)
    doorbell_stride: int = 0
    aerl: int = 3  # 0's based: 4 outstanding AERs
    acl: int = 3  # 0's based: 4 outstanding Aborts
    error_log_entries: int = 64
    keep_alive_granularity_ms: int = 100
    timeout_500ms: int = 20
    power_state_watts: float = 25.0
    # speed characteristics applied by the emulator (0 = as fast as the host allows)
    read_latency_us: float = 0.0
    write_latency_us: float = 0.0
    bandwidth_mib_s: float = 0.0
    # SR-IOV, NVMe Base §8.2.6 (docs/sriov.md). max_vfs = 0: a single controller, no Virtualization
    # Management. Flexible VQ/VI pools are shared by the primary (after its next FLR) and the VFs.
    max_vfs: int = 0  # secondary controllers, CNTLID 1..max_vfs, one per VF
    vq_flexible: int = 0  # VQFRT: flexible queue resources (one VQ = one SQ/CQ pair)
    vi_flexible: int = 0  # VIFRT: flexible interrupt resources (one VI = one MSI-X vector)
    vq_max_per_vf: int = 0  # VQFRSM: most VQs one VF may hold (its admin queue included)
    vi_max_per_vf: int = 0  # VIFRSM: most VIs one VF may hold (also the VF's MSI-X table capacity)
    vq_granularity: int = 1  # VQGRAN: VQ assignments are multiples of this
    vi_granularity: int = 1  # VIGRAN
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def vq_private(self) -> int:
        """VQPRT: the primary's private queue resources, its admin queue pair included."""
        return self.max_io_queues + 1

    @property
    def vi_private(self) -> int:
        """VIPRT: the primary's private interrupt resources (vector 0 among them)."""
        return self.msix_vectors

    @classmethod
    def from_toml(cls, text: str) -> DeviceModel:
        data = tomllib.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown device model keys: {', '.join(sorted(unknown))}")
        if "lba_data_sizes" in data:
            data["lba_data_sizes"] = tuple(data["lba_data_sizes"])
        return cls(**data)

    @classmethod
    def builtin(cls, name: str) -> DeviceModel:
        path = resources.files("nvme_lm.device").joinpath("models", f"{name}.toml")
        if not path.is_file():
            raise ValueError(f"no built-in device model named {name!r}")
        return cls.from_toml(path.read_text())
