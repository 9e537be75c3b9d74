"""Get Log Page (admin 02h): LIDs 00h, 01h, 02h, 03h, 04h, 05h and 12h, with offsets, NUMD
and RAE. Each log is built whole and the requested window is copied out, zero padded."""

from __future__ import annotations

from collections.abc import Callable

from nvme_lm.device.admin import rate_limit
from nvme_lm.device.request import Handler, NvmeError, Request
from nvme_lm.spec import status as st
from nvme_lm.spec.logs import CmdEffect as E
from nvme_lm.spec.logs import (
    CommandEffectsLog,
    ErrorLogEntry,
    FidSupportedEffectsLog,
    FirmwareSlotLog,
    LogId,
    SmartLog,
    cmd_effect,
    encode_changed_ns_list,
    encode_error_log,
    fid_effect,
    lid_support,
)
from nvme_lm.spec.opcodes import AdminOpcode as A
from nvme_lm.spec.opcodes import IoOpcode as IO

PEL_CDW10 = 40
PEL_OFFSET = 48
BROADCAST = 0xFFFFFFFF
SCOPE_NS = 1 << 0  # scope bits as the 12-bit field at 31:20
SCOPE_CTRL = 1 << 1
SCOPE_SUBSYSTEM = 1 << 4
SCOPE_CDQ = 1 << 6  # CDQSCP: FID 21h is per Controller Data Queue (TP4159, spec notes §2.4)
FID_CDQ = 0x21
CSE_NS_EXCLUSIVE = 1  # no other command to the same namespace while this one runs

# What each command changes, for the Commands Supported and Effects log.
ADMIN_EFFECTS = {
    A.NS_MANAGEMENT: cmd_effect(E.CSUPP | E.NCC | E.NIC, scope=SCOPE_SUBSYSTEM),
    A.NS_ATTACHMENT: cmd_effect(E.CSUPP | E.NIC, scope=SCOPE_CTRL),
    A.FORMAT_NVM: cmd_effect(E.CSUPP | E.LBCC | E.NCC | E.NIC, cse=CSE_NS_EXCLUSIVE, scope=SCOPE_NS),
    A.SET_FEATURES: cmd_effect(E.CSUPP | E.CCC, scope=SCOPE_CTRL),
    A.VIRTUALIZATION_MANAGEMENT: cmd_effect(E.CSUPP | E.CCC, scope=SCOPE_SUBSYSTEM),
}
IO_EFFECTS = {
    IO.WRITE: cmd_effect(E.CSUPP | E.LBCC, scope=SCOPE_NS),
    IO.WRITE_ZEROES: cmd_effect(E.CSUPP | E.LBCC, scope=SCOPE_NS),
    IO.DATASET_MANAGEMENT: cmd_effect(E.CSUPP | E.LBCC, scope=SCOPE_NS),
}
SMART_KELVIN = 313  # the emulated drive runs at 40 °C


def supported_logs(req: Request) -> bytes:
    lids = [0] * 256
    for lid in LOG_BUILDERS:
        if lid == LogId.RATE_LIMITING and req.ctrl.subsystem.rate_limits is None:
            continue  # no TP4176 limits in this subsystem (e.g. behind a fabric): its builder refuses 28h
        lids[lid] = lid_support()
    return b"".join(v.to_bytes(4, "little") for v in lids)


def error_log(req: Request) -> bytes:
    ctrl = req.ctrl
    entries = [
        ErrorLogEntry(error_count=e.error_count, sqid=e.sqid, cid=e.cid, status=e.status_field << 1,
                      pel=e.param_location, lba=e.lba, nsid=e.nsid)
        for e in ctrl.error_log.newest_first()
    ]
    entries += [ErrorLogEntry()] * (ctrl.error_log.capacity - len(entries))
    return encode_error_log(entries)


