"""The host side of a sans-I/O NVMe/TCP connection: small, but enough to drive and test the target
(and for the Python initiator). Shared machinery, events and errors: connection.py."""

from __future__ import annotations

from dataclasses import dataclass

from nvme_lm.fabrics.connection import (
    _PSDT_SGL,
    C2HDataReceived,
    ConnState,
    Event,
    IcRespReceived,
    LocalProtocolError,
    R2TReceived,
    ResponseReceived,
    TermReqReceived,
    _Connection,
)
from nvme_lm.fabrics.pdu import (
    FABRICS_ICD_MAX,
    FABRICS_OPCODE,
    MAX_PDA,
    OFF_CCCID,
    OFF_IC_DGST,
    OFF_RSP_CID,
    OFF_TTAG,
    SGL_ICD,
    SGL_TRANSPORT,
    Buffer,
    C2HData,
    C2HTermReq,
    CapsuleCmd,
    CapsuleResp,
    Fes,
    H2CData,
    H2CTermReq,
    IcReq,
    IcResp,
    Pdu,
    PduError,
    PduType,
    encode_pdu,
    sgl_fields,
    split,
)
from nvme_lm.fabrics.pdu import (
    R2T as R2TPdu,
)
from nvme_lm.spec.commands import SQE


@dataclass(slots=True)
class _HostCmd:
    cid: int
    write: memoryview | None  # data to send in answer to R2Ts
    read_len: int
    r2t_next: int = 0
    active_r2ts: int = 0
    read_received: int = 0


@dataclass(slots=True)
class _HostR2T:
    cid: int
    offset: int
    length: int


