"""Our NVMe/TCP target against an unmodified Linux host: kernel 6.1's nvme-tcp, nvme-cli 2.3 and fio 3.33 in a
Debian 12 guest (../shared/tools/guest/). One guest boot per configuration runs guest/nvme-tcp-interop.sh, which
writes one output per step; each test below checks one step against our own answers (our Python initiator's
Identify, log and feature data, decoded with our spec decoders) or against the host's view of the namespace file.

    make interop                                   # or: .venv/bin/python -m pytest -q -m interop tests/interop
    NVME_INTEROP_FIO_RUNTIME=10 make interop       # a quicker fio run (default 60 s, as issue 7 asks)
    NVME_INTEROP_CONFIGS=device make interop       # one configuration only (device, exported)

Runs are kept under tests/interop/runs/<timestamp>-<config>/ (not in git). docs/nvme-tcp.md "Interop with the
Linux host" describes what is checked and what was found.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterator

import pytest

from nvme_lm.spec.identify import IdentifyController, IdentifyNamespace, decode_ns_descs
from nvme_lm.spec.lba_status import HEADER_SIZE, LbaStatusDescriptor, LbaStatusHeader
from nvme_lm.spec.logs import CommandEffectsLog, FirmwareSlotLog, SmartLog
from nvme_lm.spec.opcodes import AdminOpcode
from tests.interop import harness as H

pytestmark = [pytest.mark.interop, pytest.mark.timeout(1800)]
if (_why := H.skip_reason()) is not None:
    pytestmark.append(pytest.mark.skip(reason=_why))

FIO_RUNTIME = int(os.environ.get("NVME_INTEROP_FIO_RUNTIME", "60"))
NR_IO_QUEUES, NR_WRITE_QUEUES = 2, 2  # 4 I/O queues (2 default + 2 read) on the guest's 2 vCPUs
GUEST_ENV = {
    "FIO_RUNTIME": str(FIO_RUNTIME), "FIO_NUMJOBS": "4", "FIO_IODEPTH": "32",
    "FIO_BSSPLIT": "4k/40:8k/15:16k/15:32k/10:64k/10:128k/5:512k/5", "FIO_AREA_MIB": "32",
    "NR_IO_QUEUES": str(NR_IO_QUEUES), "NR_WRITE_QUEUES": str(NR_WRITE_QUEUES),
    "KEEP_OFFSET_MIB": "192", "KEEP_MIB": "16", "DSM_OFFSET_MIB": "224", "LIVE_OFFSET_MIB": "160",
    "LIVE_RUNTIME": "30",
}
CONFIGS = {
    # the quick default: the device's own identity, namespace 1 on a sparse file
    "device": ["--size-mib", "256"],
    # an exported NVM subsystem (TP4193) with its template's identity, as a VF bound to it shows it
    "exported": ["--size-mib", "256", "--model", "vendor-a", "--template", "generic-v1"],
}
SELECTED = [c for c in os.environ.get("NVME_INTEROP_CONFIGS", ",".join(CONFIGS)).split(",") if c in CONFIGS]
KNOWN_KERNEL_NOTICES = (
    # kernel 6.1 warns once about any I/O command whose effects log entry has more than CSUPP|LBCC, and NVMe 2.0's
    # Command Scope bits (31:20) are such bits: harmless (QEMU 7.2 reports no scope)
    re.compile(r"IO command:[0-9a-f]+ has unusual effects"),
)


@pytest.fixture(scope="module", params=SELECTED)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[H.InteropRun]:
    name = request.param
    args = list(CONFIGS[name])
    host = H.guest_hostnqn()
    if host is not None:  # the allow-list in use: the guest and our own initiator, nobody else
        args += ["--allow-host", host, "--allow-host", H.PROBE_HOST]
    r = H.run_session(name, work=tmp_path_factory.mktemp(f"interop-{name}"), target_args=args, guest_env=GUEST_ENV)
    summary = json.loads((r.dir / "summary.json").read_text())
    slow = sorted(r.steps.values(), key=lambda s: -s.ms)[:5]
    print(f"\ninterop run {name}: {r.dir} (guest rc {r.guest_rc}, {r.wall_s:.0f} s, boot "
          f"{summary['timing'].get('boot_to_job_ms')} ms, restarts {summary['restart_s']} s; slowest steps "
          + ", ".join(f"{s.name} {s.ms} ms" for s in slow) + f")\nfio: {json.dumps(summary['fio'])}")
    yield r


# ------------------------------------------------------------------------------------------ helpers
def _norm(v: object) -> object:
    """nvme-cli JSON values as our decoders give them (128-bit counters are strings, ASCII is padded)."""
    if isinstance(v, str):
        return int(v) if v.isdigit() else v.rstrip()
    return v


def _ours_ctrl(run: H.InteropRun) -> IdentifyController:
    return IdentifyController.decode(run.ours_bytes("id-ctrl.bin"))


def _ours_ns(run: H.InteropRun) -> IdentifyNamespace:
    return IdentifyNamespace.decode(run.ours_bytes("id-ns.bin"))


def _compare_json(doc: dict[str, object], ours: object, *, skip: set[str]) -> list[str]:
    """Every scalar key of nvme-cli's JSON that is a field of our decoded structure, compared."""
    problems = []
    compared = 0
    for key, value in doc.items():
        if key in skip or isinstance(value, (list, dict)) or not hasattr(ours, key):
            continue
        mine = getattr(ours, key)
        if isinstance(mine, bytes):  # identifiers: hex strings (a UUID's dashes dropped)
            mine, value = mine.hex(), str(value).replace("-", "")
        else:
            mine, value = (mine.rstrip() if isinstance(mine, str) else mine), _norm(value)
        compared += 1
        if value != mine:
            problems.append(f"{key}: guest {value!r}, ours {mine!r}")
    assert compared > 20, f"only {compared} fields compared"
    return problems