def smart_log(req: Request) -> bytes:
    nsid = req.sqe.nsid
    if nsid not in (0, BROADCAST):
        raise NvmeError(st.INVALID_FIELD, "SMART log is not kept per namespace", 4)
    s = req.ctrl.subsystem.smart
    return SmartLog(
        temperature=SMART_KELVIN, avail_spare=100, spare_thresh=10, data_units_read=s.data_units_read,
        data_units_written=s.data_units_written, host_read_commands=s.host_read_commands,
        host_write_commands=s.host_write_commands, controller_busy_time=s.controller_busy_minutes,
        power_cycles=s.power_cycles, power_on_hours=s.power_on_hours, unsafe_shutdowns=s.unsafe_shutdowns,
        media_errors=s.media_errors, num_err_log_entries=req.ctrl.error_log.count,
        temperature_sensor=[SMART_KELVIN] + [0] * 7,
    ).encode()


def firmware_slot_log(req: Request) -> bytes:
    return FirmwareSlotLog(afi=1, frs=[req.ctrl.model.firmware_revision] + [""] * 6).encode()


def changed_ns_log(req: Request) -> bytes:
    data = encode_changed_ns_list(req.ctrl.changed_namespaces)
    if not req.sqe.cdw10 & (1 << 15):  # RAE=0: reading clears the list
        req.ctrl.changed_namespaces = []
    return data


def command_effects_log(req: Request) -> bytes:
    ctrl = req.ctrl
    acs = [0] * 256
    iocs = [0] * 256
    for op in ctrl.admin_handlers:
        acs[op] = ADMIN_EFFECTS.get(op, cmd_effect(E.CSUPP))
    for op in ctrl.io_handlers:
        iocs[op] = IO_EFFECTS.get(op, cmd_effect(E.CSUPP))
    return CommandEffectsLog(acs=acs, iocs=iocs).encode()


def fid_effects_log(req: Request) -> bytes:
    fids = [0] * 256
    for fid, spec in req.ctrl.features.specs.items():
        fids[fid] = fid_effect(scope=SCOPE_NS if spec.ns_specific else SCOPE_CDQ if fid == FID_CDQ else SCOPE_CTRL)
    return FidSupportedEffectsLog(fids=fids).encode()


LOG_BUILDERS: dict[int, Callable[[Request], bytes]] = {
    LogId.SUPPORTED_LOG_PAGES: supported_logs,
    LogId.ERROR: error_log,
    LogId.SMART: smart_log,
    LogId.FW_SLOT: firmware_slot_log,
    LogId.CHANGED_NS: changed_ns_log,
    LogId.CMD_EFFECTS: command_effects_log,
    LogId.FID_SUPPORTED_EFFECTS: fid_effects_log,
    LogId.RATE_LIMITING: rate_limit.log_page,  # TP4176: all controllers on the PF, itself on a VF
}


def get_log_page(req: Request) -> st.Status:
    sqe = req.sqe
    lid = sqe.cdw10 & 0xFF
    rae = bool(sqe.cdw10 & (1 << 15))
    numd = ((sqe.cdw10 >> 16) | (sqe.cdw11 & 0xFFFF) << 16) + 1
    offset = sqe.cdw12 | sqe.cdw13 << 32
    build = (LOG_BUILDERS if req.ctrl.export is None else req.ctrl.export.log_builders).get(lid)
    if build is None:
        raise NvmeError(st.INVALID_LOG_PAGE, f"log page {lid:#04x} not supported", PEL_CDW10)
    if offset & 0x3:
        raise NvmeError(st.INVALID_FIELD, "log page offset is not dword aligned", PEL_OFFSET)
    length = numd * 4
    mdts = req.ctrl.model.mdts
    if mdts and length > 4096 << (req.ctrl.cap.mpsmin + mdts):
        raise NvmeError(st.INVALID_FIELD, f"{length} bytes exceeds MDTS", PEL_CDW10 + 2)
    data = build(req)
    if offset >= len(data) and length:
        raise NvmeError(st.INVALID_FIELD, f"offset {offset} beyond the {len(data)}-byte log", PEL_OFFSET)
    window = data[offset : offset + length]
    req.write_to_host(window, length)
    if not rae:
        req.ctrl.events.log_page_read(lid)
        req.ctrl.deliver_events()
    return st.SUCCESS


HANDLERS: dict[int, Handler] = {A.GET_LOG_PAGE: get_log_page}
