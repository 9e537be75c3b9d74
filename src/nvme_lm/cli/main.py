"""The `nvme-lm` command line: `demo` and `migrate` (live migration between host agents), `host serve`,
`single-host`, `bench`, `device`, `lm` and `target serve` (NVMe/TCP)."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from nvme_lm.cli.bench_lba import lba_status_command
from nvme_lm.cli.bench_migrate import migrate_command as bench_migrate_command
from nvme_lm.cli.bench_noisy import noisy_command
from nvme_lm.cli.bench_tcp import tcp_command
from nvme_lm.cli.device import device
from nvme_lm.cli.lm import lm
from nvme_lm.cli.migrate import demo, host, migrate
from nvme_lm.cli.target import target


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nvme-lm")
def cli() -> None:
    """An emulated NVMe SSD with live-migration features, and the tools around it."""


# ------------------------------------------------------------------------------------------ demo
def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _render_demo(d: dict[str, Any], console: Console) -> None:
    ident = d["identify"]
    t = Table(title="Identify", title_justify="left", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    c = ident["controller"]
    if c is not None:
        t.add_row("VID / SSVID", f"{c['vid']:#06x} / {c['ssvid']:#06x}")
        t.add_row("SN", c["sn"])
        t.add_row("MN", c["mn"])
        t.add_row("FR", c["fr"])
        mdts = "no limit" if c["mdts"] == 0 else f"{c['mdts']} (2^{c['mdts']} x 4 KiB = {4 << c['mdts']} KiB)"
        t.add_row("MDTS", mdts)
        t.add_row("NN", str(c["nn"]))
    else:
        t.add_row("controller", f"[yellow]{ident['controller_note']}[/yellow]")
    n = ident["namespace"]
    ns = d["namespace"]
    if n is not None:
        t.add_row(f"namespace {ns['nsid']}", f"NSZE {n['nsze']:,} x {n['lba_size']} B = {n['size_bytes'] >> 20} MiB "
                  f"(NUSE {n['nuse']:,} before the run, {_fmt(n.get('nuse_after_run'))} after)")
    else:
        t.add_row(f"namespace {ns['nsid']}", f"[yellow]{ident['namespace_note']}[/yellow]; created with "
                  f"{ns['size_bytes'] >> 20} MiB of {ns['lba_size']} B LBAs")
    t.add_row("namespace created via", ns["created_via"])
    console.print(t)

    w = d["workload"]
    lat = w["latency_us"]
    r = Table(title=f"Verified random 4 KiB read/write, QD{w['qd']}", title_justify="left")
    for col in ("", "IOs", "IOPS", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs"):
        r.add_column(col, justify="left" if not col else "right")
    for kind, count in (("all", w["ios"]), ("read", w["reads"]), ("write", w["writes"])):
        s = lat[kind]
        iops = w["iops"] * count / w["ios"] if w["ios"] else 0.0
        r.add_row(kind, f"{count:,}", f"{iops:,.0f}", *(_fmt(s[k]) for k in ("p50", "p90", "p99", "p99.9")))
    console.print(r)
    sweep = d["sweep"]
    style = "green" if d["ok"] else "bold red"
    console.print(f"[{style}]verify failures: {d['verify_failures']}   command errors: {d['errors']}[/{style}]   "
                  f"(run: {w['verify_failures']} failures; full sweep of {sweep['reads']:,} blocks: "
                  f"{sweep['verify_failures']} failures)")
    for ex in w["verify_failure_examples"] + sweep["verify_failure_examples"]:
        console.print(f"  [red]LBA {ex['lba']} (expected generation {ex['expected_generation']}): {ex['reason']}[/red]")
    for note in d["notes"]:
        console.print(f"[dim]{note}[/dim]")


@cli.command("single-host")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the SSD's files here (default: a temporary directory, removed afterwards).")
@click.option("--seconds", type=float, default=3.0, show_default=True, help="Duration of the random workload.")
@click.option("--qd", type=click.IntRange(1, 512), default=8, show_default=True, help="Queue depth.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def single_host(data_dir: str | None, seconds: float, qd: int, as_json: bool) -> None:
    """One emulated SSD, its host driver, a namespace and a verified random read/write workload."""
    from nvme_lm.cli.demo import run_demo

    console = Console()
    if as_json:
        result = run_demo(data_dir=data_dir, seconds=seconds, qd=qd)
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[ios]:>9,} I/Os"),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            tasks: dict[str, tuple[TaskID, float]] = {}

            def progress(phase: str, done: int, total: float | None) -> None:
                if phase not in tasks:
                    tasks[phase] = (bar.add_task(phase, total=total or seconds, ios=0), time.monotonic())
                task, started = tasks[phase]
                # a time-bound phase (total None) fills its bar with time, a sweep with blocks
                completed = done if total is not None else min(time.monotonic() - started, seconds)
                bar.update(task, completed=completed, ios=done)

            result = run_demo(data_dir=data_dir, seconds=seconds, qd=qd, progress=progress)
    d = result.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        _render_demo(d, console)
    if not result.ok:
        sys.exit(1)


# ------------------------------------------------------------------------------------------ bench
@cli.group()
def bench() -> None:
    """Benchmarks."""


@bench.command("io")
@click.option("--json", "as_json", is_flag=True, help='Print {"cases": [...]} as JSON.')
@click.option("--seconds", type=float, default=2.0, show_default=True, help="Duration of each measurement.")
@click.option("--size-mib", type=click.IntRange(1), default=64, show_default=True, help="Namespace (file) size.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where the namespace file lives (default: a temporary directory).")
def bench_io(as_json: bool, seconds: float, size_mib: int, data_dir: str | None) -> None:
    """4 KiB random read/write at QD1 and QD32 through the full path, against raw preadv/pwritev."""
    run_io(as_json=as_json, seconds=seconds, size_mib=size_mib, data_dir=data_dir)


def run_io(*, as_json: bool, seconds: float, size_mib: int, data_dir: str | None = None) -> None:
    """Shared by `nvme-lm bench io` and `benchmarks/io.py`."""
    from nvme_lm.cli.bench import render, run_io_bench

    if as_json:
        result = run_io_bench(seconds=seconds, size_mib=size_mib, data_dir=data_dir)
        click.echo(json.dumps(result, indent=2))
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 110))  # piped or `make bench` in CI: keep the table whole
    with console.status("starting") as status:
        result = run_io_bench(seconds=seconds, size_mib=size_mib, data_dir=data_dir, progress=status.update)
    render(result, console)


bench.add_command(lba_status_command)  # `nvme-lm bench lba-status` (cli/bench_lba.py, TP4165)
bench.add_command(noisy_command)  # `nvme-lm bench noisy` (cli/bench_noisy.py, TP4176 rate limiting)
bench.add_command(bench_migrate_command)  # `nvme-lm bench migrate` (cli/bench_migrate.py, issue 6's figures)
bench.add_command(tcp_command)  # `nvme-lm bench tcp` (cli/bench_tcp.py, issue 7: NVMe/TCP on loopback)


# ------------------------------------------------------------------------------------------ device
cli.add_command(device)  # `nvme-lm device show` (cli/device.py)
cli.add_command(lm)  # `nvme-lm lm cdq|track-send|track-recv|migration-send|migration-recv|state` (cli/lm.py)
cli.add_command(host)  # `nvme-lm host serve` (cli/migrate.py): a host agent process
cli.add_command(migrate)  # `nvme-lm migrate --scenario F` (cli/migrate.py)
cli.add_command(demo)  # `nvme-lm demo`: the default migration scenario
cli.add_command(target)  # `nvme-lm target serve` (cli/target.py): NVMe/TCP target


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
