"""`virtfreeze restore` and bad input: an archive is data, existing domains and files are never
overwritten unasked, a damaged archive defines nothing, and a restore killed mid-way is finished or
cleaned up by the same command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from tests.host.conftest import VIRTFREEZE
from tests.host.test_restore import assert_acked_in, back_up, delete_domain, setup
from tests.rig.guest import DiskSpec
from virtfreeze import save_image


def tree(*roots: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every path under the roots (but `skip`), with its type and size: the filesystem before and after."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                out[p] = (stat.S_IFMT(st.st_mode), st.st_size if stat.S_ISREG(st.st_mode) else 0)
    return out


ETC_OF_OTHER_TESTS = ("/etc/libvirt",)  # the tests running beside this one define domains


@pytest.fixture
def archived(guest_factory, vf, tmp_path):
    """A writing guest backed up with its memory into the directory target, then deleted; yields
    (guest, env, archive directory, acknowledged-before-freeze)."""
    g = guest_factory([DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw")])
    env = setup(vf, tmp_path, g)
    t_before, _last = back_up(vf, env, g, "--memory", "--target", "dir")
    acked = g.acked(until=t_before)
    g.watcher.close()
    delete_domain(g)
    [archive] = [p for p in (tmp_path / "dir-target").iterdir() if not p.name.startswith(".")]
    yield g, env, archive, acked


def variant(archive: Path, dest: Path) -> Path:
    shutil.copytree(archive, dest)
    return dest


def defined(conn, name: str) -> bool:
    try:
        conn.lookupByName(name)
        return True
    except libvirt.libvirtError:
        return False


def test_an_archive_that_leads_out_is_refused_before_anything_is_written(archived, vf, tmp_path, libvirt_conn):
    g, env, archive, _acked = archived
    etc_before = tree(Path("/etc"), skip=ETC_OF_OTHER_TESTS)
    cases = {}
    # The manifest names a file outside the archive.
    bad = variant(archive, tmp_path / "bad-manifest")
    m = json.loads((bad / "manifest.json").read_text())
    m["disks"]["vda"]["file"] = "../../../../etc/hostname"
    (bad / "manifest.json").write_text(json.dumps(m))
    cases[bad] = "outside itself"
    # A symlink in place of a disk image.
    bad = variant(archive, tmp_path / "bad-symlink")
    (bad / "disks" / "vdb.raw").unlink()
    os.symlink("/etc/hostname", bad / "disks" / "vdb.raw")
    cases[bad] = "symlink"
    # The definition puts a disk, the serial log or the NVRAM outside the allowed places.
    for what, old, new in (("disk", str(g.disks["vda"]), "/etc/virtfreeze-evil.qcow2"),
                           ("serial", str(g.workdir / "console.log"), "/etc/cron.d/virtfreeze-evil")):
        bad = variant(archive, tmp_path / f"bad-{what}")
        (bad / "domain.xml").write_text((bad / "domain.xml").read_text().replace(old, new))
        if what == "disk":
            m = json.loads((bad / "manifest.json").read_text())
            m["disks"]["vda"]["base"] = new
            (bad / "manifest.json").write_text(json.dumps(m))
        cases[bad] = new
    # The definition boots a host file as the guest's kernel (it would be read into the guest).
    bad = variant(archive, tmp_path / "bad-kernel")
    xml = (bad / "domain.xml").read_text()
    kernel = ET.fromstring(xml).findtext("os/kernel")
    (bad / "domain.xml").write_text(xml.replace(kernel, "/etc/shadow"))
    cases[bad] = "/etc/shadow"
    # The memory image's own XML (not domain.xml) puts the serial log outside: it is archive data too.
    bad = variant(archive, tmp_path / "bad-memory-xml")
    image = save_image.read(bad / "memory.save")
    save_image.rewrite_xml(bad / "memory.save", image.xml.replace(str(g.workdir / "console.log"),
                                                                  "/etc/cron.d/virtfreeze-evil"))
    cases[bad] = "/etc/cron.d/virtfreeze-evil"
    # A qcow2 whose header names a host file as its backing file (libvirt would open it for the guest).
    bad = variant(archive, tmp_path / "bad-backing")
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw",
                    str(bad / "disks" / "vda.qcow2")], check=True)
    cases[bad] = "names the backing file /etc/hostname"
    for bad, expected in cases.items():
        before = tree(tmp_path, vf.state)
        out = vf("restore", "--from", str(bad), expect=2)
        assert expected in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        if expected.startswith("/etc/"):
            assert "--disk-dir" in out.stderr and "restore_directories" in out.stderr
        assert tree(tmp_path, vf.state) == before, f"{bad.name}: something was written"
        assert not defined(libvirt_conn, g.name)
    assert tree(Path("/etc"), skip=ETC_OF_OTHER_TESTS) == etc_before


def test_existing_domains_and_files_are_never_overwritten_unasked(archived, vf, tmp_path, libvirt_conn):
    g, env, archive, acked = archived
    # Another domain's archive named for this one: refused, nothing written.
    before = tree(tmp_path)
    out = vf("restore", "web-other", "--target", "dir", "--archive", archive.name, env=env, expect=2)
    assert f"archive of domain {g.name!r}" in out.stderr and tree(tmp_path) == before
    # A file in the way: exit 2, untouched.
    g.disks["vda"].write_bytes(b"someone else's file")
    before = tree(tmp_path)
    out = vf("restore", "--from", str(archive), expect=2)
    assert str(g.disks["vda"]) in out.stderr and "exists" in out.stderr
    assert tree(tmp_path) == before and not defined(libvirt_conn, g.name)
    g.disks["vda"].unlink()

    # Restored and running: the same again is refused, and so is --replace of a running domain.
    vf("restore", "--from", str(archive))
    for args in ((), ("--replace",)):
        out = vf("restore", "--from", str(archive), *args, expect=2)
        assert "exists" in out.stderr or "running" in out.stderr, out.stderr
    assert libvirt_conn.lookupByName(g.name).state()[0] == libvirt.VIR_DOMAIN_RUNNING

    # --replace of the shut-off domain overwrites it and its own files.
    libvirt_conn.lookupByName(g.name).destroy()
    out = json.loads(vf("--json", "restore", "--from", str(archive), "--replace", "--no-start").stdout)["restore"]
    assert out["state"] == "shutoff"
    assert_acked_in(g.disks, g.formats, acked)
    dirs = {Path(d).parent for d in g.disks.values()}
    assert not [p for d in dirs for p in d.glob(".*.virtfreeze-replaced")], "the replaced files were not deleted"


def test_a_damaged_archive_defines_nothing_and_leaves_nothing(archived, vf, tmp_path, libvirt_conn):
    g, env, archive, acked = archived
    # A truncated memory image: one line suggesting --no-memory; with it, a cold boot works.
    bad = variant(archive, tmp_path / "bad-memory")
    with open(bad / "memory.save", "r+b") as fh:
        fh.truncate(os.path.getsize(bad / "memory.save") // 2)
    before = tree(tmp_path, vf.state)
    out = vf("restore", "--from", str(bad), expect=1)
    assert "memory.save" in out.stderr and "--no-memory" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert tree(tmp_path, vf.state) == before and not defined(libvirt_conn, g.name)

    # A disk missing from the archive.
    bad = variant(archive, tmp_path / "bad-missing")
    (bad / "disks" / "vdb.raw").unlink()
    out = vf("restore", "--from", str(bad), expect=1)
    assert "disks/vdb.raw is missing" in out.stderr
    assert not defined(libvirt_conn, g.name)

    # A qcow2 that fails its check (same size, garbage in its refcount table).
    bad = variant(archive, tmp_path / "bad-qcow2")
    image = bad / "disks" / "vda.qcow2"
    with open(image, "r+b") as fh:
        fh.seek(48)
        refcount_table = int.from_bytes(fh.read(8), "big")
        fh.seek(refcount_table)
        fh.write(b"\xff" * 512)
    before = tree(tmp_path, vf.state)
    out = vf("restore", "--from", str(bad), expect=1)
    assert "qemu-img check" in out.stderr and "vda" in out.stderr, out.stderr
    assert tree(tmp_path, vf.state) == before and not defined(libvirt_conn, g.name)

    out = json.loads(vf("--json", "restore", "--from", str(variant(archive, tmp_path / "ok")), "--no-memory",
                        "--no-start").stdout)["restore"]
    assert not out["from_memory"] and out["state"] == "shutoff"
    assert_acked_in(g.disks, g.formats, acked)


@pytest.mark.parametrize("failpoint", ["restore-after-place", "restore-after-define"])
def test_a_restore_killed_midway_is_finished_by_the_same_command(archived, vf, tmp_path, libvirt_conn, failpoint):
    g, env, archive, acked = archived
    args = ["--json", "restore", "--from", str(archive), "--no-start"]
    proc = vf(*args, env=vf.env(VIRTFREEZE_FAILPOINT=failpoint), expect=None)
    assert proc.returncode == -signal.SIGKILL
    if defined(libvirt_conn, g.name):  # never a definition pointing at missing or half-written files
        root = ET.fromstring(libvirt_conn.lookupByName(g.name).XMLDesc(0))
        for d in root.findall("devices/disk"):
            path = Path(d.find("source").get("file"))
            assert path.exists()
            if path.suffix == ".qcow2":
                subprocess.run(["qemu-img", "check", "-q", str(path)], check=True)
    out = json.loads(vf(*args).stdout)["restore"]
    assert out["state"] == "shutoff" and defined(libvirt_conn, g.name)
    assert not list((vf.state / "restores").glob("*.json"))
    assert not [p for p in g.workdir.iterdir() if ".virtfreeze" in p.name], list(g.workdir.iterdir())
    assert_acked_in(g.disks, g.formats, acked)


def test_staged_memory_image_is_private(archived, vf, tmp_path, libvirt_conn):
    """While staged, the memory image is 0600 in a 0700 directory; nothing is left in staging."""
    g, env, archive, _acked = archived
    proc = subprocess.Popen([*VIRTFREEZE, "--config", str(vf.config_path), "restore", g.name, "--target", "dir",
                             "--no-start"], env=dict(env, VIRTFREEZE_FAILPOINT="restore-after-extract:stop"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        os.waitid(os.P_PID, proc.pid, os.WSTOPPED)  # stopped at the failpoint: look at the staging
        [staging] = [p for p in g.workdir.iterdir() if p.name.startswith(".virtfreeze-restore-")]
        assert stat.S_IMODE(os.stat(staging).st_mode) == 0o700
        images = list(staging.rglob("memory.save"))
        assert images, list(staging.rglob("*"))
        for p in images:
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
            assert all(stat.S_IMODE(os.stat(d).st_mode) & 0o077 == 0 for d in p.parents if staging in d.parents)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert not [p for p in g.workdir.iterdir() if p.name.startswith(".virtfreeze-restore-")]
