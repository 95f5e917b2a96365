"""`virtfreeze check`: each finding at its level, and nothing changed (definitions and directories)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import libvirt

from tests.rig.guest import DiskSpec, create_agent_guest


def listing(*roots: Path) -> list[str]:
    return sorted(str(Path(d) / n) for r in roots if Path(r).exists() for d, ds, fs in os.walk(r) for n in ds + fs)


def run_check(vf, conn, *args, expect: int):
    """`virtfreeze --json check ARGS`, asserting that it changed nothing: the definitions of the domains it
    checked (other tests run beside this one and change theirs) and its directories. Returns its findings
    by (scope, topic)."""
    names = [a for a in args if not a.startswith("-")]

    def definitions() -> dict[str, str]:
        return {d.name(): d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) for d in conn.listAllDomains(0)
                if d.name() in names}

    before = (definitions(), listing(vf.state, vf.export, vf.config_path.parent))
    out = vf("--json", "check", *args, expect=expect)
    assert (definitions(), listing(vf.state, vf.export, vf.config_path.parent)) == before, "check changed something"
    findings = {}
    for f in json.loads(out.stdout)["findings"]:
        findings.setdefault((f["scope"], f["topic"]), []).append(f)
    return findings


def one(findings, scope, topic):
    [f] = findings[(scope, topic)]
    return f["level"], f["message"]


def test_block_network_and_cdrom_disks(guest_factory, vf, tmp_path, libvirt_conn):
    g = guest_factory([DiskSpec("vda", "raw", size_mib=16, block=True), DiskSpec("vdb", nbd_socket=tmp_path / "x.sock"),
                       DiskSpec("hdc", device="cdrom")], start=False)
    f = run_check(vf, libvirt_conn, g.name, expect=0)
    level, msg = one(f, g.name, "disk vda")
    assert level == "ok" and "frozen" in msg and "block device" in msg
    level, msg = one(f, g.name, "disk vdb")
    assert level == "warning" and "network" in msg and "NOT in the backup" in msg
    level, msg = one(f, g.name, "disk hdc")
    assert level == "ok" and "left out: device is a cdrom" in msg
    assert one(f, "host", "fuse")[0] == "ok"
    assert one(f, g.name, "quiesce") == ("ok", "shutoff: an offline snapshot, consistent as it is")
    assert one(f, g.name, "strategy")[1].startswith("offline")


def test_agent_channel_without_and_with_an_agent(guest_factory, vf, tmp_path, libvirt_conn):
    silent = guest_factory([DiskSpec("vda")], agent_channel=True)
    real = create_agent_guest(libvirt_conn, tmp_path / "agent")
    try:
        f = run_check(vf, libvirt_conn, silent.name, real.name, expect=0)
        level, msg = one(f, silent.name, "quiesce")
        assert level == "warning" and "the agent does not answer" in msg
        assert one(f, real.name, "quiesce") == ("ok", "the guest agent answers: filesystems are quiesced")
        vf.write_config(domains={silent.name: {"quiesce": "require"}})
        f = run_check(vf, libvirt_conn, silent.name, expect=1)
        level, msg = one(f, silent.name, "quiesce")
        assert level == "error" and "quiesce require fails the freeze" in msg
    finally:
        real.remove()


def test_an_overlay_directory_below_its_reserve_and_a_missing_domain(guest_factory, vf, tmp_path, libvirt_conn):
    g = guest_factory([DiskSpec("vda")], start=False)
    (tmp_path / "overlays").mkdir()
    vf.write_config(overlay_directory=str(tmp_path / "overlays"), overlay_min_free=1 << 60)
    f = run_check(vf, libvirt_conn, g.name, "no-such-domain-here", expect=1)
    level, msg = one(f, "host", "overlay_directory")
    assert level == "error" and "below overlay_min_free" in msg
    assert [x["level"] for x in f[(g.name, "disk vda")]] == ["ok", "error"]
    assert one(f, "no-such-domain-here", "domain")[0] == "error"
    # Nothing named: the host only, exit 1 for the same reason.
    f = run_check(vf, libvirt_conn, expect=1)
    assert {scope for scope, _topic in f} == {"host"}


def test_the_segmented_layout_says_how_each_disk_is_tracked(guest_factory, vf, tmp_path, libvirt_conn):
    g = guest_factory([DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw"), DiskSpec("vdc", "qcow2")], start=False)
    import subprocess

    subprocess.run(["qemu-img", "amend", "-f", "qcow2", "-o", "compat=0.10", str(g.disks["vdc"])], check=True)
    vf.write_config(domains={g.name: {"export_layout": "segmented"}})
    f = run_check(vf, libvirt_conn, g.name, expect=0)
    by_disk = {m["message"].split(":")[0]: (m["level"], m["message"]) for m in f[(g.name, "layout")]}
    assert by_disk["segmented, disk vda"][0] == "ok" and "dirty bitmap after" in by_disk["segmented, disk vda"][1]
    assert by_disk["segmented, disk vdb"][0] == "ok" and "compares segment hashes" in by_disk["segmented, disk vdb"][1]
    assert by_disk["segmented, disk vdc"][0] == "warning" and "compat 0.10" in by_disk["segmented, disk vdc"][1]
    assert one(f, "host", "qemu-storage-daemon")[0] == "ok" and one(f, "host", "fuse")[0] == "ok"
