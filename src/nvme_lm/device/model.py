"""A device personality as data: identity strings, limits and speeds of one SSD model.

Issue 3 loads these from `models/*.toml`; the defaults describe a small, generic data-centre
SSD so that a subsystem can be built with no configuration at all.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any

# Integer fields and the ranges their wire fields (or the emulator) can hold, with why.
_INT_RANGES: dict[str, tuple[int, int, str]] = {
    "vendor_id": (0, 0xFFFF, "a PCI ID is 16 bits"),
    "device_id": (0, 0xFFFF, "a PCI ID is 16 bits"),
    "subsystem_vendor_id": (0, 0xFFFF, "a PCI ID is 16 bits"),
    "subsystem_id": (0, 0xFFFF, "a PCI ID is 16 bits"),
    "ieee_oui": (0, 0xFFFFFF, "an OUI is 24 bits"),
    "capacity_bytes": (1, (1 << 64) - 1, "TNVMCAP"),
    "mdts": (0, 15, "MDTS is a power of two of CAP.MPSMIN pages; 2^15 x 4 KiB = 128 MiB is the most we move"),
    "max_queue_entries": (2, 0x10000, "CAP.MQES is 16 bits, 0's based, and a queue needs 2 entries"),
    "max_io_queues": (1, 0xFFFF, "Number of Queues is 16 bits"),
    "msix_vectors": (1, 2048, "an MSI-X table holds at most 2048 vectors"),
    "max_namespaces": (1, 0xFFFFFFFE, "NN"),
    "doorbell_stride": (0, 15, "CAP.DSTRD is 4 bits"),
    "aerl": (0, 255, "AERL is 8 bits"),
    "acl": (0, 255, "ACL is 8 bits"),
    "error_log_entries": (1, 256, "ELPE is 8 bits, 0's based"),
    "keep_alive_granularity_ms": (0, 0xFFFF * 100, "KAS is 16 bits of 100 ms"),
    "timeout_500ms": (1, 255, "CAP.TO is 8 bits"),
    "max_vfs": (0, 127, "secondary controllers are CNTLID 1..max_vfs and one Secondary Controller List page holds 127"),
    "vq_flexible": (0, 0xFFFFFFFF, "VQFRT is 32 bits"),
    "vi_flexible": (0, 0xFFFFFFFF, "VIFRT is 32 bits"),
    "vq_max_per_vf": (0, 0xFFFF, "VQFRSM is 16 bits"),
    "vi_max_per_vf": (0, 2048, "a VF's MSI-X table holds at most 2048 vectors"),
    "vq_granularity": (1, 0xFFFF, "VQGRAN is 16 bits and at least 1"),
    "vi_granularity": (1, 0xFFFF, "VIGRAN is 16 bits and at least 1"),
}
_STR_LENGTHS = {"model_number": 40, "firmware_revision": 8, "serial_prefix": 8}  # MN, FR; SN = prefix + 12 hex
_NON_NEGATIVE = ("read_latency_us", "write_latency_us", "bandwidth_mib_s", "power_state_watts", "rated_iops")


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
    # Rate limiting (TP4176, docs/rate-limiting.md): the rated IOPS a soft limit's "contended" test
    # measures the load against; 0 = bandwidth_mib_s in 4 KiB commands (both 0: an unrated device).
    rated_iops: float = 0.0
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

    def __post_init__(self) -> None:
        """Refuses values the wire fields cannot carry or the emulator cannot honour, naming the key,
        so a bad model file fails when it is loaded, not as an odd Identify or a hang later."""
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"device model {self.name!r}: {key} = {getattr(self, key)!r}: {why}")

        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"device model name must be a non-empty string, got {self.name!r}")
        for key, (lo, hi, why) in _INT_RANGES.items():
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool):
                raise bad(key, "must be an integer")
            if not lo <= v <= hi:
                raise bad(key, f"must be in {lo}..{hi} ({why})")
        for key, n in _STR_LENGTHS.items():
            v = getattr(self, key)
            if not isinstance(v, str) or not v.isascii() or len(v) > n:
                raise bad(key, f"must be an ASCII string of at most {n} characters")
        for key in _NON_NEGATIVE:
            v = getattr(self, key)
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise bad(key, "must be a number")
            if not math.isfinite(v) or v < 0:
                raise bad(key, "must be a finite number >= 0 (0 = no delay / no limit)")
        sizes = self.lba_data_sizes
        if (not sizes or len(sizes) > 16
                or any(not isinstance(x, int) or x < 512 or x > 65536 or x & (x - 1) for x in sizes)):
            raise bad("lba_data_sizes", "must list 1..16 powers of two from 512 to 65536")
        if len(set(sizes)) != len(sizes):
            raise bad("lba_data_sizes", "must not repeat a size")

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

    @staticmethod
    def builtin_names() -> list[str]:
        """The models shipped as `models/*.toml`."""
        folder = resources.files("nvme_lm.device").joinpath("models")
        return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))

    @classmethod
    def builtin(cls, name: str) -> DeviceModel:
        names = cls.builtin_names()
        if name not in names:
            raise ValueError(f"no built-in device model named {name!r} (built-in: {', '.join(names)})")
        path = resources.files("nvme_lm.device").joinpath("models", f"{name}.toml")
        return cls.from_toml(path.read_text())
