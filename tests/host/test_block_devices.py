"""VMs on block devices (LVM volumes, zvols; loop devices stand in here): every
archive holds the device's data, not a device node, and the device view never
outlives the freeze."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

from tests.host.helpers import assert_all_acked_present, assert_archive_holds_disks, assert_back_on_base
from tests.rig.guest import DiskSpec

from virtfreeze.export_view import pids_serving

# A raw LV stand-in and a qcow2 file: the guest writes to both throughout.
BLOCK_AND_FILE = [DiskSpec("vda", "raw", size_mib=32, block=True), DiskSpec("vdb", "qcow2")]
BORG_ENV = {"BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes", "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}


def borg(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["borg", *args], check=True, capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, **BORG_ENV))


def test_export_view_shows_a_block_device_as_a_read_only_file(guest_factory, vf):
    g = guest_factory(BLOCK_AND_FILE)
    g.watcher.wait_acks(20)
    vf("freeze", g.name)
    export = vf.export / g.name
    view = export / "disks" / "vda.raw"
    st = os.stat(view)
    assert stat.S_ISREG(st.st_mode) and st.st_size == 32 << 20
    assert stat.S_IMODE(st.st_mode) & 0o222 == 0
    try:
        open(view, "r+b").close()
        raise AssertionError("the device view is writable")
    except OSError:
        pass
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["disks"]["vda"]["type"] == "block"
    assert manifest["disks"]["vda"]["size"] == 32 << 20
    assert manifest["sizes"]["disks/vda.raw"] == 32 << 20
    assert manifest["sizes"]["disks/vdb.qcow2"] == os.stat(g.disks["vdb"]).st_size
    assert len(pids_serving(export)) == 1
    # Its attributes stand still while it is read (borg warns when a file's ctime moves during the read).
    before = os.stat(view)
    with open(view, "rb") as fh:
        while fh.read(1 << 20):
            pass
    after = os.stat(view)
    assert (after.st_ctime_ns, after.st_mtime_ns, after.st_size) == (before.st_ctime_ns, before.st_mtime_ns,
                                                                     before.st_size)
    vf("thaw", g.name)
    assert pids_serving(export) == [], "the device view outlived the freeze"
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_readme_plain_borg_recipe_archives_the_device_data(guest_factory, vf, tmp_path):
    """README: `virtfreeze freeze`; `borg create repo::x /run/virtfreeze/export`; `virtfreeze thaw`."""
    g = guest_factory(BLOCK_AND_FILE)
    repo = tmp_path / "repo.borg"
    borg("init", "-e", "none", str(repo))
    g.watcher.wait_acks(20)
    t_before = time.monotonic()
    vf("freeze", g.name)
    g.watcher.wait_acks(20)
    borg("create", f"{repo}::vms", str(vf.export))
    vf("thaw", g.name)
    listing = [json.loads(line) for line in borg("list", "--json-lines", f"{repo}::vms").stdout.splitlines()]
    vda = next(i for i in listing if i["path"].endswith(f"{g.name}/disks/vda.raw"))
    assert vda["type"] == "-" and vda["size"] == 32 << 20, vda
    dest = tmp_path / "extracted"
    dest.mkdir()
    borg("extract", f"{repo}::vms", cwd=dest)
    assert_archive_holds_disks(g, dest / str(vf.export).lstrip("/") / g.name, t_before)
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_freeze_killed_with_a_device_view_then_thaw_stops_it(guest_factory, vf):
    g = guest_factory(BLOCK_AND_FILE)
    g.watcher.wait_acks(20)
    vf("freeze", g.name, expect=-signal.SIGKILL, env=vf.env(VIRTFREEZE_FAILPOINT="freeze-after-export"))
    export = vf.export / g.name
    assert len(pids_serving(export)) == 1, "the daemon outlives the killed freeze"
    g.watcher.wait_acks(20)
    vf("thaw", g.name)
    assert pids_serving(export) == []
    assert not export.exists()
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_qcow2_on_a_block_device(guest_factory, vf, tmp_path):
    g = guest_factory([DiskSpec("vda", "qcow2", size_mib=16, block=True)])
    g.watcher.wait_acks(20)
    t_before = time.monotonic()
    vf("freeze", g.name)
    copy = tmp_path / "copy"
    (copy / "disks").mkdir(parents=True)
    for name in ("manifest.json", "disks/vda.qcow2"):
        with open(vf.export / g.name / name, "rb") as src, open(copy / name, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    vf("thaw", g.name)
    assert_archive_holds_disks(g, copy, t_before)
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)
