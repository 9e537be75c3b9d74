"""`nvme-lm target serve`: the emulated SSD as an NVMe/TCP target for real hosts (the kernel's
nvme-tcp, nvme-cli, fio) and for our own Python initiator.

The quick default installs an emulated SSD in the data directory, creates namespace 1 on a sparse
file if the SSD has none, and serves the device's subsystem (its NQN, serial and namespaces) plus the
discovery controller. `--template NAME` serves namespace 1 through an exported NVM subsystem with that
template instead (an SR-IOV model: vendor-a, vendor-b), so hosts see the identity a VF bound to it
shows. SIGTERM / SIGINT stop it cleanly: every association ends and the namespaces are flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from nvme_lm.device.fabrics_controller import FabricsSubsystem
    from nvme_lm.device.ssd import EmulatedSsd

READY_VERSION = 1
NSID = 1


@click.group()
def target() -> None:
    """NVMe/TCP target (NVMe over Fabrics) serving the emulated SSD."""


@target.command("serve")
@click.option("--listen", "listen", multiple=True, default=["127.0.0.1:4420"], show_default=True,
              help="HOST:PORT to listen on (repeatable; every port also answers discovery).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where the SSD's files live; a restart on it keeps the data (default: a temporary directory, "
                   "removed on exit).")
@click.option("--model", default=None, help="Device model: vendor-a, vendor-b (default: the generic model).")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NQN",
              help="A host NQN allowed to connect (repeatable; default: any host).")
@click.option("--advertise-addr", default=None,
              help="TRADDR in discovery log entries (e.g. 10.0.2.100 for a guest under user-mode networking); "
                   "default: the address the host's discovery connection reached.")
@click.option("--size-mib", type=click.IntRange(1), default=1024, show_default=True,
              help="Size of namespace 1 when the SSD has no namespace yet.")
@click.option("--lba-size", type=click.Choice(["512", "4096"]), default="512", show_default=True,
              help="LBA size of namespace 1 when it is created.")
@click.option("--template", default=None,
              help="Serve namespace 1 through an exported NVM subsystem with this template (generic-v1, "
                   "dc-large-v1; needs an SR-IOV model).")
@click.option("--ready-file", type=click.Path(dir_okay=False), default=None,
              help="Written (JSON: pid, ports, subsystem NQNs) once the target listens.")
@click.option("-v", "--verbose", is_flag=True, help="Log every connection and command refusal (DEBUG).")
def serve(listen: tuple[str, ...], data_dir: str | None, model: str | None, allow_hosts: tuple[str, ...],
          advertise_addr: str | None, size_mib: int, lba_size: str, template: str | None, ready_file: str | None,
          verbose: bool) -> None:
    """Serve the emulated SSD over NVMe/TCP until SIGTERM or Ctrl-C."""
    from nvme_lm.device.model import DeviceModel
    from nvme_lm.fabrics.server import parse_listen

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        addrs = [parse_listen(text) for text in listen]
        dev_model = DeviceModel.builtin(model) if model else DeviceModel()
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="nvme-lm-target-"))
        sys.setswitchinterval(0.0005)  # the event loop and the SSD's engines hand the GIL over often
        asyncio.run(_serve(Path(data_dir), dev_model, addrs, allow_hosts, advertise_addr, size_mib * (1 << 20),
                           int(lba_size), template, Path(ready_file) if ready_file else None))


def build_subsystem(ssd: EmulatedSsd, *, size_bytes: int, lba_size: int, template: str | None,
                    allow_hosts: tuple[str, ...] = ()) -> FabricsSubsystem:
    """Namespace 1 (created on first use) behind the device's subsystem or an exported one."""
    from nvme_lm.device.fabrics_controller import FabricsSubsystem

    nvm = ssd.subsystem
    if NSID not in nvm.namespaces:
        if lba_size not in ssd.model.lba_data_sizes:
            raise click.BadParameter(f"model {ssd.model.name} has no {lba_size}-byte LBA format")
        nvm.create_namespace(max(1, size_bytes // lba_size), lba_size, nsid=NSID)
    if template is None:
        return FabricsSubsystem.of_device(nvm, allowed_hosts=allow_hosts)
    ex = ssd.exported
    if ex is None:
        raise click.BadParameter(f"model {ssd.model.name} has no SR-IOV: no exported NVM subsystems (use vendor-a "
                                 "or vendor-b)")
    names = [t.name for t in ex.templates]
    if template not in names:
        raise click.BadParameter(f"template {template!r} is not offered by {ssd.model.name} (offered: "
                                 f"{', '.join(names)})")
    esub = next((e for e in ex.subsystems.values() if e.template.name == template and NSID in e.nsid_map), None)
    if esub is None:  # first run on this data directory: create it, identities drawn once and kept
        esub = ex.create(names.index(template))
        ex.associate_namespace(esub.esubid, NSID, NSID)
    return FabricsSubsystem.of_exported(nvm, ex, esub, allowed_hosts=allow_hosts)


async def _serve(data_dir: Path, model: object, listen: list[tuple[str, int]], allow_hosts: tuple[str, ...],
                 advertise_addr: str | None, size_bytes: int, lba_size: int, template: str | None,
                 ready_file: Path | None) -> None:
    from nvme_lm.device.model import DeviceModel
    from nvme_lm.device.ssd import EmulatedSsd
    from nvme_lm.fabrics.server import NvmeTcpTarget

    assert isinstance(model, DeviceModel)
    log = logging.getLogger("nvme_lm.cli.target")
    ssd = await asyncio.to_thread(EmulatedSsd, data_dir, model)
    try:
        sub = build_subsystem(ssd, size_bytes=size_bytes, lba_size=lba_size, template=template,
                              allow_hosts=allow_hosts)
        ns = sub.namespace(NSID)
        assert ns is not None
        log.info("SSD %s in %s: namespace %d, %d x %d B (%d MiB, %d MiB allocated)", model.name, data_dir, NSID,
                 ns.nsze, ns.lba_size, ns.nsze * ns.lba_size >> 20, ns.nuse * ns.lba_size >> 20)
        tgt = NvmeTcpTarget([sub], listen=listen, advertise_addr=advertise_addr)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ports = await tgt.start()
        try:
            if ready_file is not None:
                tmp = ready_file.with_suffix(".tmp")
                tmp.write_text(json.dumps({
                    "version": READY_VERSION, "pid": os.getpid(), "subsystems": [sub.nqn],
                    "discovery": tgt.discovery.nqn, "ports": [{"portid": p.portid, "host": p.host, "port": p.port}
                                                              for p in ports],
                }))
                tmp.replace(ready_file)
            log.info("subsystem %s (serial %s); connect with: nvme connect -t tcp -a ADDR -s %d -n %s", sub.nqn,
                     sub.serial, ports[0].port, sub.nqn)
            await stop.wait()
            log.info("stopping")
        finally:
            await tgt.close()
    finally:
        await asyncio.to_thread(ssd.power_off)  # flushes, saves the subsystem state, closes the files