def _lba_ranges(data: bytes) -> list[tuple[int, int]]:
    head = LbaStatusHeader.decode(data)
    out = []
    for i in range(head.nlsd):
        d = LbaStatusDescriptor.decode(data, HEADER_SIZE + 16 * i)
        out.append((d.dslba, d.count))
    return out


def _geometry(run: H.InteropRun) -> dict[str, int]:
    text = run.guest_file("dsm-geometry")
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split())}


def _has_admin(run: H.InteropRun, opcode: int) -> bool:
    effects = run.ours_bytes("log-05.bin") if (run.dir / "ours" / "log-05.bin").exists() else bytes(4096)
    return bool(int.from_bytes(effects[4 * opcode : 4 * opcode + 4], "little") & 1)


def _dmesg_phases(run: H.InteropRun) -> dict[str, list[str]]:
    """The guest's kernel log cut at the job's markers: "main", "negative" (refused Connects), "live-restart"."""
    phases: dict[str, list[str]] = {"main": [], "negative": [], "live-restart": []}
    cur = "main"
    for line in run.guest_file("dmesg.txt").splitlines():
        m = re.search(r"nvme-lm-interop: (\S+) (begin|end)", line)
        if m:
            cur = m.group(1) if m.group(2) == "begin" else "main"
            continue
        phases[cur].append(line)
    return phases


def _target_connects(log: str, nqn: str) -> list[tuple[str, str, str]]:
    """(queue kind, QID, CNTLID) of every Connect the target accepted for subsystem `nqn`."""
    return re.findall(r"connected (admin|I/O) queue (\d+) \(.*?\) of controller (\d+), subsystem " + re.escape(nqn),
                      log)


# ------------------------------------------------------------------------------------------ the session itself
def test_guest_job_ran(run: H.InteropRun) -> None:
    assert run.guest_rc == 0, f"guest job status {run.guest_rc} (see {run.out / 'console.log'})"
    assert run.steps, "no step ran"
    assert "disconnect" in run.steps and "restart-disconnect" in run.steps, "the job did not reach its end"


