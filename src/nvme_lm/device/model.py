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
    max_io_queues: int = 64
    msix_vectors: int = 65
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
    extra: dict[str, Any] = field(default_factory=dict)

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
