"""When to stop pre-copying and switch over.

Issue 5's policy is the classic one: switch when what is still dirty could be sent within the
downtime target at the copy rate the last pass achieved, or when the pass budget is spent (then the
blackout may exceed the target; the report shows by how much). Throttling and stall detection
belong to issue 6 and extend this class.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvergencePolicy:
    downtime_target_ms: float = 100.0
    max_passes: int = 8

    def expected_downtime_ms(self, remaining_bytes: int, copy_rate_bytes_s: float) -> float:
        if remaining_bytes <= 0:
            return 0.0
        if copy_rate_bytes_s <= 0:
            return float("inf")
        return remaining_bytes / copy_rate_bytes_s * 1000.0

    def switch_now(self, pass_no: int, remaining_bytes: int, copy_rate_bytes_s: float) -> tuple[bool, str]:
        """(switch over after this pass?, why)."""
        expect = self.expected_downtime_ms(remaining_bytes, copy_rate_bytes_s)
        if expect <= self.downtime_target_ms:
            return True, f"converged: {remaining_bytes} bytes left ~ {expect:.1f} ms <= {self.downtime_target_ms} ms"
        if pass_no + 1 >= self.max_passes:
            return True, f"pass budget spent ({self.max_passes}); ~{expect:.1f} ms expected"
        return False, f"{remaining_bytes} bytes left ~ {expect:.1f} ms > {self.downtime_target_ms} ms"