class HostConnection(_Connection):
    """The host side of one NVMe/TCP connection: enough to drive a target in tests and benchmarks.

    `max_icd`: largest write sent in the capsule (8192 on the admin queue, `icd_limit(IOCCSZ)` on
    I/O queues); larger writes go through R2T/H2CData.
    """

    _controller = False

    def __init__(
        self,
        *,
        hdgst: bool = False,
        ddgst: bool = False,
        hpda: int = 0,
        maxr2t: int = 0,
        max_icd: int = FABRICS_ICD_MAX,
    ) -> None:
        if not 0 <= hpda <= MAX_PDA:
            raise ValueError(f"HPDA {hpda} outside 0..{MAX_PDA}")
        super().__init__(ConnState.IDLE, hpda)
        self.want_hdgst = hdgst
        self.want_ddgst = ddgst
        self.hpda = hpda
        self.maxr2t = maxr2t
        self.max_icd = max_icd
        self.cpda = 0
        self.maxh2cdata = 0
        self._cmds: dict[int, _HostCmd] = {}
        self._r2ts: dict[int, _HostR2T] = {}

    def send_icreq(self) -> bytes:
        if self.state is not ConnState.IDLE:
            raise LocalProtocolError("ICReq only once, first")
        self.state = ConnState.AWAIT_ICRESP
        return encode_pdu(IcReq(0, self.hpda, self.want_hdgst, self.want_ddgst, self.maxr2t))

    # ---- receive side
    def _term_pdu(self, fes: int, fei: int, header: bytes) -> Pdu:
        return H2CTermReq(fes, fei, header)

    def _check_sequence(self, ptype: int) -> None:
        if self.state is ConnState.IDLE:
            raise self._seq("PDU before ICReq was sent")
        if self.state is ConnState.AWAIT_ICRESP:
            if ptype not in (PduType.ICRESP, PduType.C2H_TERM_REQ):
                raise self._seq(f"PDU type {ptype:#x} before ICResp")
        elif ptype == PduType.ICRESP:
            raise self._seq("second ICResp")

    def _check_pdu(self, pdu: Pdu) -> None:
        if isinstance(pdu, CapsuleResp):
            if pdu.cqe.cid not in self._cmds:
                raise PduError(Fes.INVALID_HEADER_FIELD, OFF_RSP_CID, f"response for unknown CID {pdu.cqe.cid:#x}")
        elif isinstance(pdu, C2HData):
            cmd = self._cmds.get(pdu.cccid)
            if cmd is None or not cmd.read_len:
                raise PduError(Fes.INVALID_HEADER_FIELD, OFF_CCCID, f"C2HData for CID {pdu.cccid:#x}")
            datal = self._data_len
            if pdu.datao + datal > cmd.read_len:
                raise PduError(Fes.DATA_OUT_OF_RANGE, 0, "C2HData beyond the command's data")
            if pdu.datao != cmd.read_received:
                raise self._seq(f"C2HData at offset {pdu.datao}, expected {cmd.read_received}")
            if pdu.last != (cmd.read_received + datal == cmd.read_len):
                raise self._seq("LAST_PDU does not mark the end of the command's data")
        elif isinstance(pdu, R2TPdu):
            cmd = self._cmds.get(pdu.cccid)
            if cmd is None or cmd.write is None:
                raise PduError(Fes.INVALID_HEADER_FIELD, OFF_CCCID, f"R2T for CID {pdu.cccid:#x}")
            if pdu.ttag in self._r2ts:
                raise PduError(Fes.INVALID_HEADER_FIELD, OFF_TTAG, f"TTAG {pdu.ttag:#x} already in use")
            if pdu.r2to + pdu.r2tl > len(cmd.write):
                raise PduError(Fes.DATA_OUT_OF_RANGE, 0, "R2T beyond the command's data")
            if pdu.r2to != cmd.r2t_next:
                raise self._seq(f"R2T at offset {pdu.r2to}, expected {cmd.r2t_next}")
            if cmd.active_r2ts > self.maxr2t:
                raise PduError(Fes.R2T_LIMIT_EXCEEDED, 0, f"more than MAXR2T+1 = {self.maxr2t + 1} R2Ts")
        elif isinstance(pdu, IcResp) and (pdu.hdgst, pdu.ddgst) != (self.want_hdgst, self.want_ddgst):
            raise PduError(Fes.UNSUPPORTED_PARAMETER, OFF_IC_DGST, "controller did not accept our digests")

    def _handle(self, pdu: Pdu) -> Event:
        if isinstance(pdu, CapsuleResp):
            cid = pdu.cqe.cid
            del self._cmds[cid]
            for ttag in [t for t, w in self._r2ts.items() if w.cid == cid]:
                del self._r2ts[ttag]
            return ResponseReceived(pdu.cqe)
        if isinstance(pdu, C2HData):
            cmd = self._cmds[pdu.cccid]
            cmd.read_received += self._data_len
            if pdu.success:
                del self._cmds[pdu.cccid]
            return C2HDataReceived(
                pdu.cccid, pdu.datao, pdu.data, pdu.last, pdu.success, pdu.data_digest_ok  # type: ignore[arg-type]
            )
        if isinstance(pdu, R2TPdu):
            cmd = self._cmds[pdu.cccid]
            self._r2ts[pdu.ttag] = _HostR2T(pdu.cccid, pdu.r2to, pdu.r2tl)
            cmd.r2t_next += pdu.r2tl
            cmd.active_r2ts += 1
            return R2TReceived(pdu.cccid, pdu.ttag, pdu.r2to, pdu.r2tl)
        if isinstance(pdu, IcResp):
            self.hdgst, self.ddgst = pdu.hdgst, pdu.ddgst
            self.cpda = self._txpda = pdu.cpda
            self.maxh2cdata = pdu.maxh2cdata
            self.state = ConnState.READY
            return IcRespReceived(pdu.pfv, pdu.cpda, pdu.hdgst, pdu.ddgst, pdu.maxh2cdata)
        assert isinstance(pdu, C2HTermReq)
        self._terminate()
        return TermReqReceived(pdu.fes, pdu.fei, bytes(pdu.data))

    # ---- send side
    def send_command(
        self, sqe: SQE, *, data: Buffer | None = None, read_len: int = 0, in_capsule: bool | None = None,
        cid: int | None = None,
    ) -> list[Buffer]:
        """Send a command capsule; SGL1 and PSDT are filled in here.

        `data`: bytes to write (in the capsule when they fit `max_icd`, unless `in_capsule` says
        otherwise; else the target asks for them with R2Ts). `read_len`: bytes the command reads.
        `cid` (default `sqe.cid`) lets a caller reuse one SQE for many commands without copying it.
        """
        self._require_ready()
        if cid is None:
            cid = sqe.cid
        if cid in self._cmds:
            raise LocalProtocolError(f"CID {cid:#x} already outstanding")
        if data is not None and read_len:
            raise LocalProtocolError("a command moves data in one direction")
        mv = memoryview(data).cast("B") if data is not None else None
        n = len(mv) if mv is not None else 0
        limit = FABRICS_ICD_MAX if sqe.opcode == FABRICS_OPCODE else self.max_icd
        if in_capsule is None:
            in_capsule = 0 < n <= limit
        elif in_capsule and n > limit:
            raise LocalProtocolError(f"{n} bytes do not fit in the capsule ({limit})")
        if n and in_capsule:
            prp1, prp2 = sgl_fields(n, SGL_ICD)
            write, payload = None, mv
        else:
            prp1, prp2 = sgl_fields(n or read_len, SGL_TRANSPORT)
            write, payload = (mv if n else None), None
        cmd = SQE(
            sqe.opcode, (sqe.flags & 0x3F) | _PSDT_SGL, cid, sqe.nsid, sqe.cdw2, sqe.cdw3, sqe.mptr, prp1, prp2,
            sqe.cdw10, sqe.cdw11, sqe.cdw12, sqe.cdw13, sqe.cdw14, sqe.cdw15,
        )
        self._cmds[cid] = _HostCmd(cid, write, 0 if n else read_len)
        return self._encode(CapsuleCmd(cmd, payload if payload is not None else b""))

    def send_h2c_data(self, ttag: int) -> list[Buffer]:
        """All the H2CData PDUs answering one R2T (each at most MAXH2CDATA bytes, LAST_PDU on the end)."""
        self._require_ready()
        w = self._r2ts.pop(ttag, None)
        if w is None:
            raise LocalProtocolError(f"no R2T with TTAG {ttag:#x}")
        cmd = self._cmds[w.cid]
        assert cmd.write is not None
        chunks = split(cmd.write[w.offset : w.offset + w.length], self.maxh2cdata)
        out: list[Buffer] = []
        offset = w.offset
        for i, chunk in enumerate(chunks):
            out += self._encode(H2CData(w.cid, ttag, offset, chunk, i == len(chunks) - 1))
            offset += len(chunk)
        cmd.active_r2ts -= 1
        return out

    @property
    def outstanding(self) -> int:
        return len(self._cmds)


__all__ = ["HostConnection"]
