"""freeze -> read the export view -> thaw on guests that keep writing."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import libvirt
import pytest

from tests.host.helpers import (
    assert_all_acked_present, assert_back_on_base, copy_export, disk_sources, overlays_left, sha256,
)
from tests.rig.acks import AckWatcher
from tests.rig.guest import SOCKET_DIR, DiskSpec
from tests.rig.integrity import check_image

MULTI = [DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw"), DiskSpec("vdc", "qcow2"), DiskSpec("hdc", device="cdrom")]


def test_cycle_multi_disk_keeps_every_write(guest_factory, vf, tmp_path):
    g = guest_factory(MULTI)
    vf.write_config(domains={g.name: {"exclude_disks": ["vdc"]}})
    g.watcher.wait_acks(30)

    t_before = time.monotonic()
    out = vf("--json", "freeze", g.name)
    frozen = json.loads(out.stdout)["frozen"][0]
    assert frozen["consistency"] == "crash"  # no guest agent in the test guest
    assert set(frozen["disks"]) == {"vda", "vdb"}
    assert frozen["skipped"] == {"vdc": "excluded by configuration", "hdc": "device is a cdrom"}
    assert "no guest agent channel" in out.stderr

    live = disk_sources(g.dom)
    assert live["vda"].endswith(".virtfreeze.qcow2") and live["vdb"].endswith(".virtfreeze.qcow2")
    assert live["vdc"] == str(g.disks["vdc"]), "excluded disk must stay on its image"
    g.watcher.wait_acks(60)  # keeps writing while frozen

    export = vf.export / g.name
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["consistency"] == "crash" and set(manifest["disks"]) == {"vda", "vdb"}
    paths = (export / "paths.txt").read_text().split()
    assert str(export / "disks" / "vda.qcow2") in paths and str(export / "disks" / "vdb.raw") in paths
    assert (vf.export / "paths.txt").read_text().split() == paths
    assert "vdc" not in " ".join(paths)
    assert stat.S_IMODE(os.stat(export).st_mode) == 0o700
    # read-only view: a backup tool cannot change the frozen image
    try:
        open(export / "disks" / "vdb.raw", "r+b").close()
        raise AssertionError("export view is writable")
    except OSError:
        pass

    archive = copy_export(export, tmp_path / "archive")
    g.watcher.wait_acks(30)
    vf("thaw", g.name)
    t_thawed = time.monotonic()
    assert_back_on_base(g, vf)
    g.watcher.wait_acks(30, after=t_thawed)

    # The archive holds every write acknowledged before the freeze ...
    for t, fmt in (("vda", "qcow2"), ("vdb", "raw")):
        report = check_image(archive / "disks" / f"{t}.{fmt}", t, g.acked(until=t_before)[t], fmt)
        assert report.checked > 0 and report.ok, report
    # ... and the merged disks every write acknowledged at all.
    assert_all_acked_present(g)


@pytest.mark.exclusive  # a bare `thaw` merges every frozen domain on the host
def test_thaw_is_idempotent_and_safe_with_nothing_frozen(guest_factory, vf):
    assert vf("thaw").stdout == ""  # nothing frozen: exit 0, nothing done
    assert vf("status").stdout.strip() == "nothing frozen"
    g = guest_factory([DiskSpec("vda")])
    vf("freeze", g.name)
    assert vf("status", g.name, expect=3).returncode == 3
    vf("thaw", g.name)
    vf("thaw", g.name)
    vf("thaw")
    vf("status")
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_freeze_again_merges_leftovers_instead_of_stacking(guest_factory, vf):
    g = guest_factory([DiskSpec("vda"), DiskSpec("vdb", "raw")])
    vf("freeze", g.name)
    g.watcher.wait_acks(30)
    out = vf("freeze", g.name)
    assert "leftovers of an earlier run" in out.stderr
    xml = g.dom.XMLDesc(0)
    assert xml.count(".virtfreeze.qcow2") == 2, "one overlay per disk, not a stack"
    g.watcher.wait_acks(30)
    vf("thaw", g.name)
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_paused_domain(guest_factory, vf):
    g = guest_factory([DiskSpec("vda")])
    g.watcher.wait_acks(20)
    g.dom.suspend()
    vf("freeze", g.name)
    vf("thaw", g.name)
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED, "thaw must not resume a paused guest"
    g.dom.resume()
    g.watcher.wait_acks(20)
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_guest_shut_down_between_freeze_and_thaw(guest_factory, vf):
    g = guest_factory([DiskSpec("vda"), DiskSpec("vdb", "raw")])
    vf("freeze", g.name)
    g.watcher.wait_acks(50)
    g.dom.destroy()  # the guest goes away while frozen; its writes are in the overlays
    out = vf("thaw", g.name)
    assert "offline" in out.stdout
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)
    g.start()  # and it boots from the merged base
    g.watcher.wait_acks(10)


def test_shut_off_domain_is_exposed_and_protected(guest_factory, vf, tmp_path):
    g = guest_factory([DiskSpec("vda"), DiskSpec("vdb", "raw")])
    g.watcher.wait_acks(30)
    g.dom.destroy()
    before = {t: sha256(p) for t, p in g.disks.items()}
    out = vf("--json", "freeze", g.name)
    assert json.loads(out.stdout)["frozen"][0]["consistency"] == "shutoff"
    assert disk_sources(g.dom, inactive=True)["vda"].endswith(".virtfreeze.qcow2")
    assert {t: sha256(p) for t, p in g.disks.items()} == before, "freeze changed the images"

    g.start()  # somebody starts it during the backup: it writes into the overlays
    g.watcher.wait_acks(40)
    export = vf.export / g.name
    assert {t: sha256(export / "disks" / f"{t}.{g.formats[t]}") for t in g.disks} == before
    assert {t: sha256(p) for t, p in g.disks.items()} == before, "archived images changed"
    vf("thaw", g.name)  # now running: live merge
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


@pytest.mark.parametrize("memory_directory", [None, "tmpfs"])
def test_memory_state_restores_into_a_guest_that_keeps_writing(libvirt_conn, guest_factory, vf, tmp_path,
                                                               memory_directory, request):
    g = guest_factory([DiskSpec("vda"), DiskSpec("vdb", "raw")])
    if memory_directory:  # the image in RAM (a shorter pause); thaw removes it even once the setting is gone
        shm = Path(tempfile.mkdtemp(prefix="vf-test-", dir="/dev/shm"))
        request.addfinalizer(lambda: shutil.rmtree(shm, ignore_errors=True))
        vf.write_config(memory_directory=str(shm / "memory"))
    g.watcher.wait_acks(30)
    t_before = time.monotonic()
    out = vf("--json", "freeze", "--memory", g.name)
    assert json.loads(out.stdout)["frozen"][0]["consistency"] == "memory"
    export = vf.export / g.name
    mem = export / "memory.save"
    assert stat.S_IMODE(os.stat(mem).st_mode) == 0o600
    record = json.loads(vf.journal(g.uuid).read_text())
    assert stat.S_IMODE(os.stat(os.path.dirname(record["memory_file"])).st_mode) == 0o700
    if memory_directory:
        assert record["memory_file"] == str(shm / "memory" / g.uuid / "memory.save")
        assert not (vf.state / "memory").exists()
        vf.config.pop("memory_directory")
        vf.write_config()
    last_before = max(g.acked(until=t_before)["vda"])
    g.watcher.wait_acks(30)  # the guest kept running
    archive = copy_export(export, tmp_path / "archive")
    vf("thaw", g.name)
    if memory_directory:
        assert list((shm / "memory").iterdir()) == []
    assert_back_on_base(g, vf)
    assert not os.path.exists(record["memory_file"]), "memory image must be removed after the archive"
    assert_all_acked_present(g)

    # Restore the archived memory state onto copies of the archived disks.
    xml = libvirt_conn.saveImageGetXMLDesc(str(archive / "memory.save"), 0)
    sock = SOCKET_DIR / f"{g.uuid[:8]}-restored.sock"
    for t in g.disks:
        xml = xml.replace(str(g.disks[t]), str(archive / "disks" / f"{t}.{g.formats[t]}"))
    xml = xml.replace(str(g.sock), str(sock)).replace(str(g.console_log), str(tmp_path / "restored-console.log"))
    restored = AckWatcher(sock, tmp_path / "restored-acks.log")
    g.extra_watchers.append(restored)
    libvirt_conn.restoreFlags(str(archive / "memory.save"), xml, libvirt.VIR_DOMAIN_SAVE_RUNNING)
    restored.wait_acks(20)
    first = min(a.seq for a in restored.snapshot() if a.disk == "vda")
    assert first >= last_before, f"restored guest restarted its sequence ({first} < {last_before})"
    g.dom.destroy()
    for t in g.disks:
        report = check_image(archive / "disks" / f"{t}.{g.formats[t]}", t,
                             [a.seq for a in restored.snapshot() if a.disk == t])
        assert report.checked > 0 and report.ok, report
    assert overlays_left(tmp_path) == []


def test_quiesce_with_an_unresponsive_agent(guest_factory, vf):
    g = guest_factory([DiskSpec("vda")], agent_channel=True)  # channel present, no agent answering
    out = vf("--json", "freeze", "--quiesce", "require", g.name, expect=1)
    assert "agent" in out.stderr and g.name in out.stderr
    assert not vf.journal(g.uuid).exists() and disk_sources(g.dom)["vda"] == str(g.disks["vda"])
    out = vf("--json", "freeze", g.name)  # auto: falls back to crash-consistent, saying why
    assert json.loads(out.stdout)["frozen"][0]["consistency"] == "crash"
    assert "quiesce failed" in out.stderr and "crash-consistent" in out.stderr
    assert json.loads((vf.export / g.name / "manifest.json").read_text())["consistency"] == "crash"
    vf("thaw", g.name)
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_disk_on_a_template_commits_into_its_own_image_not_the_template(guest_factory, vf, tmp_path):
    g = guest_factory([DiskSpec("vda", "qcow2", template=True), DiskSpec("vdb", "raw")])
    template = g.workdir / "vda.template.qcow2"
    before = sha256(template)
    g.watcher.wait_acks(20)
    t_before = time.monotonic()
    frozen = json.loads(vf("--json", "freeze", g.name).stdout)["frozen"][0]
    assert frozen["disks"]["vda"] == str(g.disks["vda"]), "the base is the disk's own image, not the template"
    g.watcher.wait_acks(40)
    archive = copy_export(vf.export / g.name, tmp_path / "archive")
    vf("thaw", g.name)
    assert_back_on_base(g, vf)
    assert sha256(template) == before, "the commit ran into the shared template"
    # The archive holds the whole chain below the overlay, recorded in the manifest;
    # rebased onto the archived template it reads back every write acked before the freeze.
    backing = json.loads((archive / "manifest.json").read_text())["disks"]["vda"]["backing"]
    assert backing == [{"path": str(template), "format": "qcow2", "file": "disks/vda.backing-1.qcow2"}]
    assert sha256(archive / "disks" / "vda.backing-1.qcow2") == before
    top = archive / "disks" / "vda.qcow2"
    subprocess.run(["qemu-img", "rebase", "-u", "-b", str(archive / backing[0]["file"]), "-F", "qcow2", str(top)],
                   check=True)
    report = check_image(top, "vda", g.acked(until=t_before)["vda"], "qcow2")
    assert report.checked > 0 and report.ok, report
    assert_all_acked_present(g)


def test_command_line_beats_the_domain_setting(guest_factory, vf):
    """`--quiesce off` wins over the domain's `quiesce: require`, `--strategy` over its `strategy:`."""
    g = guest_factory([DiskSpec("vda")])  # no guest agent channel: require alone would fail
    vf.write_config(domains={g.name: {"quiesce": "require", "strategy": "offline"}})
    vf("freeze", g.name, expect=2)
    frozen = json.loads(vf("--json", "freeze", "--quiesce", "off", g.name).stdout)["frozen"][0]
    assert frozen["consistency"] == "crash"
    status = json.loads(vf("status", "--json", g.name, expect=3).stdout)["frozen"][0]
    assert status["strategy"] == "offline" and "domain setting" in status["strategy_reason"]
    thawed = json.loads(vf("thaw", "--strategy", "live", "--json", g.name).stdout)["thawed"][0]
    assert thawed["strategy"] == "live"
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)
