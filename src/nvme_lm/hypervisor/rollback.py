"""What the source undoes when a migration fails before it committed: the VM keeps running here.

Each step of the outgoing migration records what it changed (tracking started, VM paused, VF
suspended); `roll_back` undoes exactly those, in reverse order, each step on its own so that one
failure does not leave the others undone. After a commit there is nothing to roll back: the VM
belongs to the destination, and a source that lost the destination's answer stays paused ("in
doubt") rather than risk running the VM twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nvme_lm.host import migration as hm
from nvme_lm.hypervisor.node import Node, VfSlot
from nvme_lm.hypervisor.precopy import ChangeTracker
from nvme_lm.vm.machine import Vm


@dataclass
class SourceRollback:
    node: Node
    slot: VfSlot
    vm: Vm
    tracker: ChangeTracker | None = None
    qos_iops: int = 0  # the VM's own IOPS limit, what the VF goes back to after a throttle
    paused: bool = False
    suspended: bool = False
    throttled: bool = False
    committed: bool = False
    problems: list[str] = field(default_factory=list)

    def roll_back(self) -> list[str]:
        """Blocking (PF admin commands): call from a worker thread. Returns what could not be undone."""
        if self.committed:
            raise RuntimeError("the migration committed: the VM is the destination's now")
        if self.tracker is not None:
            self.problems += self.tracker.stop()
            self.tracker = None
        if self.suspended:
            try:
                hm.resume_controller(self.node.pf, self.slot.cntlid)
                self.suspended = False
            except Exception as e:
                self.problems.append(f"resume VF {self.slot.vfn}: {e}")
        if self.throttled:
            try:
                self.node.set_rate_limit(self.slot, self.qos_iops)  # the migration's write limit is released
                self.throttled = False
            except Exception as e:
                self.problems.append(f"release the write limit on VF {self.slot.vfn}: {e}")
        if self.paused and not self.suspended:
            self.vm.resume()
            self.paused = False
        return self.problems
