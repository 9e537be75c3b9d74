"""`nvme-lm host serve`, `nvme-lm migrate --scenario F` and `nvme-lm demo` (the default scenario)."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from nvme_lm.cli import report as rep
from nvme_lm.hypervisor.control import json_safe


# ------------------------------------------------------------------------------------------ host serve
@click.group()
def host() -> None:
    """Host agents (one OS process per host)."""


@host.command("serve")
@click.option("--name", required=True, help="Host name (also its certificate's name).")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False), help="Where the host's SSD lives.")
@click.option("--model", default="vendor-a", show_default=True, help="Device model of the host's SSD.")
@click.option("--listen", default="127.0.0.1:0", show_default=True, help="Control API: HOST:PORT or unix:PATH.")
@click.option("--migrate-listen", default="127.0.0.1:0", show_default=True, help="Migration stream (mutual TLS).")
@click.option("--pki", type=click.Path(file_okay=False), default=None,
              help="Certificate directory shared by the hosts (default: DATA_DIR/pki; created on first use).")
@click.option("--ready-file", type=click.Path(dir_okay=False), default=None,
              help="Written (JSON: pid, control and migrate addresses) once the agent serves.")
def host_serve(name: str, data_dir: str, model: str, listen: str, migrate_listen: str, pki: str | None,
               ready_file: str | None) -> None:
    """Run a host agent until SIGTERM or `PUT /api/v1/vmm.shutdown`."""
    from nvme_lm.hypervisor.agent import AgentConfig, serve

    serve(AgentConfig(name=name, data_dir=Path(data_dir), model=model, listen=listen, migrate_listen=migrate_listen,
                      pki_dir=Path(pki) if pki else None, ready_file=Path(ready_file) if ready_file else None))


# ------------------------------------------------------------------------------------------ migrate
class _Live:
    """Rich progress for a running scenario: a line for the phase, a bar per leg, the guest's counters."""

    def __init__(self, console: Console) -> None:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), console=console, transient=False)
        self.phase = self.bar.add_task("starting", total=None, info="")
        self.legs: dict[int, TaskID] = {}

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "phase":
            self.bar.update(self.phase, description=data["text"])
        elif kind == "guest":
            self.bar.update(self.phase, info=f"guest {data.get('ios', 0):,} I/Os, {data.get('iops', 0):,.0f} IOPS, "
                                             f"{data.get('errors', 0)} errors")
        elif kind == "migration":
            leg = data["leg"]
            if leg not in self.legs:
                self.legs[leg] = self.bar.add_task(f"leg {leg}", total=1.0, info="")
            moved = data["bytes_lba"] + data["bytes_ram"]
            todo = moved + data["remaining_bytes"] if data["pass"] else max(data["allocated_bytes"], moved)
            done = data["result"] is not None
            self.bar.update(self.legs[leg], completed=1.0 if done else (moved / todo if todo else 0.0),
                            info=f"{data['phase']}, pass {data['pass']}, {moved / (1 << 20):,.1f} MiB moved")


def run_and_report(scenario_path: str | None, as_json: bool, plot_path: str | None, workdir: str | None,
                   netns: bool = False) -> None:
    from nvme_lm.hypervisor import netns as nsnet
    from nvme_lm.hypervisor.orchestrator import run_scenario
    from nvme_lm.hypervisor.scenario import ScenarioError, default_scenario, load_scenario

    try:
        sc = load_scenario(scenario_path) if scenario_path else default_scenario()
    except ScenarioError as e:
        raise click.ClickException(f"scenario refused:\n{e}") from e
    if netns:
        ok, why = nsnet.available()
        if not ok:
            raise click.ClickException(f"--netns: network namespaces are not available here: {why}")
    console = Console(stderr=as_json)
    if not console.is_terminal:
        console = Console(stderr=as_json, width=max(console.width, 130))
    with tempfile.TemporaryDirectory(prefix="nvme-lm-run-") as tmp:
        where = Path(workdir) if workdir else Path(tmp)
        if as_json:
            report = asyncio.run(run_scenario(sc, where, netns=netns))
        else:
            live = _Live(console)
            with live.bar:
                report = asyncio.run(run_scenario(sc, where, live, netns=netns))
    if plot_path:
        rep.plot(report, plot_path)
    if as_json:
        click.echo(json.dumps(json_safe(report), indent=2))
    else:
        rep.render(report, console)
        for line in rep.summary_lines(report):
            console.print(line, markup=False, highlight=False)
        if plot_path:
            console.print(f"plot: {plot_path}")
    if not report["ok"]:
        sys.exit(1)


_NETNS_HELP = ("Run each host agent in its own network namespace joined by veth, the link shaped from [hosts] "
               "link_mbit / link_delay_ms (needs root and iproute2; default: all on loopback, unshaped).")


@click.command("migrate")
@click.option("--scenario", "scenario_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Scenario TOML (docs/scenarios.md); default: the built-in default scenario.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (progress goes to stderr).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a timeline plot (PNG) of guest IOPS and latency with the passes and the blackout.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Keep the hosts' SSDs, certificates and agent logs here (default: a temporary directory).")
@click.option("--netns", is_flag=True, help=_NETNS_HELP)
def migrate(scenario_path: str | None, as_json: bool, plot_path: str | None, workdir: str | None,
            netns: bool) -> None:
    """Start the scenario's host agents, run its VM, live-migrate it and report what the guest saw."""
    run_and_report(scenario_path, as_json, plot_path, workdir, netns)


@click.command("demo")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Timeline plot (PNG).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="Keep the run's files here.")
@click.option("--netns", is_flag=True, help=_NETNS_HELP)
def demo(as_json: bool, plot_path: str | None, workdir: str | None, netns: bool) -> None:
    """The default scenario: two host agents on loopback, vendor-a -> vendor-b, a VM under load."""
    run_and_report(None, as_json, plot_path, workdir, netns)
