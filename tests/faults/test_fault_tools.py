"""The fault matrix's tools, each on its own and fast: the plan data (every cell, plain data both ways), the
controller a plan notifies, the relay that cuts and corrupts a TLS stream, the disk that really fills (and the
NVMe status a full disk earns, and the device still managing itself on it), the orphans an agent releases
when it starts, the placement records that tell a source in doubt whether its VM ever resumed elsewhere."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from nvme_lm.device import persist
from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.host import commands as cmd
from nvme_lm.host.driver import NvmeDriver
from nvme_lm.hypervisor import transport
from nvme_lm.hypervisor.agent import Agent, AgentConfig, AgentError
from nvme_lm.hypervisor.certs import client_context, ensure_pki, server_context
from nvme_lm.hypervisor.fault_matrix import EXPECTED, expected
from nvme_lm.hypervisor.faults import (
    KINDS,
    PHASES,
    Ballast,
    FaultController,
    FaultPlan,
    FaultProxy,
    FaultStep,
    InjectedFault,
    steps_for,
)
from nvme_lm.hypervisor.migration import VfRequirements
from nvme_lm.hypervisor.node import Node
from nvme_lm.hypervisor.stream import MsgType, control
from nvme_lm.spec import status as st
from nvme_lm.vm.memory import GuestMemory


# ------------------------------------------------------------------------------------------ the plan
def test_every_cell_has_steps_at_engine_points_and_a_defined_outcome():
    assert len(EXPECTED) == len(KINDS) * len(PHASES) == 30
    for kind in KINDS:
        for phase in PHASES:
            steps = steps_for(kind, phase)
            assert steps, (kind, phase)
            plan = FaultPlan(steps, "unix:/nowhere", kind, phase)
            back = FaultPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
            assert back.steps == steps and (back.fault, back.phase) == (kind, phase)
            assert expected(kind, phase).where in ("source", "destination", "nowhere")
    # where the engine has no point, the other end's point stands in (docs/faults.md)
    assert steps_for("destination-killed", "stop-and-copy") == [
        FaultStep("source", "stop-and-copy", "notify", "kill-destination")]
    assert steps_for("network-cut", "resume")[0].role == "destination"
    assert [s.event for s in steps_for("destination-out-of-space", "state-transfer")] == ["fill", "release"]


def test_plans_refuse_what_the_engine_cannot_do():
    with pytest.raises(ValueError, match="no fault point"):
        FaultStep("destination", "stop-and-copy", "kill")
    with pytest.raises(ValueError, match="unknown fault action"):
        FaultStep("source", "setup", "explode")
    with pytest.raises(ValueError, match="notify step names one event"):
        FaultStep("source", "setup", "notify")
    with pytest.raises(ValueError, match="after_s"):
        FaultStep("source", "setup", "kill", after_s=-1)
    with pytest.raises(ValueError, match="controller address"):
        FaultPlan([FaultStep("source", "setup", "notify", "cut")])
    with pytest.raises(ValueError):
        steps_for("meteor", "setup")
    with pytest.raises(ValueError):
        FaultPlan.from_dict({"version": 2, "steps": []})


def test_a_plan_fires_each_step_once_at_its_point_only():
    async def run() -> FaultPlan:
        plan = FaultPlan([FaultStep("source", "precopy", "raise")])
        await plan.at("destination", "precopy")  # another end's point: nothing
        await plan.at("source", "setup")
        with pytest.raises(InjectedFault, match="source's precopy"):
            await plan.at("source", "precopy")
        await plan.at("source", "precopy")  # once only
        return plan

    plan = asyncio.run(run())
    assert [(f["role"], f["point"], f["action"]) for f in plan.fired] == [("source", "precopy", "raise")]


def test_a_plan_holds_the_engine_until_the_controller_acted(tmp_path):
    async def run() -> tuple[FaultPlan, FaultController, list[str]]:
        order: list[str] = []

        async def cut(body: dict) -> str:
            await asyncio.sleep(0.05)
            order.append(f"cut at the {body['role']}'s {body['point']}")
            return "cut"

        controller = await FaultController(tmp_path / "f.sock", {"cut": cut}).start()
        try:
            plan = FaultPlan([FaultStep("source", "setup", "notify", "cut"),
                              FaultStep("source", "precopy", "notify", "fill")], controller.address, "network-cut")
            await plan.at("source", "setup")
            order.append("engine goes on")
            with pytest.raises(InjectedFault, match="no action for 'fill'"):
                await plan.at("source", "precopy")  # the controller refused: the fault could not be injected
        finally:
            await controller.close()
        with pytest.raises(InjectedFault, match="unreachable"):
            await FaultPlan([FaultStep("source", "setup", "notify", "cut")], controller.address).at("source", "setup")
        return plan, controller, order

    plan, controller, order = asyncio.run(run())
    assert order == ["cut at the source's setup", "engine goes on"]
    assert plan.fired[0]["answer"] == {"observed": "cut"}
    assert [(e["event"], e.get("observed")) for e in controller.events] == [("cut", "cut"), ("fill", None)]


# ------------------------------------------------------------------------------------------ the link
def test_the_relay_cuts_a_tls_stream_silently_and_a_flipped_bit_kills_it(tmp_path):
    pki = ensure_pki(tmp_path / "pki")
    pki.issue("a")
    pki.issue("b")

    async def run() -> None:
        inbox: asyncio.Queue = asyncio.Queue()

        async def destination(ch: transport.Channel) -> None:
            while True:
                try:
                    inbox.put_nowait(await ch.recv())
                except Exception as e:
                    inbox.put_nowait(e)
                    return

        server = await transport.serve("127.0.0.1", 0, server_context(pki, "b"), destination)
        proxy = FaultProxy("127.0.0.1", server.sockets[0].getsockname()[1])
        host, _, port = (await proxy.start()).rpartition(":")
        try:
            ch = await transport.connect(host, int(port), client_context(pki, "a"), server_hostname="b")
            await ch.send(control(MsgType.HELLO, vm={"name": "vm1"}))
            assert (await asyncio.wait_for(inbox.get(), 5)).type is MsgType.HELLO  # TLS end to end, through it
            proxy.cut()
            await ch.send(control(MsgType.ABORT, reason="held on the way"))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(inbox.get(), 0.5)  # nothing arrives, nothing is refused
            proxy.restore()
            assert (await asyncio.wait_for(inbox.get(), 5)).type is MsgType.ABORT  # held, not lost
            await ch.close()

            stalled = await transport.connect(host, int(port), client_context(pki, "a"), server_hostname="b")
            stalled.send_timeout = 0.5
            proxy.cut()
            with pytest.raises(transport.StreamClosed, match=r"took nothing for 0\.5 s"):
                for _ in range(256):  # a link that takes nothing: the sender's stall timeout ends the stream
                    await stalled.send([bytes(1 << 20)])
            proxy.restore()
            await stalled.close()
            assert isinstance(await asyncio.wait_for(inbox.get(), 5), Exception)  # that connection's end

            ch2 = await transport.connect(host, int(port), client_context(pki, "a"), server_hostname="b")
            await ch2.send(control(MsgType.HELLO, vm={"name": "vm1"}))
            await asyncio.wait_for(inbox.get(), 5)
            proxy.corrupt()
            await ch2.send(control(MsgType.ABORT, reason="damaged on the way"))
            err = await asyncio.wait_for(inbox.get(), 5)
            while not isinstance(err, Exception):
                err = await asyncio.wait_for(inbox.get(), 5)
            assert isinstance(err, transport.StreamClosed)  # TLS refused the record: the connection is dead
            assert len(proxy.flipped) == 1  # whichever way the next bytes went (a TLS 1.3 ticket, or ours)
            await ch2.close()
        finally:
            await proxy.close()
            server.close()

    asyncio.run(run())


# ------------------------------------------------------------------------------------------ the disk
def _mountable() -> bool:
    return os.geteuid() == 0


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs (root only): the disk that really fills."""
    if not _mountable():
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _ssd_with_driver(data_dir: Path) -> tuple[EmulatedSsd, NvmeDriver, GuestMemory]:
    ssd = EmulatedSsd(data_dir)
    mem = GuestMemory(4 << 20)
    ssd.pf.iommu.map(mem.base, mem.buf)
    drv = NvmeDriver(ssd.pf, mem, timeout=5.0)
    drv.start()
    drv.set_number_of_queues(1, 1)
    return ssd, drv, mem


