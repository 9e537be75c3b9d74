"""Host side of TP4165: Get LBA Status on the PF, and the allocated ranges of a namespace.

`allocated_ranges` is what a migration host's pre-copy uses: it pages through MNDW-sized answers
(continuing at the last DSLBA + NLB while CMPC says "incomplete"), joins descriptors that touch
across pages or across the 2^32-block NLB limit, and returns maximal (slba, nlb) ranges. A range
longer than RL can express (65535 blocks) is asked for with RL = 0 (to the end of the namespace)
and the answer clipped on this side.
"""

from __future__ import annotations

import numpy as np

from nvme_lm.host import commands as cmd
from nvme_lm.host.driver import NvmeDriver
from nvme_lm.spec.lba_status import Atype, Cmpc, LbaStatusHeader, decode_lba_status

__all__ = ["DEFAULT_BUFFER", "Atype", "Cmpc", "allocated_ranges", "get_lba_status"]

DEFAULT_BUFFER = 64 << 10  # bytes per command: 4095 descriptors, within any MDTS of 64 KiB or more
MAX_RL = 0xFFFF


def get_lba_status(driver: NvmeDriver, nsid: int, slba: int, *, atype: int = Atype.ALLOCATED, rl: int = 0,
                   buffer_bytes: int = DEFAULT_BUFFER) -> tuple[LbaStatusHeader, np.ndarray]:
    """One Get LBA Status: the header and its descriptors (`spec.lba_status.DESCRIPTOR_DTYPE`, NLB 0's based)."""
    if buffer_bytes < 4 or buffer_bytes % 4:
        raise ValueError("the buffer is a whole number of dwords")
    sqe = cmd.get_lba_status(nsid, slba, buffer_bytes // 4 - 1, rl, atype)
    _, data = driver.admin(sqe, read=buffer_bytes)
    return decode_lba_status(data)


def allocated_ranges(pf_driver: NvmeDriver, nsid: int, start: int = 0, length: int | None = None, *,
                     buffer_bytes: int = DEFAULT_BUFFER) -> list[tuple[int, int]]:
    """Maximal (slba, nlb) ranges that may be allocated in [start, start + length) (None: to the end)."""
    end = None if length is None else start + length
    out: list[tuple[int, int]] = []
    slba = start
    while end is None or slba < end:
        rl = 0 if end is None or end - slba > MAX_RL else end - slba
        header, desc = get_lba_status(pf_driver, nsid, slba, rl=rl, buffer_bytes=buffer_bytes)
        if len(desc):
            starts = desc["dslba"].astype(np.int64)
            stops = starts + desc["nlb"].astype(np.int64) + 1
            if end is not None:
                stops = np.minimum(stops, end)
            for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
                if a >= b:
                    continue
                if out and out[-1][0] + out[-1][1] == a:
                    out[-1] = (out[-1][0], b - out[-1][0])
                else:
                    out.append((a, b - a))
            slba = int(stops[-1])
        if header.cmpc != Cmpc.INCOMPLETE:
            break
        if not len(desc):
            raise RuntimeError(f"Get LBA Status makes no progress with a {buffer_bytes}-byte buffer")
    return out
