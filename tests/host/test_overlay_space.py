"""The overlay's filesystem: a freeze is refused below the reserve, and a guest that fills it (paused
on an I/O error) is merged and resumed by thaw with nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import libvirt
import pytest

from tests.host.helpers import assert_all_acked_present, assert_back_on_base, disk_sources
from tests.rig.guest import DiskSpec


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB ext4 filesystem, loop-mounted: an overlay directory that fills up."""
    image, mnt = tmp_path / "overlays.ext4", tmp_path / "overlays"
    subprocess.run(["truncate", "-s", "24M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_guest_fills_its_overlay_filesystem(guest_factory, vf, small_fs):
    # 64 KiB between records: every write allocates a new overlay cluster, so 24 MiB go fast.
    g = guest_factory([DiskSpec("vda", "qcow2", size_mib=64)], stride=128)
    vf.write_config(overlay_directory=str(small_fs), overlay_min_free=64 << 20)
    out = vf("freeze", g.name, expect=1)
    assert str(small_fs) in out.stderr and "overlay_min_free" in out.stderr and "MiB free" in out.stderr
    assert not any(s.endswith(".virtfreeze.qcow2") for s in disk_sources(g.dom).values())
    assert not vf.journal(g.uuid).exists()

    paused = threading.Event()

    def on_lifecycle(conn, dom, event, detail, opaque):
        if event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED and detail == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR:
            paused.set()

    cb = g.conn.domainEventRegisterAny(g.dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)
    try:
        vf.write_config(overlay_min_free=1 << 20)
        vf("freeze", g.name)
        assert paused.wait(120), "the guest never filled its overlay's filesystem"
    finally:
        g.conn.domainEventDeregisterAny(cb)
    assert g.dom.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR]
    status = json.loads(vf("status", "--json", g.name, expect=3).stdout)["frozen"][0]
    assert status["state"] == "paused (I/O error)"
    out = vf("thaw", g.name)
    assert "paused on an I/O error" in out.stderr and "resuming the guest" in out.stderr
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    g.watcher.wait_acks(20, after=time.monotonic())  # it writes again: the failed write was retried
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_backup_stops_the_archive_of_a_domain_that_fills_its_overlay(guest_factory, vf, small_fs, tmp_path):
    """Driver mode: the archive (a borg create that would never end) is stopped at once when the guest
    pauses on an I/O error; the domain is merged and resumed; the run reports the failure, no hang."""
    g = guest_factory([DiskSpec("vda", "qcow2", size_mib=64)], stride=128)
    never = tmp_path / "never.fifo"
    os.mkfifo(never)
    endless_borg = tmp_path / "borg-endless"
    endless_borg.write_text(f'#!/bin/sh\ncase " $* " in\n  *" create "*) read x < {never} ;;\nesac\nexec borg "$@"\n')
    endless_borg.chmod(0o755)
    subprocess.run(["borg", "init", "-e", "none", str(tmp_path / "repo.borg")], check=True, capture_output=True)
    vf.write_config(overlay_directory=str(small_fs), overlay_min_free=1 << 20, targets={
        "slow": {"type": "borg", "repository": str(tmp_path / "repo.borg"), "borg": str(endless_borg)}})
    env = vf.env()
    env.pop("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD")
    out = vf("--json", "backup", g.name, env=env, expect=1, timeout=180)
    result = json.loads(out.stdout)["backups"][0]
    assert not result["ok"] and result["strategy"] == "live"
    assert "stopped: the domain paused on an I/O error" in result["errors"][0], result["errors"]
    assert "resuming the guest" in out.stderr
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    g.watcher.wait_acks(20, after=time.monotonic())
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)
