"""Builds PRP1/PRP2 (and PRP lists) for a buffer, as a host driver must before submitting."""

from __future__ import annotations

import numpy as np

from nvme_lm.host.memory import DmaMemory


class PrpBuilder:
    """PRPs for a buffer in `mem`; `page_size` is the controller's memory page size (CC.MPS)."""

    def __init__(self, mem: DmaMemory, page_size: int = 4096) -> None:
        self.mem = mem
        self.page_size = page_size

    def build(self, addr: int, length: int) -> tuple[int, int, list[int]]:
        """(prp1, prp2, list pages to free after completion) for a physically contiguous buffer."""
        ps = self.page_size
        first = min(length, ps - (addr % ps))
        if length <= first:
            return addr, 0, []
        rest = addr + first
        remaining = length - first
        if remaining <= ps:
            return addr, rest, []
        pages = np.arange(rest, rest + remaining, ps, dtype=np.uint64)
        return (addr, *self._write_list(pages))

    def build_pages(self, first_addr: int, first_len: int, pages: list[int]) -> tuple[int, int, list[int]]:
        """PRPs for a scattered buffer: a first (possibly offset) piece, then whole pages."""
        if not pages:
            return first_addr, 0, []
        if len(pages) == 1:
            return first_addr, pages[0], []
        return (first_addr, *self._write_list(np.asarray(pages, dtype=np.uint64)))

    def _write_list(self, pages: np.ndarray) -> tuple[int, list[int]]:
        per = self.page_size // 8
        lists: list[int] = []
        i = 0
        head = 0
        prev_view = None
        while i < len(pages):
            lp = self.mem.alloc(self.page_size)
            view = np.frombuffer(self.mem.view(lp, self.page_size), dtype="<u8")
            if prev_view is None:
                head = lp
            else:
                prev_view[per - 1] = lp  # chain: last entry of the previous list page
            lists.append(lp)
            left = len(pages) - i
            n = left if left <= per else per - 1
            view[:n] = pages[i : i + n]
            mark = getattr(self.mem, "mark_dirty", None)
            if mark is not None:
                mark(lp, self.page_size)
            i += n
            prev_view = view
        return head, lists