def test_a_full_disk_fails_writes_with_capacity_exceeded_and_the_device_still_manages_itself(small_fs):
    ssd, drv, _ = _ssd_with_driver(small_fs / "ssd")
    try:
        nsid = drv.create_namespace((8 << 20) // 512, 0)  # format 0: 512-byte LBAs
        drv.attach_namespace(nsid, [0])
        q = drv.create_io_queue(1, 8)
        assert q.write(nsid, 0, b"\x11" * 65536, 512).ok
        ballast = Ballast(small_fs)
        assert ballast.fill() > 0 and ballast.free_bytes() == 0
        comp = q.run(cmd.write(nsid, 1024, 128), data=b"\x22" * 65536, check=False)[0]
        assert (comp.st.sct, comp.st.sc, comp.st.dnr) == (st.CAPACITY_EXCEEDED.sct, st.CAPACITY_EXCEEDED.sc, True)
        assert q.write(nsid, 0, b"\x33" * 4096, 512).ok  # allocated blocks take no new space
        # management on a full disk: detach and delete still save the device's metadata (its reserve)
        drv.detach_namespace(nsid, [0])
        drv.delete_namespace(nsid)
        assert not ssd.subsystem.namespaces
        ballast.release()
        assert drv.create_namespace((1 << 20) // 512, 0)
    finally:
        ssd.power_off()


def test_the_ballast_refuses_a_real_disk(tmp_path):
    with pytest.raises(InjectedFault, match="refusing to fill"):
        Ballast(tmp_path).fill()


def test_write_errors_map_to_nvme_status(tmp_path, monkeypatch):
    """Without root: the namespace's pwritev made to come up short and then fail, as on a disk that fills."""
    from nvme_lm.device import namespace as nsmod

    ssd, drv, _ = _ssd_with_driver(tmp_path / "ssd")
    try:
        nsid = drv.create_namespace((4 << 20) // 512, 0)
        drv.attach_namespace(nsid, [0])
        q = drv.create_io_queue(1, 8)
        real = os.pwritev
        calls = {"n": 0, "errno": errno.ENOSPC}

        def pwritev(fd, views, off):
            calls["n"] += 1
            if calls["n"] == 1:  # the first 1 KiB fits, then the disk is full: the error must say so, not EIO
                return real(fd, [memoryview(views[0])[:1024]], off)
            raise OSError(calls["errno"], os.strerror(calls["errno"]))

        monkeypatch.setattr(nsmod.os, "pwritev", pwritev)
        comp = q.run(cmd.write(nsid, 0, 8), data=bytes(4096), check=False)[0]
        assert (comp.st.sct, comp.st.sc) == (st.CAPACITY_EXCEEDED.sct, st.CAPACITY_EXCEEDED.sc)
        assert calls["n"] == 2
        calls.update(n=1, errno=errno.EIO)
        comp = q.run(cmd.write(nsid, 0, 8), data=bytes(4096), check=False)[0]
        assert (comp.st.sct, comp.st.sc) == (st.WRITE_FAULT.sct, st.WRITE_FAULT.sc)
    finally:
        monkeypatch.undo()
        ssd.power_off()


def test_metadata_writes_use_the_reserve_once_the_disk_is_full(tmp_path):
    persist.ensure_reserve(tmp_path)
    reserve = tmp_path / persist.RESERVE_NAME
    assert reserve.stat().st_blocks * 512 >= persist.RESERVE_BYTES
    attempts = []

    def write() -> str:
        attempts.append(reserve.exists())
        if len(attempts) == 1:
            raise OSError(errno.ENOSPC, "full")
        return "saved"

    assert persist.with_reserve(tmp_path, write) == "saved"
    assert attempts == [True, False] and reserve.exists()  # given back for the write, taken again after
    with pytest.raises(OSError):
        persist.with_reserve(tmp_path, lambda: (_ for _ in ()).throw(OSError(errno.EIO, "bad")))


# ------------------------------------------------------------------------------------------ orphans
def test_a_restarted_node_finds_and_releases_what_a_dead_agent_left(tmp_path):
    node = Node("a", tmp_path, "vendor-b")
    try:
        slot = node.provision(VfRequirements(capacity_bytes=4 << 20, lba_size=4096))
        node.set_rate_limit(slot, 500)
        res = node.resources()
        assert [len(res[k]) for k in ("exported_subsystems", "namespaces", "vfs")] == [1, 1, 1]
        vf = res["vfs"][0]
        assert vf["online"] and vf["suspended"] is False and vf["tracking"] is False
        assert vf["rate_limit"]["enabled"] and vf["rate_limit"]["iops"] == 500 and res["udmqs"] == []
    finally:
        node.close()  # the agent's process is gone: what it provisioned stays on the device
    node = Node("a", tmp_path, "vendor-b")
    try:
        left = node.resources()
        assert len(left["exported_subsystems"]) == 1 and left["namespaces"] == [slot.nsid]
        released = node.release_orphans()
        assert not [r for r in released if r.startswith("left:")], released
        assert any("exported subsystem" in r for r in released) and f"namespace {slot.nsid}" in released
        assert node.resources() == {"exported_subsystems": [], "namespaces": [], "vfs": [], "udmqs": []}
        node.release(node.provision(VfRequirements(capacity_bytes=4 << 20, lba_size=4096)))  # usable again
    finally:
        node.close()


# ------------------------------------------------------------------------------------------ the agent
def test_an_agent_knows_which_vms_died_with_the_last_one_and_fences_them(tmp_path):
    (tmp_path / "b" / "vms").mkdir(parents=True)
    (tmp_path / "b" / "vms" / "vm1.json").write_text(json.dumps({"vm": "vm1", "state": "resumed"}))
    (tmp_path / "b" / "vms" / "vm2.json").write_text(json.dumps({"vm": "vm2", "state": "running"}))

    async def run() -> None:
        agent = Agent(AgentConfig("b", tmp_path / "b", "vendor-b", pki_dir=tmp_path / "pki"))
        await agent.start()
        try:
            assert agent.info()["lost_vms"] == ["vm1", "vm2"]
            assert await agent.fence_incoming({"vm": "vm1"}) == {"runs": False, "ran_here": True}
            assert await agent.fence_incoming({"vm": "vm2"}) == {"runs": False, "ran_here": False}
            agent.expect({"vm": "vm3", "reply_timeout_s": 2})
            assert agent.incoming_timeout == 2.0
            assert await agent.fence_incoming({"vm": "vm3"}) == {"runs": False, "ran_here": False}
            assert agent.expecting is None  # a late migration of vm3 would now be refused
            with pytest.raises(AgentError) as e:
                await agent.resolve_in_doubt({"decision": "resume"})
            assert e.value.status == 409
            with pytest.raises(AgentError) as e:
                agent.inject_faults({"plan": {"steps": [{"role": "source", "point": "nowhere", "action": "kill"}]}})
            assert e.value.status == 400
            armed = agent.inject_faults({"plan": FaultPlan(steps_for("cancel", "setup"), "unix:/x").to_dict()})
            assert armed["plan"]["steps"][0]["event"] == "cancel"
            assert agent.inject_faults({"plan": {}})["plan"] is None
            assert (await agent.resources())["namespaces"] == []
        finally:
            await agent.stop()
        assert sorted(p.name for p in (tmp_path / "b" / "vms").iterdir()) == ["vm1.lost", "vm2.lost"]

    asyncio.run(run())
