"""Fixtures shared by the device tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nvme_lm.device.model import DeviceModel
from nvme_lm.device.ssd import EmulatedSsd


@pytest.fixture
def devices(tmp_path) -> Iterator[tuple[EmulatedSsd, EmulatedSsd]]:
    """A migration source and destination: two vendor-a SSDs."""
    model = DeviceModel.builtin("vendor-a")
    src, dst = EmulatedSsd(tmp_path / "src", model), EmulatedSsd(tmp_path / "dst", model)
    yield src, dst
    src.power_off()
    dst.power_off()
