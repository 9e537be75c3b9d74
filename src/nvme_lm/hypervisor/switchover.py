"""The blackout: the steps between pausing the VM at the source and its vCPUs running at the destination.

Source (`capture`): vCPUs paused at their gates, Migration Send Suspend on the VF (commands already
fetched complete; unfetched ones stay in the SQ, in guest RAM), the last LBA and RAM deltas, tracking
stopped, Migration Receive of the controller state, and the VM's own state. Destination (`prepare`,
then `resume` once the source committed): Set Controller State into the suspended VF, the VM rebuilt
over the copied RAM, PCI state restored, Migration Send Resume, vCPUs run. The VF then fetches the
commands left in the SQs, so each runs exactly once, here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import crc32c
import numpy as np

from nvme_lm.host import migration as hm
from nvme_lm.hypervisor.node import Node, VfSlot
from nvme_lm.hypervisor.precopy import ChangeTracker, PassRecord, PrecopySender, merge_ranges
from nvme_lm.hypervisor.rollback import SourceRollback
from nvme_lm.spec.controller_state import NvmeState
from nvme_lm.vm.machine import Vm
from nvme_lm.vm.memory import GuestMemory


class Laps:
    """Named durations of the blackout's steps (ms), for the report: where the pause goes."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._t = time.monotonic_ns()

    def lap(self, name: str) -> None:
        now = time.monotonic_ns()
        self.ms[name] = self.ms.get(name, 0.0) + (now - self._t) / 1e6
        self._t = now


@dataclass
class Captured:
    controller_state: bytes
    vm_state: bytes
    t_pause_ns: int
    unfetched: int  # commands in the VF's SQs that the source never fetched
    ram_crc: int | None
    lba_digest: list[int] | None
    final: PassRecord
    tracking_problems: list[str]
    laps: dict[str, float]


def unfetched_commands(controller_state: bytes) -> int:
    """Entries between SQ head and tail in every I/O submission queue of a captured controller."""
    _, nvme = hm.parse_state(controller_state)
    if not isinstance(nvme, NvmeState):
        return 0
    return sum((s.tail - s.head) % (s.qsize + 1) for s in nvme.sqs)


def ram_checksum(mem: GuestMemory) -> int:
    return crc32c.crc32c(mem.buf)


DIGEST_BATCH = 8 << 20


def namespace_digest(node: Node, slot: VfSlot) -> list[int]:
    """CRC32C of every 8 MiB of the VF's namespace, read through the PF (a test-time check that both ends
    hold the same bytes at switchover; it reads the whole namespace, so it is off by default)."""
    out = []
    buf = node.host_buffer(DIGEST_BATCH)
    try:
        per = DIGEST_BATCH // slot.lba_size
        for slba in range(0, slot.nlb, per):
            n = min(per, slot.nlb - slba)
            view = buf[: n * slot.lba_size]
            node.read_lbas(slot.nsid, [(slba, n)], view)
            out.append(crc32c.crc32c(view))
    finally:
        node.free_host_buffer(buf)
    return out


async def capture(rb: SourceRollback, tracker: ChangeTracker, sender: PrecopySender, pass_no: int,
                  pending_ranges: list[tuple[int, int]], pending_pages: np.ndarray, *,
                  verify_ram: bool, verify_lbas: bool,
                  after_suspend: Callable[[], Awaitable[None]] | None = None) -> Captured:
    """Source side of the blackout, up to (not including) sending the state. `pending_*` is what the
    last pass found changed and has not sent yet."""
    node, slot, vm = rb.node, rb.slot, rb.vm
    t_pause = await asyncio.to_thread(vm.pause)
    laps = Laps()
    rb.paused = True
    rec = PassRecord(pass_no, "final", t_pause)
    await asyncio.to_thread(hm.suspend_controller, node.pf, slot.cntlid)
    rb.suspended = True
    laps.lap("suspend")
    if after_suspend is not None:
        await after_suspend()
    ranges, overflow, _ = await asyncio.to_thread(tracker.lba_changes)
    if overflow:  # the UDMQ filled up at the very end: everything that may hold data goes again
        ranges = await asyncio.to_thread(node.allocated_ranges, slot)
    ranges = merge_ranges(ranges + pending_ranges)
    pages, _ = await asyncio.to_thread(tracker.ram_changes)
    pages = np.union1d(pages, pending_pages)
    laps.lap("last changes")
    rec.lba_bytes = await sender.send_lbas(ranges)
    laps.lap("send LBAs")
    rec.ram_bytes = await sender.send_pages(pages, paused=True)
    laps.lap("send RAM")
    problems = await asyncio.to_thread(tracker.stop)
    rb.tracker = None
    laps.lap("stop tracking")
    state, _csup = await asyncio.to_thread(hm.read_state, node.pf, slot.cntlid)
    laps.lap("controller state")
    vm_state = vm.state()
    laps.lap("VM state")
    crc = ram_checksum(vm.mem) if verify_ram else None
    digest = await asyncio.to_thread(namespace_digest, node, slot) if verify_lbas else None
    laps.lap("verify digests")
    rec.finish(0)
    return Captured(state, vm_state, t_pause, unfetched_commands(state), crc, digest, rec, problems, laps.ms)


def prepare(node: Node, slot: VfSlot, mem: GuestMemory, controller_state: bytes, vm_state: bytes,
            ram_crc: int | None = None, lba_digest: list[int] | None = None) -> tuple[Vm, dict[str, float]]:
    """Destination: everything but the resume; returns the VM and the steps' durations. Blocking (PF
    admin commands): run in a worker thread."""
    laps = Laps()
    if ram_crc is not None and ram_checksum(mem) != ram_crc:
        raise ValueError("guest RAM checksum differs from the source's after the final delta")
    if lba_digest is not None:
        mine = namespace_digest(node, slot)
        bad = [i for i, (a, b) in enumerate(zip(mine, lba_digest, strict=False)) if a != b]
        if bad or len(mine) != len(lba_digest):
            raise ValueError(f"namespace differs from the source's at switchover in 8 MiB pieces {bad[:10]}")
    laps.lap("destination verify digests")
    node.restore_pci(slot)  # bus mastering first: Set Controller State checks the queues' memory by DMA
    hm.write_state(node.pf, slot.cntlid, controller_state)
    laps.lap("set controller state")
    vm = Vm.restore(vm_state, mem, slot.fn)
    laps.lap("VM restore")
    return vm, laps.ms


def resume(node: Node, slot: VfSlot, vm: Vm) -> tuple[int, dict[str, float]]:
    """Destination, after the source committed: the VF and then the vCPUs run. Returns the resume time."""
    laps = Laps()
    hm.resume_controller(node.pf, slot.cntlid)
    laps.lap("resume VF")
    t_resume = time.monotonic_ns()  # the vCPUs run from here (their threads start now)
    vm.start()
    laps.lap("start vCPUs")
    return t_resume, laps.ms
