"""Bugs the Linux host found (tests/interop, docs/nvme-tcp.md "Interop with the Linux host"), each pinned here by a
test that fails without its fix, so they stay fixed without booting a guest:

1. The discovery log said TREQ 02h "secure channel not required": libnvme 1.3 (nvme-cli 2.3) turns that into a
   `tls` connect option which kernel 6.1 refuses, so `nvme connect-all` failed with EINVAL. Now 00b "not
   specified" (plus 04h, SQ flow control disable supported), as Linux's nvmet.
2. Identify Namespace reported NMIC 0 although the namespace is shared (every fabrics controller of the subsystem
   reaches it; on PCIe, NamespaceInfo.nmic says so): the kernel refused a second path ("duplicate IDs in subsystem
   for nsid 1") and native multipath did not work.
3. An exported subsystem's Commands Supported and Effects log (05h) was its template's as is, so a fabrics
   controller listed Create/Delete I/O SQ/CQ as supported (`nvme effects-log`) while it answers Invalid Opcode.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from nvme_lm.device.admin.exported import capabilities_for
from nvme_lm.device.exported import ExportedSubsystems
from nvme_lm.device.fabrics_controller import FabricsSubsystem
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.device.subsystem import NvmSubsystem
from nvme_lm.fabrics.initiator import HostController, identify_sqe
from nvme_lm.fabrics.server import NvmeTcpTarget
from nvme_lm.host.driver import NvmeDriver
from nvme_lm.spec import fabrics as fab
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.identify import CNS, IdentifyNamespace
from nvme_lm.spec.logs import CommandEffectsLog
from nvme_lm.spec.opcodes import AdminOpcode

HOST = "nqn.2014-08.org.nvmexpress:uuid:da53ebc3-acfc-4173-a55f-22ac06dabb37"


async def _serve(data_dir: Path, body) -> None:  # type: ignore[no-untyped-def]
    nvm = NvmSubsystem(data_dir)
    nvm.create_namespace((8 << 20) // 512, 512, nsid=1)
    tgt = NvmeTcpTarget([FabricsSubsystem.of_device(nvm)], listen=[("127.0.0.1", 0)], advertise_addr="10.0.2.100")
    port = (await tgt.start())[0].port
    try:
        await body(port, nvm.nqn)
    finally:
        await tgt.close()
        nvm.close()


def test_discovery_entries_leave_the_secure_channel_unspecified(tmp_path: Path) -> None:
    async def body(port: int, nqn: str) -> None:
        d = await HostController.connect("127.0.0.1", port, fab.DISCOVERY_NQN, HOST)
        _, (entry,) = fab.decode_discovery_log(await d.get_log(fab.DISCOVERY_LOG_ID, 2048))
        await d.close()
        assert entry.subnqn == nqn
        assert entry.treq & 0x3 == 0x0, f"TREQ {entry.treq:#x}: libnvme 1.3 adds `tls` for 01b and 10b"
        assert entry.treq & fab.TREQ_DISABLE_SQ_FLOW_SUPPORTED

    asyncio.run(asyncio.wait_for(_serve(tmp_path, body), 20))


def test_identify_namespace_over_tcp_says_shared(tmp_path: Path) -> None:
    async def body(port: int, nqn: str) -> None:
        paths = [await HostController.connect("127.0.0.1", port, nqn, HOST, io_queues=0) for _ in range(2)]
        for h in paths:  # two controllers (two paths) reach namespace 1: NMIC bit 0 must say it is shared
            _, data = await h.admin.command(identify_sqe(CNS.NS, nsid=1), read_len=4096)
            assert IdentifyNamespace.decode(data).nmic & 1 == 1
            await h.close()

    asyncio.run(asyncio.wait_for(_serve(tmp_path, body), 20))


def test_identify_namespace_on_pcie_reports_the_namespaces_nmic(ssd: EmulatedSsd, driver: NvmeDriver) -> None:
    """The same field on PCIe: what Namespace Management was given (shared or private) is what Identify says."""
    shared = driver.create_namespace(2048, shared=True)
    private = driver.create_namespace(2048, shared=False)
    driver.attach_namespace(shared, [ssd.primary.cntlid])
    driver.attach_namespace(private, [ssd.primary.cntlid])
    assert IdentifyNamespace.decode(driver.identify(CNS.NS, shared)).nmic == 1
    assert IdentifyNamespace.decode(driver.identify(CNS.NS, private)).nmic == 0


def test_exported_effects_log_lists_only_what_the_fabrics_controller_runs(tmp_path: Path) -> None:
    async def body() -> None:
        model = DeviceModel.builtin("vendor-a")
        nvm = NvmSubsystem(tmp_path / "ssd", model)
        nvm.create_namespace(2048, 512, nsid=1)
        ex = ExportedSubsystems(nvm, capabilities_for(model), state_file=None)
        esub = ex.create([t.name for t in ex.templates].index("generic-v1"))
        ex.associate_namespace(esub.esubid, 1, 1)
        assert AdminOpcode.CREATE_IO_SQ in esub.template.admin  # what a VF bound to it lists
        tgt = NvmeTcpTarget([FabricsSubsystem.of_exported(nvm, ex, esub)], listen=[("127.0.0.1", 0)])
        port = (await tgt.start())[0].port
        try:
            h = await HostController.connect("127.0.0.1", port, esub.nqn, HOST, io_queues=0)
            effects = CommandEffectsLog.decode(await h.get_log(0x05, 4096))
            listed = [op for op, v in enumerate(effects.acs) if v & 1]
            assert AdminOpcode.CREATE_IO_SQ not in listed and AdminOpcode.DELETE_IO_CQ not in listed
            assert AdminOpcode.IDENTIFY in listed and AdminOpcode.KEEP_ALIVE in listed
            for op in set(listed) - {AdminOpcode.ASYNC_EVENT_REQUEST}:  # each one it lists is one it has
                cqe, _ = await h.admin.submit(SQE(opcode=op, nsid=0xFFFFFFFF), timeout=2)
                assert not (cqe.st.sct == 0 and cqe.st.sc == 1), f"opcode {op:#x} listed but Invalid Opcode"
            assert effects.iocs[0x01] == esub.template.io[0x01]  # what it runs keeps the template's effects
            await h.close()
        finally:
            await tgt.close()
            nvm.close()

    asyncio.run(asyncio.wait_for(body(), 20))
