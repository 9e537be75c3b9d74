"""Pre-copy's sender and receiver over real stream sessions (no socket): two nodes, the PF copy path at each
end, LBA_RANGES frames (stream version 2) and LBA_DATA frames (version 1), and what the receiver refuses."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest

from nvme_lm.hypervisor.node import Node, VfRequirements, VfSlot
from nvme_lm.hypervisor.precopy import PrecopyReceiver, PrecopySender
from nvme_lm.hypervisor.stream import (
    DestinationSession,
    LbaData,
    LbaRanges,
    Message,
    MsgType,
    SourceSession,
    control,
)
from nvme_lm.vm.memory import GuestMemory

MIB = 1 << 20
LBA = 4096
REQ = VfRequirements(capacity_bytes=16 * MIB, lba_size=LBA, nvq=2, nvi=2)
NLB = REQ.capacity_bytes // LBA


@pytest.fixture
def nodes(tmp_path) -> Iterator[tuple[Node, VfSlot, Node, VfSlot]]:
    a = Node("a", tmp_path / "a", "vendor-a", host_mem_bytes=32 * MIB)
    b = Node("b", tmp_path / "b", "vendor-b", host_mem_bytes=32 * MIB)
    try:
        yield a, a.provision(REQ), b, b.provision(REQ)
    finally:
        a.close()
        b.close()


def contents(node: Node, slot: VfSlot) -> bytes:
    out = node.host_buffer(REQ.capacity_bytes)
    try:
        node.read_lbas(slot.nsid, [(0, NLB)], out)
        return bytes(out)
    finally:
        node.free_host_buffer(out)


def fill(node: Node, slot: VfSlot, ranges: list[tuple[int, int]], seed: int = 1) -> None:
    """Random non-zero data in `ranges`."""
    total = sum(n for _, n in ranges) * LBA
    buf = node.host_buffer(total)
    try:
        buf[:] = np.random.default_rng(seed).integers(1, 256, total, dtype=np.uint8).tobytes()
        node.write_ranges(slot.nsid, ranges, buf)
    finally:
        node.free_host_buffer(buf)


def migrate(a: Node, sa: VfSlot, b: Node, sb: VfSlot, ranges: list[tuple[int, int]],
            version: int) -> Counter[MsgType]:
    """Pass 0 of `ranges` from a to b through a source and a destination session; returns the frame types."""
    src, dst = SourceSession(version=version), DestinationSession()
    dst.receive_data(b"".join(bytes(f) for f in src.send(control(MsgType.HELLO, vm={}))))
    src.receive_data(b"".join(bytes(f) for f in dst.send(control(MsgType.ACCEPT))))
    mem = GuestMemory(1 * MIB, base=0x1000_0000)
    receiver = PrecopyReceiver(b, sb, mem)
    seen: Counter[MsgType] = Counter()

    async def run() -> None:
        async def send(msg: Message) -> None:
            for m in dst.receive_data(b"".join(bytes(f) for f in src.send(msg))):
                seen[m.type] += 1
                await receiver.apply(m)

        sender = PrecopySender(send, a, sa, mem, stream_version=version)
        try:
            await sender.send_lbas(ranges)
            await receiver.flush()
        finally:
            sender.close()
            receiver.close()

    asyncio.run(run())
    return seen


@pytest.mark.parametrize("version", [2, 1])
def test_scattered_blocks_arrive_intact_in_few_frames(nodes, version):
    a, sa, b, sb = nodes
    rng = np.random.default_rng(7)
    blocks = np.sort(rng.choice(NLB // 2, 600, replace=False) * 2)  # scattered single blocks, never adjacent
    ranges = [(int(x), 1) for x in blocks] + [(NLB - 600, 520)]  # and a contiguous run of 2 MiB + 32 KiB
    fill(a, sa, ranges)
    zero = [(NLB - 40, 8)]  # allocated but all zeroes: goes as a deallocation
    buf = a.host_buffer(8 * LBA)
    buf[:] = bytes(8 * LBA)
    a.write_ranges(sa.nsid, zero, buf)
    a.free_host_buffer(buf)
    seen = migrate(a, sa, b, sb, ranges + zero, version)
    assert contents(b, sb) == contents(a, sa)
    data_bytes = (600 + 520) * LBA
    if version == 2:  # ~1 MiB per frame, whatever the ranges' sizes
        assert seen[MsgType.LBA_RANGES] <= data_bytes // MIB + 2 and seen[MsgType.LBA_DATA] == 0
    else:  # one frame per piece
        assert seen[MsgType.LBA_DATA] >= 600 and seen[MsgType.LBA_RANGES] == 0
    assert seen[MsgType.LBA_DEALLOCATE] == 1
    assert (NLB - 40, 8) not in b.allocated_ranges(sb)


def test_the_receiver_refuses_a_bad_frame_before_writing_any_of_it(nodes):
    _a, _sa, b, sb = nodes
    mem = GuestMemory(1 * MIB, base=0x1000_0000)
    receiver = PrecopyReceiver(b, sb, mem)
    good = LbaRanges(sb.ensid, [(0, 1), (10, 2)], data=memoryview(b"\x11" * 3 * LBA))

    async def run() -> list[str]:
        errors = []
        await receiver.apply(Message.of(good))
        for bad in (
            LbaRanges(sb.ensid, [(20, 1), (NLB - 1, 2)], data=memoryview(b"\x22" * 3 * LBA)),  # ends past the end
            LbaRanges(sb.ensid + 1, [(30, 1)], data=memoryview(b"\x22" * LBA)),  # another namespace
            LbaRanges(sb.ensid, [(40, 8)], data=memoryview(b"\x22" * LBA)),  # 512-byte blocks for a 4 KiB one
            LbaData(sb.ensid, NLB, 1, b"\x22" * LBA),
        ):
            with pytest.raises(ValueError) as info:
                await receiver.apply(Message.of(bad))
            errors.append(str(info.value))
        await receiver.flush()
        receiver.close()
        return errors

    errors = asyncio.run(run())
    assert errors[0] == f"LBA range {NLB - 1}+2 outside the namespace ({NLB} blocks)"
    assert errors[1] == f"data for namespace {sb.ensid + 1}, the VM has {sb.ensid}"
    assert errors[2] == "LBA data of 512-byte blocks for a 4096-byte namespace"
    assert errors[3] == f"LBA range {NLB}+1 outside the namespace ({NLB} blocks)"
    assert b.allocated_ranges(sb) == [(0, 1), (10, 2)]  # the good frame only: nothing of the bad ones
    data = contents(b, sb)
    assert data[: LBA] == b"\x11" * LBA and data[10 * LBA : 12 * LBA] == b"\x11" * 2 * LBA


def test_a_failed_write_surfaces_at_the_next_flush_and_close_waits_for_the_write(nodes):
    _a, _sa, b, sb = nodes
    mem = GuestMemory(1 * MIB, base=0x1000_0000)
    receiver = PrecopyReceiver(b, sb, mem)

    def refuse(nsid, ranges, data):
        raise RuntimeError("PF write refused")

    b.write_ranges = refuse  # type: ignore[method-assign]

    async def run() -> None:
        await receiver.apply(Message.of(LbaRanges(sb.ensid, [(0, 1)], data=memoryview(bytes(LBA)))))
        with pytest.raises(RuntimeError, match="PF write refused"):
            await receiver.flush()
        receiver.close()

    asyncio.run(run())
    assert receiver._buffers == []  # given back
