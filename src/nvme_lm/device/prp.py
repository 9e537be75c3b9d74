"""PRP walking: turns PRP1/PRP2 (and PRP lists) into memoryviews of host memory.

Rules (NVMe Base 2.x §4.1): only PRP1 may have a page offset; offsets are dword aligned;
PRP2 is either the second page or a PRP list pointer; list entries have no offset; the last
entry of a full list page chains to the next list page. Violations give PRP Offset Invalid,
addresses outside the function's IOMMU give Data Transfer Error (raised as DmaFault).
Physically adjacent pages are merged so a large transfer becomes few iovecs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from nvme_lm.pcie.iommu import DmaFault
from nvme_lm.spec import status as st

if TYPE_CHECKING:
    from nvme_lm.pcie.function import PcieFunction


def _offset_invalid(message: str) -> Exception:
    """NvmeError(PRP Offset Invalid). Imported here, on the error path only: request.py imports this
    module, and an import statement on every command would cost more than the PRP walk itself."""
    from nvme_lm.device.request import NvmeError

    return NvmeError(st.PRP_OFFSET_INVALID, message)


def prp_views(fn: PcieFunction, prp1: int, prp2: int, length: int, page_size: int,
              write: bool) -> list[memoryview]:
    if length <= 0:
        return []
    if prp1 & 0x3:
        raise _offset_invalid("PRP1 is not dword aligned")
    first = min(length, page_size - (prp1 & (page_size - 1)))
    remaining = length - first
    if remaining == 0:
        return [fn.dma_view(prp1, first, write)]
    if remaining <= page_size:
        if prp2 & (page_size - 1):
            raise _offset_invalid("PRP2 data pointer has a page offset")
        return _merge(fn, [(prp1, first), (prp2, remaining)], write)
    pages = _walk_list(fn, prp2, -(-remaining // page_size), page_size)
    spans = [(prp1, first)]
    spans.extend((int(p), page_size) for p in pages)
    last = remaining - (len(pages) - 1) * page_size
    spans[-1] = (spans[-1][0], last)
    return _merge(fn, spans, write)


def _walk_list(fn: PcieFunction, list_addr: int, count: int, page_size: int) -> np.ndarray:
    """Reads `count` page addresses from a (possibly chained) PRP list."""
    if list_addr & 0x7:
        raise _offset_invalid("PRP list pointer is not qword aligned")
    out: list[np.ndarray] = []
    got = 0
    addr = list_addr
    while got < count:
        slots = (page_size - (addr & (page_size - 1))) // 8
        need = count - got
        if need <= slots:
            entries = np.frombuffer(fn.dma_view(addr, need * 8), dtype="<u8")
            out.append(entries)
            got += need
            break
        entries = np.frombuffer(fn.dma_view(addr, slots * 8), dtype="<u8")
        out.append(entries[:-1])
        got += slots - 1
        addr = int(entries[-1])
        if addr & (page_size - 1):
            raise _offset_invalid("chained PRP list pointer is not page aligned")
    pages = np.concatenate(out) if len(out) > 1 else out[0].copy()
    if np.any(pages & np.uint64(page_size - 1)):
        raise _offset_invalid("PRP list entry has a page offset")
    return pages


def _merge(fn: PcieFunction, spans: list[tuple[int, int]], write: bool) -> list[memoryview]:
    views: list[memoryview] = []
    first = 0  # index of the first span of the run being merged
    start, size = spans[0]
    for i in range(1, len(spans)):
        addr, n = spans[i]
        if addr == start + size:
            size += n
            continue
        _run_views(fn, spans, first, i, start, size, write, views)
        first, start, size = i, addr, n
    _run_views(fn, spans, first, len(spans), start, size, write, views)
    return views


def _run_views(fn: PcieFunction, spans: list[tuple[int, int]], lo: int, hi: int, start: int, size: int,
               write: bool, out: list[memoryview]) -> None:
    """One view for IOVA-adjacent pages, or one per page when they sit in different IOMMU mappings."""
    try:
        out.append(fn.dma_view(start, size, write))
    except DmaFault:
        if hi - lo == 1:
            raise
        out.extend(fn.dma_view(a, n, write) for a, n in spans[lo:hi])