def test_discover(run: H.InteropRun) -> None:
    doc = run.ok("discover-json").json()
    assert isinstance(doc, dict)
    (rec,) = [r for r in doc["records"] if r["subnqn"] == run.nqn]
    assert (rec["trtype"], rec["adrfam"], rec["subtype"]) == ("tcp", "ipv4", "nvme subsystem")
    assert (rec["traddr"], rec["trsvcid"], rec["portid"]) == (H.TARGET_ADDR, str(run.port), 1)
    assert rec["sectype"] == "none"
    assert len(doc["records"]) == 1  # the allow-listed host sees its one subsystem, no current-discovery entry
    assert run.nqn in run.ok("discover").text


def test_connects_the_target_refuses(run: H.InteropRun) -> None:
    bad_host, bad_nqn = run.step("connect-bad-host"), run.step("connect-bad-nqn")
    assert bad_host.rc != 0 and bad_nqn.rc != 0
    kernel = "\n".join(_dmesg_phases(run)["negative"])
    if H.guest_hostnqn() is not None:  # an allow-list is in use
        assert "is not allowed, hostnqn: nqn.2014-08.org.example:not-on-the-allow-list" in kernel, kernel
        assert "Connect Invalid Host" in run.target_log(1)
    assert 'Connect Invalid Data Parameter, subsysnqn "nqn.2014-08.org.example:no-such-subsystem"' in kernel, kernel
    assert "no subsystem 'nqn.2014-08.org.example:no-such-subsystem'" in run.target_log(1)


def test_connect_with_several_io_queues(run: H.InteropRun) -> None:
    run.ok("connect")
    sysfs = dict(line.split("=", 1) for line in run.guest_file("sysfs-ctrl.txt").splitlines() if "=" in line)
    assert sysfs["transport"] == "tcp" and sysfs["state"] == "live" and sysfs["subsysnqn"] == run.nqn
    assert int(sysfs["queue_count"]) == 1 + NR_IO_QUEUES + NR_WRITE_QUEUES
    assert f"traddr={H.TARGET_ADDR},trsvcid={run.port}" in sysfs["address"]
    log = run.target_log(1)
    io_connects = re.findall(r"connected I/O queue (\d+) \(\d+ entries[^)]*\) of controller (\d+)", log)
    ctrl_ids = {c for _, c in io_connects}
    assert {q for q, c in io_connects if c == sysfs["cntlid"]} == {str(q) for q in range(1, 5)}, ctrl_ids
    dmesg = run.guest_file("dmesg.txt")
    assert f"creating {NR_IO_QUEUES + NR_WRITE_QUEUES} I/O queues" in dmesg
    assert f"mapped {NR_IO_QUEUES}/{NR_WRITE_QUEUES}/0 default/read/poll queues" in dmesg


def test_list(run: H.InteropRun) -> None:
    ours, ns = _ours_ctrl(run), _ours_ns(run)
    lba = 1 << ns.lbaf[ns.format_index].lbads
    doc = run.ok("list-json").json()
    (dev,) = [d for d in doc["Devices"] if d["SerialNumber"].strip() == ours.sn.strip()]  # type: ignore[index]
    assert dev["ModelNumber"].strip() == ours.mn.strip() and dev["Firmware"].strip() == ours.fr.strip()
    assert (dev["NameSpace"], dev["MaximumLBA"], dev["SectorSize"]) == (H.NSID, ns.nsze, lba)
    assert dev["PhysicalSize"] == ns.nsze * lba and dev["UsedBytes"] == ns.nuse * lba
    subs = run.ok("list-subsys-json").json()
    paths = [p for host in subs for s in host["Subsystems"] if s["NQN"] == run.nqn for p in s["Paths"]]  # type: ignore[union-attr]
    assert [(p["Transport"], p["State"]) for p in paths] == [("tcp", "live")]
    assert f"traddr={H.TARGET_ADDR},trsvcid={run.port}" in paths[0]["Address"]
    assert "0x1" in run.ok("list-ns").text


