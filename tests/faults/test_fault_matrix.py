"""Issue 6's fault matrix, one test per cell: {cancel, destination killed, source agent restarted after commit,
network cut, stream corruption, destination out of space} x {setup, pre-copy, stop-and-copy, state transfer,
resume}. Each cell runs scenarios/faults.toml with its `[faults]` through the orchestrator (real agent
processes, mutual TLS, the fault injected at the engine's point) and asserts the cell's defined outcome
(`fault_matrix.EXPECTED`, docs/faults.md): where the VM ends, why the leg ended, the in-doubt resolution,
what each device still holds, a migration afterwards, and the guest's zero-error read-back."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from nvme_lm.cli.report import check
from nvme_lm.hypervisor import netns
from nvme_lm.hypervisor.fault_matrix import EXPECTED, table
from nvme_lm.hypervisor.faults import KINDS, PHASES
from nvme_lm.hypervisor.orchestrator import run_scenario
from nvme_lm.hypervisor.scenario import load_scenario

from .conftest import CELLS

FAULTS_TOML = Path(__file__).resolve().parents[2] / "scenarios" / "faults.toml"


@pytest.mark.faults
@pytest.mark.timeout(180)
@pytest.mark.parametrize("cell", [(k, p) for k in KINDS for p in PHASES], ids=lambda c: f"{c[0]}@{c[1]}")
def test_fault_cell(cell: tuple[str, str], tmp_path: Path) -> None:
    run_cell(cell, tmp_path)


@pytest.mark.faults
@pytest.mark.timeout(180)
@pytest.mark.parametrize("cell", [("network-cut", "resume"), ("destination-killed", "stop-and-copy")],
                         ids=lambda c: f"{c[0]}@{c[1]}")
def test_fault_cell_in_network_namespaces(cell: tuple[str, str], tmp_path: Path) -> None:
    """The same cells with each agent in its own network namespace: the cut is the host's link going down."""
    ok, why = netns.available()
    if not ok:
        pytest.skip(why)
    run_cell(cell, tmp_path, use_netns=True)


def run_cell(cell: tuple[str, str], tmp_path: Path, use_netns: bool = False) -> None:
    kind, phase = cell
    base = load_scenario(FAULTS_TOML)
    sc = dataclasses.replace(base, faults=dataclasses.replace(base.faults, kind=kind, phase=phase)).validate()
    report = asyncio.run(run_scenario(sc, tmp_path / "run", netns=use_netns))
    f = report["faults"]
    CELLS.append(f)
    failed = {n: c["detail"] for n, c in f["checks"].items() if not c["ok"]}
    assert not failed, table([f]) + "\n" + json.dumps(failed, indent=1)[:4000]
    exp = EXPECTED[cell]
    assert f["expected"]["where"] == exp.where and f["ok"] and report["ok"]
    assert check(report) == [], check(report)  # still a report the renderer reads
    assert report["guest_errors"] == 0 and report["verify_failures"] == 0
