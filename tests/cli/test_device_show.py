"""`nvme-lm device show`: a model's SSD inspected through its PF, the way nvme-cli shows a device."""

from __future__ import annotations

import json

from click.testing import CliRunner

from nvme_lm.cli.main import cli
from nvme_lm.device.model import DeviceModel


def show(*args: str):
    return CliRunner().invoke(cli, ["device", "show", *args])


def test_vendor_a_with_two_vfs_json():
    result = show("--model", "vendor-a", "--vfs", "2", "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    model = DeviceModel.builtin("vendor-a")
    ident = d["identify"]
    assert (ident["vid"], ident["mn"], ident["fr"], ident["mdts"]) == (
        model.vendor_id, model.model_number, model.firmware_revision, model.mdts)
    assert "VMS" in ident["oacs"]["flags"] and "MULTI_CTRL" in ident["cmic"]["flags"]

    ctrls = d["controllers"]
    assert len(ctrls) == 1 + model.max_vfs  # the PF and every VF's secondary controller
    pf = [c for c in ctrls if c["role"] == "PF"]
    assert len(pf) == 1 and pf[0]["cntlid"] == ident["cntlid"] and pf[0]["state"] == "online"
    online = [c for c in ctrls if c["role"] == "VF" and c["state"] == "online"]
    assert [c["vfn"] for c in online] == [1, 2]
    per_vf = model.vq_flexible // model.max_vfs
    assert all(c["vq"] == per_vf and c["vi"] == per_vf for c in online)
    assert all(c["vq"] == 0 for c in ctrls if c["role"] == "VF" and c["state"] == "offline")

    caps = d["primary_capabilities"]
    assert caps["vqfrt"] == model.vq_flexible and caps["vqrfa"] == 2 * per_vf
    assert caps["vqprt"] == model.vq_private and set(caps["crt"]) == {"VQ", "VI"}
    sec = {s["vfn"]: s for s in d["secondary_controllers"]}
    assert len(sec) == model.max_vfs and sec[1]["online"] and sec[2]["online"] and not sec[3]["online"]

    # one namespace per VF, attached to that VF's controller only
    nss = d["namespaces"]
    assert len(nss) == 2
    assert sorted(tuple(ns["attached"]) for ns in nss) == [(sec[1]["scid"],), (sec[2]["scid"],)]
    assert all(ns["size_bytes"] == 64 << 20 and ns["lba_size"] == 4096 for ns in nss)
    assert ident["unvmcap"] == ident["tnvmcap"] - 2 * (64 << 20)

    feats = {f["fid"]: f for f in d["features"]}
    assert feats[0x06]["decoded"] == {"wce": True}  # volatile write cache on by default
    assert "saveable" not in [c.lower() for c in feats[0x07]["capabilities"]]  # Number of Queues
    assert all("error" not in f for f in d["features"])
    limits = d["rate_limits"]
    if limits["supported"]:
        assert {c["cntlid"] for c in limits["controllers"]} == {c["cntlid"] for c in ctrls}


def test_table_output_names_every_section():
    result = show("--model", "vendor-b", "--vfs", "1")
    assert result.exit_code == 0, result.output
    for title in ("Identify Controller (vendor-b)", "Controllers (CNS 13h)", "Primary Controller Capabilities",
                  "Secondary Controller List (CNS 15h)", "Namespaces", "Features"):
        assert title in result.stdout
    assert "VB-PM9 1.92TB NVMe SSD" in result.stdout


def test_unknown_model_fails_clearly():
    result = show("--model", "nope")
    assert result.exit_code != 0
    assert "no built-in device model named 'nope'" in result.output
    assert "vendor-a" in result.output  # it says which models exist
    assert "Traceback" not in result.output


def test_too_many_vfs_fails_clearly():
    result = show("--model", "vendor-b", "--vfs", "9", "--json")
    assert result.exit_code != 0
    assert "has 8 VFs; --vfs 9 asks for more" in result.output


def test_model_file_is_validated(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\nmax_vfs = 200\n')
    result = show("--model", str(path))
    assert result.exit_code != 0
    assert "max_vfs = 200: must be in 0..127" in result.output
