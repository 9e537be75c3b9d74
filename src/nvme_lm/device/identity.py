"""What a controller says about itself and its namespaces: the Identify data structures.

Built from the device model, the subsystem and the controller. Issue 3's exported-subsystem
templates replace these values for VFs, which is why they are assembled in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nvme_lm.device import rate_limit
from nvme_lm.spec.identify import (
    CMIC,
    OACS,
    ONCS,
    TRATTR,
    IdentifyController,
    IdentifyNamespace,
    LbaFormat,
    NvmIdentifyController,
    NvmIdentifyNamespace,
    PowerStateDescriptor,
)
from nvme_lm.spec.opcodes import AdminOpcode
from nvme_lm.spec.registers import VS_2_1

if TYPE_CHECKING:
    from nvme_lm.device.controller import Controller
    from nvme_lm.device.namespace import Namespace

OAES_NS_ATTRIBUTE_NOTICES = 1 << 8
LPA_CMD_EFFECTS = 1 << 1
LPA_EXTENDED_DATA = 1 << 2
VWC_PRESENT_FLUSH_ALL = 0x07  # present, and Flush with NSID FFFFFFFFh is supported
NSFEAT_THINP = 1 << 0
DLFEAT_READ_ZEROES = 0x01
DLFEAT_WZ_DEAC = 1 << 3
AOCS_RALBAS = 1 << 0  # NVM Identify Controller AOCS: Get LBA Status ATYPE 02h supported (TP4165)


def cmic(ctrl: Controller) -> int:
    """CMIC: bit 1 when the subsystem has (or may have) more than one controller, as with SR-IOV
    VFs; bit 2 on a controller behind an SR-IOV virtual function (docs/sriov.md)."""
    value = 0
    if ctrl.model.max_vfs > 0 or len(ctrl.subsystem.controllers) > 1:
        value |= CMIC.MULTI_CTRL
    if ctrl.fn.is_virtual:
        value |= CMIC.SRIOV_VF
    return int(value)


def identify_controller(ctrl: Controller) -> IdentifyController:
    if ctrl.export is not None:  # bound to an exported NVM subsystem: its template answers (device/exported.py)
        return ctrl.export.identify_controller(ctrl)
    m = ctrl.model
    sub = ctrl.subsystem
    oacs = 0
    for opcode, bit in ((AdminOpcode.FORMAT_NVM, OACS.FORMAT), (AdminOpcode.NS_MANAGEMENT, OACS.NS_MGMT),
                        (AdminOpcode.DOORBELL_BUFFER_CONFIG, OACS.DBBUF),
                        (AdminOpcode.VIRTUALIZATION_MANAGEMENT, OACS.VMS),
                        (AdminOpcode.GET_LBA_STATUS, OACS.GET_LBA_STATUS),
                        (AdminOpcode.MIGRATION_SEND, OACS.HMLMS)):  # TP4159: the MMC only (D9)
        if opcode in ctrl.admin_handlers:
            oacs |= bit
    oncs = ONCS.SAVE_SELECT | ONCS.TIMESTAMP
    for opcode, bit in ((0x05, ONCS.COMPARE), (0x09, ONCS.DSM), (0x08, ONCS.WRITE_ZEROES), (0x0C, ONCS.VERIFY)):
        if opcode in ctrl.io_handlers:
            oncs |= bit
    psd = [PowerStateDescriptor() for _ in range(32)]
    psd[0] = PowerStateDescriptor(mp=int(m.power_state_watts * 100), enlat=0, exlat=0)
    return IdentifyController(**cdq_limits(ctrl),
        vid=m.vendor_id, ssvid=m.subsystem_vendor_id, sn=sub.serial, mn=m.model_number, fr=m.firmware_revision,
        rab=6, ieee=m.ieee_oui, cmic=cmic(ctrl), mdts=m.mdts, cntlid=ctrl.cntlid, ver=VS_2_1,
        oaes=OAES_NS_ATTRIBUTE_NOTICES | rate_limit.oaes_bits(ctrl), cntrltype=1, oacs=int(oacs), acl=m.acl,
        aerl=m.aerl, frmw=0x03,
        lpa=LPA_CMD_EFFECTS | LPA_EXTENDED_DATA, elpe=m.error_log_entries - 1, npss=0, wctemp=343, cctemp=373,
        tnvmcap=sub.capacity_bytes, unvmcap=sub.unallocated_capacity_bytes,
        kas=max(1, m.keep_alive_granularity_ms // 100),
        sqes=0x66, cqes=0x44, nn=m.max_namespaces, oncs=int(oncs), vwc=VWC_PRESENT_FLUSH_ALL, subnqn=sub.nqn, psd=psd,
    )


def cdq_limits(ctrl: Controller) -> dict[str, int]:
    """TP4159 tracking limits and TRATTR where the tracking commands run (the PF), else zeroes
    (docs/tracking.md; granularities are log2 of bytes)."""
    from nvme_lm.spec import cdq as c

    trattr = 0
    if AdminOpcode.TRACK_SEND in ctrl.admin_handlers:
        trattr |= TRATTR.THMCS | TRATTR.TUDCS
    if AdminOpcode.CONTROLLER_DATA_QUEUE not in ctrl.admin_handlers:
        return {"trattr": int(trattr)}
    return {"trattr": int(trattr), "cmmrtd": c.CMMRTD, "nmmrtd": c.NMMRTD, "minmrtg": c.MINMRTG,
            "maxmrtg": c.MAXMRTG, "mcudmq": c.MCUDMQ, "mnsudmq": c.MNSUDMQ, "mcmr": c.MCMR, "nmcmr": c.NMCMR,
            "mcdqpc": c.MCDQPC}


def lba_formats(ctrl: Controller) -> list[LbaFormat]:
    fmts = [LbaFormat() for _ in range(64)]
    for i, size in enumerate(ctrl.model.lba_data_sizes):
        fmts[i] = LbaFormat(ms=0, lbads=size.bit_length() - 1, rp=0 if size == 4096 else 2)
    return fmts


def identify_namespace(ctrl: Controller, ns: Namespace | None) -> IdentifyNamespace:
    """Identify Namespace for `ns`, or the capabilities common to all namespaces when None."""
    if ctrl.export is not None:
        return ctrl.export.identify_namespace(ns)
    fmts = lba_formats(ctrl)
    nlbaf = len(ctrl.model.lba_data_sizes) - 1
    if ns is None:
        return IdentifyNamespace(nlbaf=nlbaf, dlfeat=DLFEAT_READ_ZEROES | DLFEAT_WZ_DEAC, lbaf=fmts)
    index = ctrl.model.lba_data_sizes.index(ns.lba_size)
    return IdentifyNamespace(
        nsze=ns.nsze, ncap=ns.nsze, nuse=ns.nuse, nsfeat=NSFEAT_THINP, nlbaf=nlbaf,
        flbas=(index & 0xF) | ((index >> 4) & 0x3) << 5, nmic=ns.info.nmic & 1,  # shared: hosts multipath on it
        dlfeat=DLFEAT_READ_ZEROES | DLFEAT_WZ_DEAC,
        nvmcap=ns.nsze * ns.lba_size, nguid=bytes.fromhex(ns.info.nguid), eui64=bytes.fromhex(ns.info.eui64),
        lbaf=fmts,
    )


def nvm_identify_namespace(ctrl: Controller, ns: Namespace) -> NvmIdentifyNamespace:
    if ctrl.export is not None:
        return ctrl.export.nvm_identify_namespace()
    # TLBAAG (TP4165) where Get LBA Status runs, else 0 = not reported (docs/allocation-tracking.md)
    return NvmIdentifyNamespace(tlbaag=ns.alloc.tlbaag if AdminOpcode.GET_LBA_STATUS in ctrl.admin_handlers else 0)


def nvm_identify_controller(ctrl: Controller) -> NvmIdentifyController:
    if ctrl.export is not None:
        return ctrl.export.nvm_identify_controller()
    aocs = AOCS_RALBAS if AdminOpcode.GET_LBA_STATUS in ctrl.admin_handlers else 0  # TP4165
    return NvmIdentifyController(ver=0x00010100, aocs=aocs, **rate_limit.identify_fields(ctrl))  # RLA/SLMC (TP4176)
