"""Interop tests against a real Linux host (`make interop`, `-m interop`). They boot a guest under QEMU and take
minutes, so a plain `pytest` run (and so `make test`) deselects them unless the marker expression names them."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "interop" in (config.getoption("markexpr") or ""):
        return
    drop = [item for item in items if item.get_closest_marker("interop")]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if not item.get_closest_marker("interop")]
