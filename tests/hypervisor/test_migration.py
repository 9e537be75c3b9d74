"""The migration engine with two host agents in one process (one event loop, real TLS over loopback,
two emulated SSDs of different models): the flows, switchover, refusals and rollback.

End-to-end runs with agents as separate OS processes are in test_end_to_end.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from pathlib import Path

import pytest

from nvme_lm.hypervisor.agent import Agent, AgentConfig, AgentError
from nvme_lm.vm.machine import VmSpec

SPEC = VmSpec(name="vm1", memory_bytes=16 << 20, queues=1, lba_size=512, capacity_bytes=16 << 20,
              prefill_bytes=4 << 20, iodepth=8, rate_iops=3000, identity_check_s=0.2, ram_fill=0.25,
              ram_dirty_mib_s=2.0, trim_percent=0)
OPTS = {"downtime_target_ms": 100.0, "max_passes": 4, "verify_ram": True, "verify_lbas": True, "timeout_s": 30.0}


@contextlib.asynccontextmanager
async def agents(tmp_path: Path, models=("vendor-a", "vendor-b")):
    started = []
    try:
        for name, model in zip("ab", models, strict=True):
            a = Agent(AgentConfig(name, tmp_path / name, model, pki_dir=tmp_path / "pki"))
            await a.start()
            started.append(a)
        yield started
    finally:
        for a in started:
            await a.stop()


async def migrate(src: Agent, dst: Agent, **opts) -> dict:
    dst.expect({"vm": "vm1"})
    await src.send_migration({"destination": dst.migrate_addr, "server_name": dst.cfg.name,
                              "options": {**OPTS, **opts}})
    assert src._task is not None
    return await src._task


async def finish(agent: Agent, legs: list[dict]) -> dict:
    windows = [[leg["t_pause_ns"], leg["t_resume_ns"]] for leg in legs if leg["ok"]]
    return await agent.shutdown_vm({"windows": windows})


async def nothing_left(agent: Agent, timeout: float = 10.0) -> bool:
    """The destination cleans up after it answered: wait (bounded) until it holds no VF and no VM."""
    deadline = asyncio.get_running_loop().time() + timeout
    while agent.node._busy_vfs() or agent.hosted is not None:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def assert_clean(rep: dict, *, reads: bool = True) -> None:
    assert rep["errors"] == 0 and rep["timeouts"] == 0 and rep["spurious_completions"] == 0, rep
    assert rep["identity_changes"] == 0 and rep["identity_checks"] > 0
    assert rep["verify_failures"] == 0, rep["verify_failure_examples"]
    assert rep["verified_blocks"] > 0 and (rep["verified_reads"] > 0 or not reads)


def test_a_running_vm_moves_to_another_model_and_back(tmp_path):
    async def run():
        async with agents(tmp_path) as (a, b):
            await a.create_vm({"spec": SPEC.to_dict()})
            await asyncio.sleep(0.5)
            leg1 = await migrate(a, b)
            assert leg1["ok"], leg1["error"]
            assert a.hosted is None and b.hosted is not None and b.hosted.vm.running
            assert leg1["passes"] >= 2 and leg1["bytes_lba"] > 0 and leg1["bytes_ram"] > 0
            assert leg1["allocated_bytes"] >= SPEC.prefill_bytes
            assert 0 < leg1["engine_pause_ms"] < 5000
            await asyncio.sleep(0.4)
            leg2 = await migrate(b, a)  # and back: A -> B -> A
            assert leg2["ok"], leg2["error"]
            await asyncio.sleep(0.4)
            rep = await finish(a, [leg1, leg2])
            assert_clean(rep)
            assert rep["ram_verify_failures"] == 0 and rep["ram_pages_written"] > 0
            gaps = rep["gaps"]
            assert len(gaps) == 2 and all(g["gap_ms"] > 0 for g in gaps)
            # the guest saw at least the engine's pause (its I/O stopped while the vCPUs were paused)
            assert gaps[0]["gap_ms"] >= leg1["engine_pause_ms"] * 0.5
            # nothing left behind on either device
            for ag in (a, b):
                assert ag.node.pf.admin is not None
                assert not ag.node._busy_vfs()
    asyncio.run(run())


def test_commands_left_unfetched_at_suspend_run_once_at_the_destination(tmp_path):
    """A device QoS limit keeps guest commands waiting in the SQ; they cross in guest RAM and run there."""
    async def run():
        async with agents(tmp_path) as (a, b):
            spec = replace(SPEC, rate_iops=0, iodepth=16)
            await a.create_vm({"spec": spec.to_dict(), "device_rate_iops": 400})
            await asyncio.sleep(0.5)
            leg = await migrate(a, b)
            assert leg["ok"], leg["error"]
            assert leg["unfetched_at_suspend"] > 0
            await asyncio.sleep(0.5)
            assert_clean(await finish(b, [leg]))
    asyncio.run(run())


def test_a_destination_that_cannot_host_the_vm_refuses_before_copying(tmp_path):
    async def run():
        async with agents(tmp_path) as (a, b):
            big = replace(SPEC, capacity_bytes=1 << 50)  # more than vendor-b holds
            with pytest.raises(AgentError):
                await a.create_vm({"spec": big.to_dict()})  # the source itself refuses too
            await a.create_vm({"spec": SPEC.to_dict(), "template": "dc-large-v1"})  # vendor-a only
            leg = await migrate(a, b)
            assert not leg["ok"] and "refused" in leg["error"] and leg["bytes_lba"] == 0
            assert a.hosted is not None and a.hosted.vm.running and not a.hosted.vm.gate.paused
            assert await nothing_left(b)
            await asyncio.sleep(0.3)
            assert_clean(await finish(a, []))
    asyncio.run(run())


def test_an_unannounced_migration_is_refused(tmp_path):
    async def run():
        async with agents(tmp_path) as (a, b):
            await a.create_vm({"spec": SPEC.to_dict()})
            await a.send_migration({"destination": b.migrate_addr, "server_name": "b", "options": OPTS})
            leg = await a._task
            assert not leg["ok"] and "not told to expect" in leg["error"]
            await asyncio.sleep(0.3)
            assert_clean(await finish(a, []))
    asyncio.run(run())


def test_a_destination_failing_at_switchover_leaves_the_vm_running_at_the_source(tmp_path, monkeypatch):
    from nvme_lm.hypervisor import switchover

    def broken(*args, **kwargs):
        raise RuntimeError("injected: Set Controller State failed")

    async def run():
        async with agents(tmp_path) as (a, b):
            await a.create_vm({"spec": SPEC.to_dict()})
            await asyncio.sleep(0.3)
            monkeypatch.setattr(switchover, "prepare", broken)
            leg = await migrate(a, b)
            assert not leg["ok"] and "injected" in leg["error"]
            vm = a.hosted.vm
            assert vm.running and not vm.gate.paused
            before = vm.report()["ios"]
            await asyncio.sleep(0.3)
            assert vm.report()["ios"] > before  # the guest kept going at the source
            assert await nothing_left(b)
            monkeypatch.undo()
            leg2 = await migrate(a, b)  # and a new migration afterwards succeeds
            assert leg2["ok"], leg2["error"]
            await asyncio.sleep(0.2)
            assert_clean(await finish(b, [leg2]))
    asyncio.run(run())


@pytest.mark.parametrize("blob", [b"", b"\x93garbage", b"\x81\xa1v\x02"])  # empty, not msgpack, wrong version
def test_a_bad_vm_state_is_refused_and_the_vm_goes_on_at_the_source(tmp_path, blob):
    async def run():
        async with agents(tmp_path) as (a, b):
            await a.create_vm({"spec": SPEC.to_dict()})
            await asyncio.sleep(0.3)
            a.hosted.vm.state = lambda: blob  # what a broken or hostile source would send
            leg = await migrate(a, b)
            assert not leg["ok"] and "VM state" in leg["error"], leg["error"]
            assert a.hosted.vm.running and not a.hosted.vm.gate.paused
            assert await nothing_left(b)
            del a.hosted.vm.state
            await asyncio.sleep(0.3)
            assert_clean(await finish(a, []))
    asyncio.run(run())


def test_a_cancelled_migration_rolls_back_and_a_new_one_succeeds(tmp_path):
    async def run():
        async with agents(tmp_path) as (a, b):
            await a.create_vm({"spec": SPEC.to_dict()})
            await asyncio.sleep(0.3)
            b.expect({"vm": "vm1"})
            await a.send_migration({"destination": b.migrate_addr, "server_name": "b", "options": OPTS})
            while not a.migration.passes:  # cancel during pre-copy
                await asyncio.sleep(0.005)
            a.cancel_migration()
            leg = await a._task
            assert not leg["ok"] and leg["error"] == "cancelled"
            vm = a.hosted.vm
            assert vm.running and not vm.gate.paused and not vm.mem.log_dirty
            assert await nothing_left(b)
            with pytest.raises(AgentError):
                a.cancel_migration()  # nothing to cancel any more
            leg2 = await migrate(a, b)
            assert leg2["ok"], leg2["error"]  # no UDMQ or tracking was left behind on the source
            await asyncio.sleep(0.2)
            assert_clean(await finish(b, [leg2]))
    asyncio.run(run())


WRITER = replace(SPEC, pattern="randwrite", rate_iops=0, iodepth=16, ram_dirty_mib_s=0.0, ram_fill=0.05)
SLOW_LINK = {"max_bandwidth_mib_s": 4.0, "downtime_target_ms": 100.0, "max_passes": 30, "verify_ram": False,
             "verify_lbas": False}


def test_a_guest_writing_faster_than_the_link_converges_only_when_throttled(tmp_path):
    from nvme_lm.host import rate_limit as hrl

    async def run():
        async with agents(tmp_path) as (a, b):
            await a.create_vm({"spec": WRITER.to_dict()})
            await asyncio.sleep(0.3)
            slot = a.hosted.slot
            # without throttling: the rest never shrinks; the engine gives up and the VM goes on here
            leg = await migrate(a, b, **SLOW_LINK, throttle=False, give_up_s=2.0)
            assert not leg["ok"] and "gave up" in leg["error"], leg["error"]
            assert a.hosted.vm.running and not a.hosted.vm.gate.paused
            assert not hrl.get_rate_limit(a.node.pf, slot.cntlid).enabled
            assert await nothing_left(b)
            # with it: guest writes are limited until each pass halves the rest, then it switches
            leg = await migrate(a, b, **SLOW_LINK)
            assert leg["ok"], leg["error"]
            limits = [p["write_limit_mib_s"] for p in leg["pass_table"]]
            assert max(limits) > 0, leg["pass_table"]
            assert leg["engine_pause_ms"] < 1000
            await asyncio.sleep(0.3)
            dst = b.hosted.slot
            assert not hrl.get_rate_limit(b.node.pf, dst.cntlid).enabled  # the throttle did not travel
            rep = await finish(b, [leg])
            assert_clean(rep, reads=False)  # a write-only guest: the final read-back verifies every block
            assert rep["writes"] > 0
    asyncio.run(run())
