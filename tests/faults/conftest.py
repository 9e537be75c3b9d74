"""The fault matrix (docs/faults.md): `make faults` runs all 30 cells (`-m faults`); a plain `pytest` run (and so
`make test`) keeps one representative cell per fault kind. Either way the cells that ran are printed as a table
at the end of the session."""

from __future__ import annotations

from typing import Any

import pytest

CELLS: list[dict[str, Any]] = []  # each cell's report["faults"], in the order they ran

# one cell per kind: a rollback with the VF suspended, both in-doubt resolutions, orphans after a restart,
# a timeout on a cut link, a real full disk
REPRESENTATIVE = {("cancel", "stop-and-copy"), ("destination-killed", "resume"),
                  ("source-restarted-after-commit", "resume"), ("network-cut", "pre-copy"),
                  ("stream-corruption", "resume"), ("destination-out-of-space", "pre-copy")}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "faults" in (config.getoption("markexpr") or ""):
        return  # `-m faults`: the whole matrix
    keep, drop = [], []
    for item in items:
        cell = getattr(item, "callspec", None) and item.callspec.params.get("cell")
        (drop if cell is not None and item.get_closest_marker("faults") and cell not in REPRESENTATIVE
         else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not CELLS:
        return
    from nvme_lm.hypervisor.fault_matrix import table

    terminalreporter.section("fault matrix")
    terminalreporter.write_line(table(CELLS))
    passed = sum(c["ok"] for c in CELLS)
    total_s = sum(c["seconds"] for c in CELLS)
    terminalreporter.write_line(f"{passed}/{len(CELLS)} cells passed in {total_s:.0f} s")
