"""Shared setup for the TP4159 tracking tests: a PF (migration management controller) and one online VF
(migratable controller) with a namespace and an I/O queue driven by its own guest driver."""

from __future__ import annotations

from dataclasses import dataclass

from nvme_lm.device.model import DeviceModel
from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.host import commands as cmd
from nvme_lm.host import virtualization as hv
from nvme_lm.host.driver import IoQueue, NvmeDriver
from nvme_lm.spec.identify import IdentifyNamespace, encode_ctrl_list
from nvme_lm.vm.memory import GuestMemory

MODEL = DeviceModel(max_vfs=4, vq_flexible=24, vi_flexible=16, vq_max_per_vf=9, vi_max_per_vf=5, max_io_queues=4,
                    msix_vectors=5)
GUEST_MB = 4 << 20
GUEST_BASE = 0x10_0000
LBA = 512


@dataclass
class Lm:
    dev: EmulatedSsd
    pf: NvmeDriver
    guest: NvmeDriver
    q: IoQueue
    vf_cntlid: int
    nsid: int


def driver_on(fn, base: int = 0x10_0000) -> NvmeDriver:
    mem = GuestMemory(GUEST_MB, base=base)
    fn.iommu.map(mem.base, mem.buf)
    d = NvmeDriver(fn, mem, timeout=5.0)
    d.start()
    return d


def guest_on(fn) -> tuple[NvmeDriver, GuestMemory]:
    """A guest's driver on `fn` with its own guest memory at GUEST_BASE."""
    d = driver_on(fn, GUEST_BASE)
    return d, d.mem  # type: ignore[return-value]


def migrate_guest_ram(g: NvmeDriver, src_mem: GuestMemory, dst_fn) -> GuestMemory:
    """Guest RAM migration in miniature: copy the region (and the guest's allocator with it) into new
    memory mapped at the same IOVA behind the destination VF, and point the guest driver at it."""
    dst_mem = GuestMemory(src_mem.size, base=src_mem.base)
    dst_mem.copy_from(src_mem)
    dst_fn.iommu.map(dst_mem.base, dst_mem.buf)
    dst_fn.enable()  # the VMM restores PCI config space (bus mastering) ...
    for v in range(dst_fn.msix.nvectors):  # ... and the MSI-X table before resuming
        dst_fn.msix.mask(v, False)
    g.rebind(dst_fn, dst_mem)
    return dst_mem


def setup(tmp_path) -> Lm:
    dev = EmulatedSsd(tmp_path / "ssd", MODEL)
    pf = driver_on(dev.pf)
    e = hv.bring_up_vf(pf, 1, nvq=3, nvi=2)
    comp, _ = pf.admin(cmd.ns_create(), data=IdentifyNamespace(nsze=4096, ncap=4096, flbas=0).encode())
    nsid = comp.dw0
    pf.admin(cmd.ns_attach(nsid), data=encode_ctrl_list([e.scid]))
    g = driver_on(dev.vf(1))
    g.set_number_of_queues(2, 2)
    q = g.create_io_queue(1, 32, vector=1)
    return Lm(dev, pf, g, q, e.scid, nsid)
