"""The two ends of one migration, as sequences of steps over a stream channel.

Source (`send_vm`): HELLO with the VM's spec and exported identity -> the destination accepts or
refuses before anything is copied -> tracking starts -> pass 0 (allocated LBAs, guest pages holding
data) -> delta passes until the policy says switch -> blackout (`switchover.capture`) -> SWITCHOVER
-> PREPARED -> COMMIT (the point of no return) -> COMMITTED -> teardown -> DONE.

Destination (`receive_vm`): checks and provisions a VF, applies data, prepares, and resumes the VM on
COMMIT. Before the source commits, any failure on either side leaves the VM running at the source
(`rollback.py`) and nothing on the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nvme_lm.host import migration as hm
from nvme_lm.hypervisor import switchover
from nvme_lm.hypervisor.node import Node, VfRequirements, VfSlot
from nvme_lm.hypervisor.policy import MIB, PassFigures, make_policy
from nvme_lm.hypervisor.precopy import ChangeTracker, PassRecord, PrecopyReceiver, PrecopySender
from nvme_lm.hypervisor.rollback import SourceRollback
from nvme_lm.hypervisor.stream import BULK_TYPES, STREAM_VERSION, Message, MsgType, control
from nvme_lm.hypervisor.transport import Channel
from nvme_lm.vm.machine import Vm, VmSpec
from nvme_lm.vm.memory import GuestMemory

REPLY_TIMEOUT = 30.0  # a peer that says nothing for this long is gone
SOURCE_POINTS = ("setup", "precopy", "stop-and-copy", "state-transfer", "resume")
DESTINATION_POINTS = ("setup", "precopy", "state-transfer", "resume")


class FaultHooks:
    """Where a migration can be made to fail on purpose (issue 6's fault matrix). The engine awaits
    `at(role, point)` at each phase boundary (SOURCE_POINTS / DESTINATION_POINTS); this default does
    nothing. A hook may raise (a local failure), sleep, kill the process, or tell a proxy to cut the link."""

    async def at(self, role: str, point: str) -> None:
        return None


NO_FAULTS = FaultHooks()


class MigrationFailed(RuntimeError):
    pass


@dataclass
class HostedVm:
    """A VM as its host agent keeps it: the guest, its VF and the requirements to recreate them."""

    vm: Vm
    slot: VfSlot
    spec: VmSpec
    template: str
    device_rate_iops: int = 0

    @property
    def mem(self) -> GuestMemory:
        return self.vm.mem


def requirements(spec: VmSpec, template: str, exported_state: bytes | None = None) -> VfRequirements:
    """The VF a VM needs: its namespace, its identity template, a queue pair and a vector per vCPU + admin."""
    return VfRequirements(capacity_bytes=spec.capacity_bytes, lba_size=spec.lba_size, template=template,
                          nvq=spec.queues + 1, nvi=spec.queues + 1, exported_state=exported_state)


@dataclass
class MigrationOptions:
    downtime_target_ms: float = 50.0
    max_passes: int = 8
    copy_chunk_bytes: int = 128 << 10
    verify_ram: bool = False
    verify_lbas: bool = False
    timeout_s: float = 60.0
    reply_timeout_s: float = REPLY_TIMEOUT  # silence from the peer (or a peer that reads nothing) that ends a leg
    policy: str = "predictive"  # policy.POLICIES
    throttle: bool = True  # may the predictive policy limit guest writes to converge
    give_up_s: float = 0.0  # 0: only the leg's timeout ends a migration that does not converge
    max_bandwidth_mib_s: float = 0.0  # the engine's own cap on the stream (QEMU's max-bandwidth); 0: none

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MigrationOptions:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Progress:
    """Live figures of a migration (the control API's `vm.migration`)."""

    role: str
    phase: str = "setup"
    pass_no: int = 0
    bytes_lba: int = 0
    bytes_ram: int = 0
    allocated_bytes: int = 0
    remaining_bytes: int = 0
    passes: list[PassRecord] = field(default_factory=list)
    error: str | None = None
    result: dict[str, Any] | None = None
    committed: bool = False  # past the point of no return: a cancel can no longer stop it
    write_limit_mib_s: float = 0.0  # the throttle on the guest's writes now (0: none)

    def snapshot(self, t0_ns: int) -> dict[str, Any]:
        return {"role": self.role, "phase": self.phase, "pass": self.pass_no, "bytes_lba": self.bytes_lba,
                "write_limit_mib_s": self.write_limit_mib_s,
                "bytes_ram": self.bytes_ram, "allocated_bytes": self.allocated_bytes,
                "remaining_bytes": self.remaining_bytes, "error": self.error,
                "passes": [p.to_report(t0_ns) for p in self.passes], "result": self.result}


async def _reply(ch: Channel, *want: MsgType, timeout: float = REPLY_TIMEOUT) -> Message:
    """The next control message, skipping late PASS_ACKs; ABORT/FAILED from the peer end the migration."""
    while True:
        msg = await ch.recv(timeout)
        if msg.type in want:
            return msg
        if msg.type is MsgType.PASS_ACK:
            continue
        if msg.type in (MsgType.ABORT, MsgType.FAILED):
            raise MigrationFailed(f"destination: {msg.body.get('reason')}")  # type: ignore[union-attr]
        if msg.type is MsgType.REFUSE:
            raise MigrationFailed("destination refused: " + "; ".join(msg.body["reasons"]))  # type: ignore[index]
        raise MigrationFailed(f"unexpected {msg.type.name} from the destination")


# ============================================================================================ source
async def send_vm(hosted: HostedVm, node: Node, connect: Callable[[], Awaitable[Channel]], opts: MigrationOptions,
                  progress: Progress, on_committed: Callable[[], None],
                  hooks: FaultHooks = NO_FAULTS) -> dict[str, Any]:
    """Moves `hosted` to the destination `connect()` reaches. Returns the leg's report; raises only for
    programming errors (failures are in the report, with the VM running where it should). Cancelling
    the task before the commit is a failure like any other: rolled back, reported."""
    vm, slot = hosted.vm, hosted.slot
    t_start = time.monotonic_ns()
    at_start = vm.io_counts()  # the guest's own counts, for reports: its mix before the engine throttled it
    rb = SourceRollback(node, slot, vm, qos_iops=hosted.device_rate_iops)
    policy = make_policy(opts.policy, downtime_target_ms=opts.downtime_target_ms, max_passes=opts.max_passes,
                         throttle=opts.throttle, give_up_s=opts.give_up_s)
    ch: Channel | None = None
    sender: PrecopySender | None = None
    cap: switchover.Captured | None = None
    steps: dict[str, float] = {}
    t_resume = 0
    error: str | None = None
    lba = slot.lba_size
    try:
        async with asyncio.timeout(opts.timeout_s):
            ch = await connect()
            exported = await asyncio.to_thread(node.exported_state, slot)
            await ch.send(control(MsgType.HELLO, stream_version=STREAM_VERSION, vm=hosted.spec.to_dict(),
                                  template=hosted.template, exported_state=exported,
                                  device_rate_iops=hosted.device_rate_iops))
            await _reply(ch, MsgType.ACCEPT, timeout=opts.reply_timeout_s)
            await hooks.at("source", "setup")

            progress.phase = "precopy"
            tracker = rb.tracker = ChangeTracker(node, slot, vm.mem)
            await asyncio.to_thread(tracker.start)
            sender = PrecopySender(ch.send, node, slot, vm.mem, chunk_bytes=opts.copy_chunk_bytes,
                                   max_bandwidth=opts.max_bandwidth_mib_s * MIB)

            async def one_pass(rec: PassRecord, ranges: list[tuple[int, int]], pages: np.ndarray,
                               skip_zero: bool = False) -> tuple[list[tuple[int, int]], np.ndarray]:
                progress.pass_no = rec.pass_no
                progress.passes.append(rec)
                rec.lba_bytes = await sender.send_lbas(ranges)
                progress.bytes_lba = sender.bytes_lba
                rec.ram_bytes = await sender.send_pages(pages, skip_zero=skip_zero)
                progress.bytes_ram = sender.bytes_ram
                await ch.send(control(MsgType.PASS_END, **{"pass": rec.pass_no, "kind": rec.kind}))
                await _reply(ch, MsgType.PASS_ACK, timeout=opts.reply_timeout_s)
                new_ranges, overflow, _ = await asyncio.to_thread(tracker.lba_changes)
                if overflow:
                    new_ranges = await asyncio.to_thread(node.allocated_ranges, slot)
                new_pages, _ = await asyncio.to_thread(tracker.ram_changes)
                lba_part = sum(n for _, n in new_ranges) * lba
                remaining = lba_part + len(new_pages) * vm.mem.page_size
                rec.finish(remaining, lba_part)
                progress.remaining_bytes = remaining
                return new_ranges, new_pages

            allocated = await asyncio.to_thread(node.allocated_ranges, slot)
            progress.allocated_bytes = sum(n for _, n in allocated) * lba
            all_pages = np.arange(vm.mem.npages, dtype=np.int64)
            rec = PassRecord(0, "full", time.monotonic_ns())
            ranges, pages = await one_pass(rec, allocated, all_pages, skip_zero=True)
            await hooks.at("source", "precopy")
            pass_no = 1
            limit = 0.0  # MiB/s of guest writes the throttle allows (0: unthrottled)
            read_limit = 0.0  # the same for guest reads
            while True:
                d = max(rec.duration_s, 1e-6)
                decision = policy.decide(PassFigures(
                    pass_no=rec.pass_no, remaining_bytes=rec.remaining_bytes, copy_rate=rec.copy_rate_mib_s * MIB,
                    lba_dirty_rate=rec.remaining_lba_bytes / d,
                    ram_dirty_rate=(rec.remaining_bytes - rec.remaining_lba_bytes) / d,
                    elapsed_s=(time.monotonic_ns() - t_start) / 1e9, write_limit_mib_s=limit or None,
                    remaining_ram_bytes=rec.remaining_bytes - rec.remaining_lba_bytes,
                    read_limit_mib_s=read_limit or None))
                rec.decision = decision.why
                if decision.give_up:
                    raise MigrationFailed(f"gave up: {decision.why}")
                new_w = limit if decision.write_limit_mib_s is None else decision.write_limit_mib_s
                new_r = read_limit if decision.read_limit_mib_s is None else decision.read_limit_mib_s
                if (new_w, new_r) != (limit, read_limit):
                    limit, read_limit = new_w, new_r
                    rb.throttled = True
                    await asyncio.to_thread(node.set_rate_limit, slot, hosted.device_rate_iops, write_mib_s=limit,
                                            read_mib_s=read_limit)
                    progress.write_limit_mib_s = limit
                rec = PassRecord(pass_no, "delta", time.monotonic_ns(), write_limit_mib_s=limit,
                                 read_limit_mib_s=read_limit)
                ranges, pages = await one_pass(rec, ranges, pages)
                pass_no += 1
                if decision.switch:
                    break

            progress.phase = "switchover"
            cap = await switchover.capture(rb, tracker, sender, pass_no, ranges, pages, verify_ram=opts.verify_ram,
                                           verify_lbas=opts.verify_lbas,
                                           after_suspend=lambda: hooks.at("source", "stop-and-copy"))
            progress.passes.append(cap.final)
            progress.bytes_lba, progress.bytes_ram = sender.bytes_lba, sender.bytes_ram
            steps = dict(cap.laps)
            t = time.monotonic_ns()
            await ch.send(control(MsgType.SWITCHOVER, controller_state=cap.controller_state, vm_state=cap.vm_state,
                                  t_pause_ns=cap.t_pause_ns, ram_crc=cap.ram_crc, lba_digest=cap.lba_digest))
            await hooks.at("source", "state-transfer")
            prepared = await _reply(ch, MsgType.PREPARED, timeout=opts.reply_timeout_s)
            remote = dict(prepared.body.get("laps", {}))  # type: ignore[union-attr]
            steps["destination prepare"] = (time.monotonic_ns() - t) / 1e6
            rb.committed = progress.committed = True  # the point of no return: the VM is the destination's
            t = time.monotonic_ns()
            await ch.send(control(MsgType.COMMIT))
            await hooks.at("source", "resume")
            done = await _reply(ch, MsgType.COMMITTED, timeout=opts.reply_timeout_s)
            t_resume = int(done.body["t_resume_ns"])  # type: ignore[index]
            steps["commit and resume"] = (time.monotonic_ns() - t) / 1e6
            remote.update(done.body.get("laps", {}))  # type: ignore[union-attr]
            steps.update({f"  destination: {k}": v for k, v in remote.items()})
            progress.phase = "committed"
    except (Exception, TimeoutError, asyncio.CancelledError) as e:
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if isinstance(e, asyncio.CancelledError):
            error = "cancelled"
            asyncio.current_task().uncancel()  # type: ignore[union-attr]  # handled: roll back, report
        if not rb.committed:
            progress.phase = "rolling back"
            problems = await asyncio.shield(asyncio.to_thread(rb.roll_back))
            if problems:
                error += "; rollback left: " + "; ".join(problems)
            if ch is not None:
                with contextlib.suppress(Exception):  # the peer may be gone; the VM runs here regardless
                    await ch.send(control(MsgType.ABORT, reason=error[:500]))
            progress.phase = "failed (VM running at the source)"
        else:
            progress.phase = "in doubt (VM paused at the source, committed to the destination)"
    if sender is not None:
        sender.close()
    teardown_problem = None
    if error is None:
        await asyncio.to_thread(vm.kill)  # the source's vCPUs end where they are parked
        on_committed()
        try:
            await asyncio.to_thread(_teardown, node, slot, vm)
        except Exception as e:  # the VM runs at the destination; what is left here is reported
            teardown_problem = f"{type(e).__name__}: {e}"
        with contextlib.suppress(Exception):
            assert ch is not None
            await ch.send(control(MsgType.DONE))
        progress.phase = "done"
    if ch is not None:
        with contextlib.suppress(Exception):
            await ch.close()
    t_end = time.monotonic_ns()
    progress.error = error
    t0 = vm.t0_ns
    leg = {
        "ok": error is None, "error": error, "total_s": (t_end - t_start) / 1e9,
        "passes": len(progress.passes), "bytes_lba": progress.bytes_lba, "bytes_ram": progress.bytes_ram,
        "allocated_bytes": progress.allocated_bytes,
        "engine_pause_ms": (t_resume - cap.t_pause_ns) / 1e6 if cap is not None and t_resume else float("nan"),
        "unfetched_at_suspend": cap.unfetched if cap is not None else 0,
        "t_start": (t_start - t0) / 1e9, "t_end": (t_end - t0) / 1e9,
        "t_pause": (cap.t_pause_ns - t0) / 1e9 if cap is not None else float("nan"),
        "t_resume": (t_resume - t0) / 1e9 if t_resume else float("nan"),
        "t_pause_ns": cap.t_pause_ns if cap is not None else 0, "t_resume_ns": t_resume,
        "pass_table": [p.to_report(t0) for p in progress.passes], "teardown_problem": teardown_problem,
        "blackout_steps_ms": steps, "guest_at_start": at_start,
    }
    progress.result = leg
    return leg


def _teardown(node: Node, slot: VfSlot, vm: Vm) -> None:
    node.release(slot)
    vm.mem.log_dirty = False


# ============================================================================================ destination
@dataclass
class Incoming:
    """What a destination agent lends to `receive_vm`."""

    node: Node
    admit: Callable[[VmSpec], list[str]]  # reasons this agent will not take this VM (e.g. not announced)
    adopt: Callable[[HostedVm], None]  # the VM is running here now
    progress: Progress
    reply_timeout_s: float = REPLY_TIMEOUT
    resuming: Callable[[VmSpec], None] | None = None  # committed, about to resume: the agent records it durably


async def receive_vm(ch: Channel, inc: Incoming, hooks: FaultHooks = NO_FAULTS) -> None:
    node, progress = inc.node, inc.progress
    slot: VfSlot | None = None
    mem: GuestMemory | None = None
    vm: Vm | None = None
    receiver: PrecopyReceiver | None = None
    committed = False
    try:
        hello = await ch.recv(inc.reply_timeout_s)
        if hello.type is not MsgType.HELLO:
            raise MigrationFailed(f"expected HELLO, got {hello.type.name}")
        body: dict = hello.body  # type: ignore[assignment]
        try:
            spec = VmSpec.from_dict(body["vm"])
            template = str(body.get("template", "generic-v1"))
            exported = body.get("exported_state")
            rate = int(body.get("device_rate_iops", 0))
        except (TypeError, ValueError, KeyError) as e:
            await ch.send(control(MsgType.REFUSE, reasons=[f"bad VM description: {e}"]))
            return
        hosted_req = requirements(spec, template, exported)
        reasons = inc.admit(spec) + await asyncio.to_thread(node.problems, hosted_req)
        if reasons:
            progress.phase = "refused"
            progress.error = "; ".join(reasons)
            await ch.send(control(MsgType.REFUSE, reasons=reasons))
            return
        slot = await asyncio.to_thread(node.provision, hosted_req)
        mem = Vm.create_memory(spec)
        node.map_guest(slot, mem)
        await asyncio.to_thread(hm.suspend_controller, node.pf, slot.cntlid)
        if rate:
            await asyncio.to_thread(node.set_rate_limit, slot, rate)
        await asyncio.to_thread(Vm.prepare_for, spec)  # out of the blackout: what restore would make there
        await hooks.at("destination", "setup")
        await ch.send(control(MsgType.ACCEPT))
        progress.phase = "receiving"
        receiver = PrecopyReceiver(node, slot, mem)
        while True:
            msg = await ch.recv(inc.reply_timeout_s)
            t = msg.type
            if t in BULK_TYPES:
                await receiver.apply(msg)
                progress.bytes_lba, progress.bytes_ram = receiver.bytes_lba, receiver.bytes_ram
                continue
            await receiver.flush()  # control messages see every byte before them applied
            if t is MsgType.PASS_END:
                progress.pass_no = int(msg.body["pass"])  # type: ignore[index]
                if progress.pass_no == 0:
                    await hooks.at("destination", "precopy")
                await ch.send(control(MsgType.PASS_ACK, **{"pass": progress.pass_no}))
            elif t is MsgType.SWITCHOVER:
                progress.phase = "preparing"
                await hooks.at("destination", "state-transfer")
                b: dict = msg.body  # type: ignore[assignment]
                try:
                    vm, laps = await asyncio.to_thread(switchover.prepare, node, slot, mem, b["controller_state"],
                                                       b["vm_state"], b.get("ram_crc"), b.get("lba_digest"))
                except Exception as e:
                    await ch.send(control(MsgType.FAILED, reason=f"{type(e).__name__}: {e}"[:500]))
                    raise
                await ch.send(control(MsgType.PREPARED, laps=laps))
                progress.phase = "prepared"
            elif t is MsgType.COMMIT:
                assert vm is not None
                committed = progress.committed = True  # the source will not resume: run the VM whatever happens
                await hooks.at("destination", "resume")
                if inc.resuming is not None:
                    inc.resuming(spec)
                t_resume, laps = await asyncio.to_thread(switchover.resume, node, slot, vm)
                inc.adopt(HostedVm(vm, slot, spec, template, rate))
                progress.phase = "running here"
                await ch.send(control(MsgType.COMMITTED, t_resume_ns=t_resume, laps=laps))
            elif t is MsgType.DONE:
                progress.phase = "done"
                receiver.close()
                return
            elif t is MsgType.ABORT:
                raise MigrationFailed(f"source aborted: {msg.body.get('reason')}")  # type: ignore[union-attr]
            else:
                raise MigrationFailed(f"unexpected {t.name}")
    except (Exception, asyncio.CancelledError) as e:  # cancelled: fenced by the agent (vm.fence-incoming)
        if progress.error is None:
            progress.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if not committed and not isinstance(e, OSError | TimeoutError | asyncio.CancelledError):
            with contextlib.suppress(Exception):  # a local failure: the source learns why at once
                await ch.send(control(MsgType.ABORT, reason=progress.error[:500]))
        if receiver is not None:
            receiver.close()
            receiver = None
        if not committed:
            progress.phase = "aborted (nothing kept)"
            if vm is not None:
                vm.close()
            if slot is not None:
                await asyncio.to_thread(_discard, node, slot)
            if mem is not None:
                mem.log_dirty = False
        elif progress.phase != "done":
            progress.phase = "running here (source did not confirm teardown)"
        if isinstance(e, asyncio.CancelledError):
            raise


def _discard(node: Node, slot: VfSlot) -> None:
    with contextlib.suppress(Exception):
        node.release(slot)