def test_id_ctrl_json_field_by_field(run: H.InteropRun) -> None:
    doc = run.ok("id-ctrl-json").json()
    assert isinstance(doc, dict)
    guest = IdentifyController.decode(run.ok("id-ctrl-bin").out)
    ours = _ours_ctrl(run)
    # the guest's JSON against the guest's own raw bytes decoded by us: our decoder and nvme-cli agree
    assert _compare_json(doc, guest, skip={"fguid"}) == []
    # and against what our own initiator read (another controller of the same subsystem: CNTLID differs)
    assert _compare_json(doc, ours, skip={"fguid", "cntlid"}) == []
    assert doc["fguid"].replace("-", "") == ours.fguid.hex()
    psd = ours.psd[0]
    assert (doc["psds"][0]["max_power"], doc["psds"][0]["entry_lat"], doc["psds"][0]["exit_lat"]) == (
        psd.mp, psd.enlat, psd.exlat)
    assert len(doc["psds"]) == ours.npss + 1
    # the fabrics fields a Linux host requires
    assert (doc["cntrltype"], doc["icdoff"], doc["sgls"] & 3, doc["subnqn"]) == (1, 0, 1, run.nqn)
    assert doc["kas"] > 0 and doc["ioccsz"] >= 4 and doc["iorcsz"] == 1
    sysfs = dict(line.split("=", 1) for line in run.guest_file("sysfs-ctrl.txt").splitlines() if "=" in line)
    assert doc["cntlid"] == int(sysfs["cntlid"])


def test_id_ctrl_binary_byte_for_byte(run: H.InteropRun) -> None:
    guest = bytearray(run.ok("id-ctrl-bin").out)
    ours = bytearray(run.ours_bytes("id-ctrl.bin"))
    assert len(guest) == len(ours) == 4096
    guest[78:80] = ours[78:80] = b"\0\0"  # CNTLID: each Connect gets its own controller
    diff = [i for i in range(4096) if guest[i] != ours[i]]
    assert not diff, f"Identify Controller bytes differ at {diff[:20]}"


def test_id_ns(run: H.InteropRun) -> None:
    doc = run.ok("id-ns-json").json()
    assert isinstance(doc, dict)
    guest_bin = run.ok("id-ns-bin").out
    ours_bin = run.ours_bytes("id-ns.bin")
    guest, ours = IdentifyNamespace.decode(guest_bin), _ours_ns(run)
    assert _compare_json(doc, guest, skip=set()) == []
    assert _compare_json(doc, ours, skip=set()) == []
    assert [(f["ms"], f["ds"], f["rp"]) for f in doc["lbafs"]] == [
        (f.ms, f.lbads, f.rp) for f in ours.lbaf[: ours.nlbaf + 1]]
    assert guest_bin == ours_bin, "Identify Namespace differs (nothing was written between the two reads)"


def test_ns_descs(run: H.InteropRun) -> None:
    doc = run.ok("ns-descs-json").json()
    ours = decode_ns_descs(run.ours_bytes("ns-descs.bin"))
    guest = [(d["nidt"], d[d["type"]]) for d in doc["ns-descs"]]  # type: ignore[index]
    expect = []
    for nidt, nid in ours:
        text = str(uuid.UUID(bytes=bytes(nid))) if nidt == 3 else str(nid[0]) if nidt == 4 else nid.hex()
        expect.append((nidt, text))
    assert guest == expect


def test_io_command_set_specific_identify(run: H.InteropRun) -> None:
    assert run.ok("nvm-id-ctrl-bin").out == run.ours_bytes("nvm-id-ctrl.bin")  # CNS 06h, CSI 00h
    assert run.ok("nvm-id-ns-bin").out == run.ours_bytes("nvm-id-ns.bin")  # CNS 05h, CSI 00h
    common = IdentifyNamespace.decode(run.ours_bytes("id-ns-broadcast.bin"))  # NSID FFFFFFFFh: what all share
    assert _compare_json(run.ok("id-ns-broadcast-json").json(), common, skip=set()) == []  # type: ignore[arg-type]


