"""`nvme-lm bench lba-status`: TP4165 Get LBA Status over a huge sparse namespace, against SEEK_DATA/SEEK_HOLE.

Setup: a device whose model has room for the namespace (default 4 TiB of 512-byte blocks), created
through Namespace Management on the PF. While the device is off, `--extents` extents of 4 KiB to
`--max-extent-kib` (4 KiB aligned, one in each equal slice of the namespace at a random place, never
touching each other) are written straight into the namespace file, as if the data had been there all
along; the device is then powered on again, so its allocation map is rebuilt from the file
(`map_build_seconds`, the cost of opening a namespace).

Measured (`seconds`): `host.lba_status.allocated_ranges` on the PF driver over the whole namespace:
Get LBA Status ATYPE 02h commands with `--buffer-kib` buffers, paged with CMPC, parsed and coalesced.
Baseline (`baseline_seconds`): the same scan done directly on the file with `os.lseek` SEEK_DATA /
SEEK_HOLE. `match` says both found the same byte ranges (the extents are unit aligned, so they must).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from nvme_lm.device.namespace import file_extents

KIB = 1 << 10
GIB = 1 << 30


def seek_scan(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of every data extent, by SEEK_DATA/SEEK_HOLE: the baseline."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(file_extents(fd))
    finally:
        os.close(fd)


def _write_extents(path: Path, size: int, count: int, max_bytes: int, seed: int) -> int:
    """One extent per slice of the file, at a random 4 KiB-aligned place inside it; returns the bytes written."""
    import numpy as np

    slot = (size // count) & ~(4 * KIB - 1)
    if slot < max_bytes + 8 * KIB:
        raise click.UsageError(f"{count} extents of up to {max_bytes // KIB} KiB do not fit apart in {size} bytes")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_bytes // (4 * KIB) + 1, size=count) * 4 * KIB
    room = (slot - lengths - 4 * KIB) // (4 * KIB)  # keep a gap before the next slice
    offsets = np.arange(count, dtype=np.int64) * slot + rng.integers(0, room + 1) * 4 * KIB
    pattern = memoryview(bytes(range(1, 256)) * (max_bytes // 255 + 1))
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, n in zip(offsets.tolist(), lengths.tolist(), strict=True):
            os.pwrite(fd, pattern[:n], off)
    finally:
        os.close(fd)
    return int(lengths.sum())


def run_lba_status_bench(*, capacity_gib: int = 4096, extents: int = 10_000, max_extent_kib: int = 124,
                         lba_size: int = 512, buffer_kib: int = 64, data_dir: str | None = None,
                         seed: int = 1) -> dict[str, Any]:
    from nvme_lm.device.allocation import AllocationMap
    from nvme_lm.device.model import DeviceModel
    from nvme_lm.device.ssd import EmulatedSsd
    from nvme_lm.host.driver import NvmeDriver
    from nvme_lm.host.lba_status import allocated_ranges
    from nvme_lm.spec.lba_status import max_descriptors
    from nvme_lm.vm.memory import GuestMemory

    capacity = capacity_gib * GIB
    model = DeviceModel(capacity_bytes=capacity)
    lba_index = model.lba_data_sizes.index(lba_size)
    tmp = None if data_dir else tempfile.mkdtemp(prefix="nvme-lm-lba-")
    root = Path(data_dir or tmp) / "ssd"
    buffer_bytes = buffer_kib * KIB

    def power_on() -> tuple[EmulatedSsd, NvmeDriver]:
        dev = EmulatedSsd(root, model)
        mem = GuestMemory((-(-buffer_kib // 4) * 4 + 4096) * KIB)  # whole pages: the buffer + 4 MiB for queues
        dev.pf.iommu.map(mem.base, mem.buf)
        drv = NvmeDriver(dev.pf, mem, timeout=60.0)
        drv.start()
        return dev, drv

    try:
        dev, drv = power_on()
        try:
            nsid = drv.create_namespace(capacity // lba_size, lba_index)
            path = dev.subsystem.namespaces[nsid].path
            drv.shutdown()
        finally:
            dev.power_off()
        written = _write_extents(path, capacity, extents, max_extent_kib * KIB, seed)

        dev, drv = power_on()
        try:
            ns = dev.subsystem.namespaces[nsid]
            t = time.perf_counter()
            amap = AllocationMap.for_namespace(ns)  # what opening the namespace did, timed on its own
            build = time.perf_counter() - t
            t = time.perf_counter()
            ranges = allocated_ranges(drv, nsid, buffer_bytes=buffer_bytes)
            seconds = time.perf_counter() - t
            t = time.perf_counter()
            baseline = seek_scan(path)
            baseline_seconds = time.perf_counter() - t
            shift = ns.lba_shift
            got = [(s << shift, n << shift) for s, n in ranges]
            per = max(1, max_descriptors(buffer_bytes))
            result = {
                "capacity_bytes": capacity,
                "lba_size": lba_size,
                "tlbaag": ns.alloc.tlbaag,
                "extents_written": extents,
                "bytes_written": written,
                "allocated_bytes": sum(n for _, n in got),
                "ranges": len(ranges),
                "seconds": seconds,
                "baseline_seconds": baseline_seconds,
                "baseline_ranges": len(baseline),
                "baseline_allocated_bytes": sum(n for _, n in baseline),
                "ratio": seconds / baseline_seconds if baseline_seconds else None,
                "match": got == baseline,
                "commands": -(-len(ranges) // per) if ranges else 1,
                "buffer_bytes": buffer_bytes,
                "map_build_seconds": build,
                "map_bytes": amap.memory_bytes(),
                "baseline": "os.lseek SEEK_DATA/SEEK_HOLE over the namespace file, same process",
            }
            drv.shutdown()
        finally:
            dev.power_off()
        return result
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    r = result
    t = Table(title=f"Get LBA Status (ATYPE 02h) over {r['capacity_bytes'] / (1 << 40):.2f} TiB, "
                    f"{r['lba_size']} B LBAs, TLBAAG {r['tlbaag']}", title_justify="left")
    for col in ("scan", "ranges", "allocated", "seconds", "commands"):
        t.add_column(col, justify="left" if col == "scan" else "right")
    t.add_row("Get LBA Status via PF driver", f"{r['ranges']:,}", f"{r['allocated_bytes'] / (1 << 20):,.1f} MiB",
              f"{r['seconds']:.4f}", f"{r['commands']:,}")
    t.add_row("SEEK_DATA/SEEK_HOLE on the file", f"{r['baseline_ranges']:,}",
              f"{r['baseline_allocated_bytes'] / (1 << 20):,.1f} MiB", f"{r['baseline_seconds']:.4f}", "-")
    console = Console()
    console.print(t)
    style = "green" if r["match"] else "bold red"
    console.print(f"[{style}]match: {r['match']}[/{style}]   ratio {r['ratio']:.2f}x   map rebuilt from the file in "
                  f"{r['map_build_seconds']:.3f} s, {r['map_bytes'] / KIB:,.0f} KiB")


@click.command("lba-status")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--capacity-gib", type=click.IntRange(1), default=4096, show_default=True, help="Namespace size.")
@click.option("--extents", type=click.IntRange(1), default=10_000, show_default=True, help="Extents written.")
@click.option("--max-extent-kib", type=click.IntRange(4), default=124, show_default=True,
              help="Largest extent (sizes are random multiples of 4 KiB).")
@click.option("--lba-size", type=click.Choice(["512", "4096"]), default="512", show_default=True)
@click.option("--buffer-kib", type=click.IntRange(1, 512), default=64, show_default=True,
              help="Get LBA Status buffer per command (MNDW).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the SSD's files here (default: a temporary directory, removed afterwards).")
@click.option("--seed", type=int, default=1, show_default=True)
def lba_status_command(as_json: bool, capacity_gib: int, extents: int, max_extent_kib: int, lba_size: str,
                       buffer_kib: int, data_dir: str | None, seed: int) -> None:
    """Get LBA Status over a sparse namespace with scattered allocation, against SEEK_DATA/SEEK_HOLE."""
    result = run_lba_status_bench(capacity_gib=capacity_gib, extents=extents, max_extent_kib=max_extent_kib,
                                  lba_size=int(lba_size), buffer_kib=buffer_kib, data_dir=data_dir, seed=seed)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        render(result)
    if not result["match"]:
        raise SystemExit(1)
