"""Shared fixtures: a real emulated SSD on sparse files in a temporary directory, guest memory
mapped into its PF's IOMMU, and a started host driver."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.host.driver import NvmeDriver
from nvme_lm.vm.memory import GuestMemory


@pytest.fixture
def ssd(tmp_path) -> Iterator[EmulatedSsd]:
    dev = EmulatedSsd(tmp_path / "ssd")
    yield dev
    dev.power_off()


@pytest.fixture
def mem(ssd: EmulatedSsd) -> Iterator[GuestMemory]:
    m = GuestMemory(16 << 20)
    ssd.pf.iommu.map(m.base, m.buf)
    yield m


@pytest.fixture
def driver(ssd: EmulatedSsd, mem: GuestMemory) -> NvmeDriver:
    d = NvmeDriver(ssd.pf, mem, timeout=5.0)
    d.start()
    return d


@pytest.fixture
def ns1(ssd: EmulatedSsd):
    """A 64 MiB namespace with 512-byte blocks attached to the primary controller."""
    ns = ssd.subsystem.create_namespace(nsze=(64 << 20) // 512, lba_size=512)
    ssd.subsystem.attach(ns.nsid, ssd.primary.cntlid)
    return ns