def test_identify_io_command_set_structure(run: H.InteropRun) -> None:
    s = run.step("id-iocs")
    if run.name == "exported":
        # an exported identity answers only its template's CNS values and generic-v1 (a versioned lie that never
        # changes) lists no 1Ch; the device's own identity does (docs/nvme-tcp.md, section 8)
        assert s.rc != 0 and "Invalid Field in Command" in s.err + s.text
        return
    assert s.rc == 0, s.err
    assert re.search(r"\[0\]\s*:\s*(0x)?1\b", s.text), s.text  # combination 0: the NVM command set alone


def test_properties(run: H.InteropRun) -> None:
    cap = run.ok("get-property-cap").text
    assert "Maximum Queue Entries Supported" in cap and "NVM command set is Supported" in cap
    assert "20100" in run.ok("get-property-vs").text  # VS 2.1.0
    cc = int(run.ok("get-property-cc").text.rsplit(":", 1)[1], 16)
    assert cc & 1 and (cc >> 16) & 0xF == 6 and (cc >> 20) & 0xF == 4, f"CC {cc:#x}"  # EN, IOSQES 6, IOCQES 4
    assert "Ready                          (RDY): Yes" in run.ok("get-property-csts").text


def test_every_advertised_log_page(run: H.InteropRun) -> None:
    assert run.ok("get-log-00").out == run.ours_bytes("log-00.bin")
    lids = run.guest_file("lids").split()
    assert lids == run.ours["lids"] and len(lids) >= 5
    for lid in lids:
        s = run.ok(f"get-log-{lid}")
        assert len(s.out) == H.LOG_LENGTHS.get(int(lid, 16), 4096), lid
    for lid in ("03", "05", "12"):  # logs that do not change while the host works
        if lid in lids:
            assert run.step(f"get-log-{lid}").out == run.ours_bytes(f"log-{lid}.bin"), f"log {lid}h differs"
    if "05" in lids:  # a log page offset (LPO): the second half of the effects log
        assert run.ok("get-log-05-lpo").out == run.ours_bytes("log-05.bin")[2048:]
    fw = FirmwareSlotLog.decode(run.step("get-log-03").out)
    fw_doc = run.ok("fw-log-json").json()
    assert fw.active_slot >= 1 and json.dumps(fw_doc).count(fw.frs[fw.active_slot - 1].strip()) >= 1
    (eff,) = run.ok("effects-log-json").json()  # type: ignore[misc]
    ours = CommandEffectsLog.decode(run.ours_bytes("log-05.bin"))
    shown = {**{("acs", int(k.split()[0][4:])): v for k, v in eff["admin_cmd_set"].items()},
             **{("iocs", int(k.split()[0][5:])): v for k, v in eff["io_cmd_set"].items()}}
    assert shown == {**{("acs", op): v for op, v in enumerate(ours.acs) if v},
                     **{("iocs", op): v for op, v in enumerate(ours.iocs) if v}}


def test_smart_log(run: H.InteropRun) -> None:
    doc = run.ok("smart-log-json").json()
    raw = SmartLog.decode(run.ok("get-log-02").out)
    for key in ("critical_warning", "temperature", "avail_spare", "spare_thresh", "percent_used", "power_cycles",
                "unsafe_shutdowns", "media_errors"):
        assert _norm(doc[key]) == getattr(raw, key), key  # type: ignore[index]
    after = run.ok("smart-log-after-json").json()
    fio = H.fio_figures(run.out / "fio-verify.json")
    assert fio is not None
    written, reads = fio["write"], fio["read"]  # type: ignore[index]
    if int(after["host_write_commands"]) == 0:  # type: ignore[index]
        pytest.skip("this identity does not count I/O in SMART (template: I/O counters not reported)")
    assert int(after["host_write_commands"]) - int(doc["host_write_commands"]) >= written["total_ios"]  # type: ignore[index]
    assert int(after["host_read_commands"]) - int(doc["host_read_commands"]) >= reads["total_ios"]  # type: ignore[index]
    units = int(after["data_units_written"]) - int(doc["data_units_written"])  # type: ignore[index]
    assert units >= written["io_bytes"] // 512000  # thousands of 512-byte units, rounded up


