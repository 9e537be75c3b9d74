"""What the host driver needs from memory: DMA-able pages with bus addresses.

`nvme_lm.vm.memory.GuestMemory` provides it for guests and hypervisors alike.
"""

from __future__ import annotations

from typing import Protocol


class DmaMemory(Protocol):
    page_size: int

    def alloc(self, nbytes: int) -> int: ...

    def free(self, addr: int) -> None: ...

    def view(self, addr: int, length: int) -> memoryview: ...
