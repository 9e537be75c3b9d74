"""SMART / Health counters that hosts watch. They only ever grow (and must stay monotonic
across a migration), so they are kept apart from anything a reset clears."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class SmartCounters:
    data_units_read: int = 0  # thousands of 512-byte units, rounded up (NVMe Base §5.1.12.1.3)
    data_units_written: int = 0
    host_read_commands: int = 0
    host_write_commands: int = 0
    controller_busy_ns: int = 0
    power_cycles: int = 1
    unsafe_shutdowns: int = 0
    media_errors: int = 0
    error_log_entries: int = 0
    _read_bytes: int = 0
    _written_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    power_on_seconds_base: float = 0.0

    def on_read(self, nbytes: int, command: bool = True) -> None:
        """Read and Compare count as Host Read Commands; Verify only adds to Data Units Read."""
        if command:
            self.host_read_commands += 1
        self._read_bytes += nbytes
        self.data_units_read = -(-self._read_bytes // 512000)

    def on_write(self, nbytes: int) -> None:
        self.host_write_commands += 1
        self._written_bytes += nbytes
        self.data_units_written = -(-self._written_bytes // 512000)

    @property
    def power_on_hours(self) -> int:
        return int((self.power_on_seconds_base + time.monotonic() - self.started) // 3600)

    @property
    def controller_busy_minutes(self) -> int:
        return self.controller_busy_ns // 60_000_000_000