def test_error_log_shows_the_failed_read(run: H.InteropRun) -> None:
    bad = run.step("read-past-end")
    assert bad.rc != 0 and "LBA Out of Range" in bad.err + bad.text
    doc = run.ok("error-log-json").json()
    newest = doc["errors"][0]  # type: ignore[index]
    sct_sc = newest["status_field"] & 0x7FF  # nvme-cli shows the status field without the phase tag
    assert sct_sc == 0x080, f"newest error entry status {newest['status_field']:#x}"
    assert newest["sqid"] >= 1 and newest["nsid"] == H.NSID and newest["error_count"] >= 1
    entries = len(doc["errors"])  # type: ignore[arg-type]
    assert entries == _ours_ctrl(run).elpe + 1


def test_every_supported_feature(run: H.InteropRun) -> None:
    fids = run.guest_file("fids").split()
    assert fids == run.ours["fids"] and fids
    ours = run.ours["features"]
    assert isinstance(ours, dict)
    for fid in fids:
        cur = run.ok(f"get-feature-{fid}").text
        caps = run.ok(f"get-feature-{fid}-sel3").text
        m = re.search(r"Current value:(?:0x)?([0-9a-fA-F]+)", cur)
        c = re.search(r"Supported capabilities value:(?:0x)?([0-9a-fA-F]+)", caps)
        assert m and c, (fid, cur, caps)
        value, capv = int(m.group(1), 16), int(c.group(1), 16)
        assert capv == ours[fid]["sel3"], f"FID {fid}h capabilities: guest {capv:#x}, ours {ours[fid]['sel3']:#x}"
        if fid == "07":  # what the kernel asked for: 4 I/O queues (0's based, SQs and CQs)
            n = NR_IO_QUEUES + NR_WRITE_QUEUES - 1
            assert value == n | n << 16, f"{value:#x}"
        elif fid == "0f":  # the kernel's default KATO: 5 s
            assert value == 5000
        elif fid == "0b":  # the kernel enables the notices it handles (at least namespace attribute changes)
            assert value & 0x100
        elif fid == "0e":  # the kernel set the timestamp at connect: within a day of the host's clock
            ts = int.from_bytes(bytes.fromhex("".join(re.findall(r"\b[0-9a-f]{2}\b", cur.split(":", 2)[-1])[:6])),
                                "little")
            assert abs(ts / 1000 - time.time()) < 86400, ts
        else:
            assert value == ours[fid]["sel0"], f"FID {fid}h: guest {value:#x}, ours {ours[fid]['sel0']:#x}"


def test_set_features_round_trip(run: H.InteropRun) -> None:
    run.ok("set-feature-04")
    assert "Current value:0x00000160" in run.ok("set-feature-04-get").text
    run.ok("set-feature-04-restore")
    run.ok("set-feature-06")
    assert re.search(r"Current value:(0x)?0+$", run.ok("set-feature-06-get").text.strip())
    run.ok("set-feature-06-restore")


def test_io_commands_from_nvme_cli(run: H.InteropRun) -> None:
    ours = _ours_ctrl(run)
    run.ok("write-block")
    if ours.oncs & (1 << 0):
        run.ok("compare-match")
        bad = run.step("compare-mismatch")
        assert bad.rc != 0 and "Compare Failure" in bad.err + bad.text
    else:  # not in this identity (ONCS bit 0 clear): refused as an opcode the controller does not have
        assert "Invalid Command Opcode" in run.step("compare-match").err
    if ours.oncs & (1 << 7):
        run.ok("verify")
    if ours.oncs & (1 << 3):
        run.ok("write-zeroes")
        run.ok("write-zeroes-read")
    run.ok("flush")


def test_second_path_native_multipath(run: H.InteropRun) -> None:
    run.ok("connect-path2")
    subs = run.ok("multipath-subsys-json").json()
    paths = [p for host in subs for s in host["Subsystems"] if s["NQN"] == run.nqn for p in s["Paths"]]  # type: ignore[union-attr]
    assert sorted((p["State"], p["Address"].split(",")[1]) for p in paths) == sorted(
        [("live", f"trsvcid={run.port}"), ("live", f"trsvcid={run.port2}")]), paths
    main = "\n".join(_dmesg_phases(run)["main"])
    assert "duplicate IDs" not in main and "Duplicate unshared" not in main  # NMIC says shared
    fio = H.fio_figures(run.out / "fio-multipath.json")
    assert run.ok("multipath-fio") and fio is not None and fio["error"] == 0 and fio["read"]["io_bytes"] > 0  # type: ignore[index]
    writes = [int(line.split(":", 1)[1].split()[4]) for line in run.guest_file("multipath-stat.txt").splitlines()]
    assert len(writes) == 2 and all(w > 0 for w in writes), writes  # round-robin: both paths carried writes
    run.ok("disconnect-path2")


def test_dsm_deallocate_then_get_lba_status(run: H.InteropRun) -> None:
    run.ok("dsm-fill")
    run.ok("dsm-ad")
    run.ok("dsm-read-zeroes")  # DLFEAT: deallocated blocks read as zeroes
    if not _has_admin(run, AdminOpcode.GET_LBA_STATUS):
        pytest.skip("this identity has no Get LBA Status (not in its effects log)")
    g = _geometry(run)
    slba, mib = g["slba"], g["mib_lbas"]
    before = _lba_ranges(run.ok("lba-status-before-raw").out)
    after = _lba_ranges(run.ok("lba-status-after-raw").out)
    assert before == [(slba, 4 * mib)], before
    assert after == [(slba, mib), (slba + 3 * mib, mib)], after
    restarted = _lba_ranges(run.ok("restart-lba-status-raw").out)
    assert restarted == after, "deallocation did not survive the target restart"


def test_nvme_cli_get_lba_status(run: H.InteropRun) -> None:
    if not _has_admin(run, AdminOpcode.GET_LBA_STATUS):
        pytest.skip("this identity has no Get LBA Status")
    s = run.step("lba-status-after")
    if s.rc != 0 and "Data SGL Length Invalid" in s.err + s.text:
        log = run.target_log(1)
        assert re.search(r"opcode 0x86 .*refused: the command moves \d+ bytes, its SGL 0", log), \
            "refused for another reason than the host's missing buffer"
        pytest.xfail("libnvme 1.3 sends Get LBA Status without a data buffer (no data_len: SGL length 0); the "
                     "target rightly answers Data SGL Length Invalid. admin-passthru with the buffer works (above)")
    doc = s.json()
    assert doc


def test_fio_verify_mixed_sizes_qd32_several_queues(run: H.InteropRun) -> None:
    s = run.ok("fio-verify")
    fio = H.fio_figures(run.out / "fio-verify.json")
    assert fio is not None and fio["error"] == 0, fio
    assert fio["write"]["io_bytes"] > 0 and fio["read"]["io_bytes"] > 0, fio  # type: ignore[index]
    assert not re.search(r"verify.*(fail|bad)|bad magic", s.err, re.I), s.err
    assert int(fio["elapsed_s"]) >= FIO_RUNTIME  # type: ignore[call-overload]
    keep = json.loads(run.out.joinpath("fio-keep-write.json").read_text())["jobs"][0]
    run.ok("keep-write")
    assert keep["error"] == 0 and keep["read"]["io_bytes"] == int(GUEST_ENV["KEEP_MIB"]) * H.MIB


def test_controller_reset(run: H.InteropRun) -> None:
    run.ok("reset")
    state = run.ok("reset-state").text.split()
    assert state[0] == "live", state
    assert run.ok("reset-keep-sum").text == run.ok("keep-sum").text
    log = run.target_log(1)
    admin = re.findall(r"connected admin queue 0 .* of controller (\d+), subsystem " + re.escape(run.nqn), log)
    assert len(admin) >= 3, admin  # our initiator, the connect, the reconnect after the reset
    assert state[1] == admin[-1], (state, admin)


def test_persistent_discovery_controller(run: H.InteropRun) -> None:
    doc = run.ok("discover-persistent").json()
    assert [r["subnqn"] for r in doc["records"]] == [run.nqn]  # type: ignore[index]
    assert run.ok("discovery-ctrl-state").text.split() == ["live"]  # still there minutes later: Keep Alive works
    assert "disconnected 1 controller(s)" in run.ok("disconnect-discovery").text
    kernel = "\n".join(_dmesg_phases(run)["main"])
    assert kernel.count('Removing ctrl: NQN "nqn.2014-08.org.nvmexpress.discovery"') >= 3  # two discovers + this


def test_disconnect(run: H.InteropRun) -> None:
    assert "disconnected 1 controller(s)" in run.ok("disconnect").text
    run.ok("gone")
    log = run.target_log(1)
    assert re.search(r"association ended \(\d+ queue\(s\) closed\)", log)


def test_restart_on_the_same_files_keeps_the_data(run: H.InteropRun) -> None:
    run.ok("wait-restart")
    assert run.target is not None and run.target.returncodes[:1] == [0]
    assert "namespaces flushed" in run.target_log(1)
    run.ok("connect-all")  # through the discovery log's TRADDR and TRSVCID, with header and data digests
    # libnvme disables SQ flow control when the discovery log's TREQ allows it: SQHD FFFFh, C2HData SUCCESS
    io = re.findall(r"connected I/O queue \d+ \((\d+ entries[^)]*)\)", run.target_log(2))
    assert io and all(x.endswith("no SQ flow control, header digest, data digest") for x in io), io
    doc = run.ok("restart-id-ctrl-json").json()
    ours = _ours_ctrl(run)
    assert (doc["sn"].strip(), doc["subnqn"]) == (ours.sn.strip(), run.nqn)  # type: ignore[index]
    run.ok("restart-keep-verify")
    verify = json.loads(run.out.joinpath("fio-keep-verify.json").read_text())["jobs"][0]
    assert verify["error"] == 0 and verify["read"]["io_bytes"] == int(GUEST_ENV["KEEP_MIB"]) * H.MIB
    keep = run.ok("keep-sum").text.strip()
    assert run.ok("restart-keep-sum").text.strip() == keep == run.host_sums["keep"]
    assert run.ok("restart-fio-area-sum").text.strip() == run.host_sums["fio_area"]
    run.ok("restart-disconnect")


def test_restart_with_io_in_flight_the_kernel_reconnects(run: H.InteropRun) -> None:
    run.ok("live-restart")
    s = run.ok("live-fio")
    fio = H.fio_figures(run.out / "fio-live.json")
    assert fio is not None and fio["error"] == 0, (fio, s.err)
    assert fio["write"]["io_bytes"] > 0 and fio["read"]["io_bytes"] > 0  # type: ignore[index]
    run.ok("live-reconnected")
    assert run.ok("live-state").text.strip() == "live"
    assert run.ok("live-keep-sum").text == run.ok("keep-sum").text
    live = "\n".join(_dmesg_phases(run)["live-restart"])
    assert not re.search(r"I/O error|blk_update_request|critical", live, re.I), live
    # the reconnect: a new admin queue and its I/O queues on the restarted target, with the same host
    connects = _target_connects(run.target_log(3), run.nqn)
    assert [k for k, _, _ in connects].count("admin") >= 1 and [k for k, _, _ in connects].count("I/O") >= 1, connects


def test_target_logs_are_clean(run: H.InteropRun) -> None:
    assert run.target is not None and run.target.returncodes == [0, 0, 0], run.target.returncodes
    for n in (1, 2, 3):
        log = run.target_log(n)
        bad = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line or "CRITICAL" in line]
        assert not bad, bad[:5]
        terminated = [line for line in log.splitlines() if "terminating the connection" in line
                      or "host terminated" in line or "no Keep Alive" in line]
        assert not terminated, terminated[:5]


def test_guest_kernel_log(run: H.InteropRun) -> None:
    lines = [line for line in _dmesg_phases(run)["main"] if re.search(r"nvme|blk_update|I/O error", line, re.I)]
    bad = [line for line in lines
           if re.search(r"error|timeout|failed|reconnect|abort|unusual|invalid", line, re.I)
           and not any(p.search(line) for p in KNOWN_KERNEL_NOTICES)]
    assert not bad, bad[:10]
