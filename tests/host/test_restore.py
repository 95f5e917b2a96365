"""`virtfreeze restore` with real libvirtd, QEMU guests that write, and real borg, restic and directory
targets: in place from memory, cold boots, a clone beside a running original, and hook mode."""

from __future__ import annotations

import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from tests.conftest import URI
from tests.host.helpers import qemu_conf_setting, sha256
from tests.host.test_backup import targets_config
from tests.rig.acks import AckWatcher
from tests.rig.guest import SOCKET_DIR, DiskSpec, Guest
from tests.rig.guest_image import cache_dir
from tests.rig.integrity import check_image

from virtfreeze import save_image

TWO_DISKS = [DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw")]
# The test guests' serial sockets, and their kernel and initramfs (read by QEMU: allowed places too).
RIG_DIRS = [str(SOCKET_DIR), str(cache_dir())]


def target_env(vf) -> dict:
    env = vf.env(TEST_BORG_PASSPHRASE="borg-secret")
    env.pop("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD")  # the targets are entry-point plugins
    return env


def setup(vf, tmp_path, g: Guest, **extra) -> dict:
    """Targets, and the guest's directory and the test sockets as places a restore may write."""
    vf.write_config(targets=targets_config(tmp_path), restore_directories=[str(g.workdir), *RIG_DIRS], **extra)
    return target_env(vf)


def back_up(vf, env, g: Guest, *args: str) -> tuple[float, dict[str, int]]:
    """`virtfreeze backup` of a guest that writes; returns the time just before it and the last
    sequence number per disk acknowledged by then."""
    g.watcher.wait_acks(20)
    t_before = time.monotonic()
    last = {d: max(seqs) for d, seqs in g.acked(until=t_before).items()}
    out = json.loads(vf("--json", "backup", *args, g.name, env=env).stdout)
    assert out["backups"][0]["ok"], out
    return t_before, last


def delete_domain(g: Guest) -> None:
    """Destroy and undefine the guest and delete its disks, as a lost host would."""
    g.dom.destroy()
    g.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    for p in g.disks.values():
        p.unlink()


def watch(sock: Path, log: Path) -> AckWatcher:
    return AckWatcher(sock, log)


def serial_socket(conn, name: str) -> Path:
    root = ET.fromstring(conn.lookupByName(name).XMLDesc(0))
    return Path(next(s.find("source").get("path") for s in root.findall("devices/serial") if s.get("type") == "unix"))


def assert_acked_in(images: dict[str, Path], formats: dict[str, str], acked: dict[str, list[int]]) -> None:
    for target, seqs in acked.items():
        report = check_image(images[target], target, seqs, formats[target])
        assert report.checked > 0 and report.ok, (target, report)


def test_restore_from_borg_resumes_the_guest_from_memory_in_place(guest_factory, vf, tmp_path, libvirt_conn):
    g = guest_factory(TWO_DISKS)
    env = setup(vf, tmp_path, g)
    t_before, last = back_up(vf, env, g, "--memory", "--target", "borg")
    uuid, xml_before = g.uuid, g.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    g.watcher.close()
    delete_domain(g)

    listed = json.loads(vf("--json", "archives", g.name, env=env).stdout)["archives"]
    assert [a["target"] for a in listed] == ["borg"] and listed[0]["domain"] == g.name

    watcher = watch(g.sock, tmp_path / "acks-restored.log")
    try:
        t_restore = time.monotonic()
        out = json.loads(vf("--json", "restore", g.name, "--target", "borg", env=env).stdout)["restore"]
        assert (out["name"], out["uuid"], out["new"], out["state"], out["from_memory"]) == \
            (g.name, uuid, False, "running", True)
        dom = libvirt_conn.lookupByName(g.name)
        assert dom.isPersistent() and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        # It continues where it was frozen: past the last record acknowledged before, without a boot.
        watcher.wait_for(lambda acks: all(any(a.disk == d and a.seq > last[d] for a in acks) for d in last), 60,
                         "writes past the last record acknowledged before the freeze")
        assert not watcher.booted.is_set(), "the restored guest booted instead of resuming"
        first = {d: min(a.seq for a in watcher.snapshot() if a.disk == d) for d in last}
        assert all(first[d] > last[d] - 5000 for d in last), (first, last)
        t_after = time.monotonic()
        dom.destroy()
    finally:
        watcher.close()
    restored_xml = ET.fromstring(libvirt_conn.lookupByName(g.name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert {d.find("source").get("file") for d in restored_xml.findall("devices/disk")} == \
        {str(p) for p in g.disks.values()}
    assert ET.fromstring(xml_before).findtext("uuid") == restored_xml.findtext("uuid")
    # Every record acknowledged before the freeze, and every one the restored guest acknowledged.
    assert_acked_in(g.disks, g.formats, g.acked(until=t_before))
    from tests.rig.acks import acked_by_disk
    assert_acked_in(g.disks, g.formats, acked_by_disk([a for a in watcher.snapshot() if t_restore < a.t <= t_after]))
    for p in g.disks.values():
        if g.formats[p.name.split(".")[0]] == "qcow2":
            subprocess.run(["qemu-img", "check", "-q", str(p)], check=True)
    assert not list((vf.state / "restores").glob("*.json")), "restore record left behind"
    assert not list(g.workdir.glob(".virtfreeze-restore-*")), "staging left behind"


@pytest.mark.exclusive
def test_a_memory_image_the_host_compressed_resumes(guest_factory, vf, tmp_path):
    """A host whose qemu.conf sets `snapshot_image_format = "lzop"`: libvirt pipes a --memory freeze's
    memory stream through lzop. The archive restores from it on a host without that setting (the image's
    header names the program): resumed where it was frozen, not booted."""
    g = guest_factory([DiskSpec("vda", "qcow2")])
    env = setup(vf, tmp_path, g)
    with qemu_conf_setting('snapshot_image_format = "lzop"'):
        g.conn = libvirt.open(URI)  # the test's own connection died with the old daemon
        t_before, last = back_up(vf, env, g, "--memory", "--target", "dir")
    g.conn = libvirt.open(URI)
    [image] = (tmp_path / "dir-target").glob("*/memory.save")
    assert save_image.read(str(image)).decompressor == "lzop"
    assert json.loads((image.parent / "manifest.json").read_text())["memory_compression"] == "lzop"
    g.watcher.close()
    delete_domain(g)

    watcher = watch(g.sock, tmp_path / "acks-restored.log")
    try:
        out = json.loads(vf("--json", "restore", g.name, "--target", "dir", env=env).stdout)["restore"]
        assert out["from_memory"] and out["state"] == "running", out
        watcher.wait_for(lambda acks: any(a.disk == "vda" and a.seq > last["vda"] for a in acks), 60,
                         "writes past the last record acknowledged before the freeze")
        assert not watcher.booted.is_set(), "the restored guest booted instead of resuming"
        g.dom.destroy()
    finally:
        watcher.close()
    assert_acked_in(g.disks, g.formats, g.acked(until=t_before))


def assert_sparse(image: Path) -> None:
    st = os.stat(image)
    assert st.st_blocks * 512 < st.st_size // 2, f"{image}: {st.st_blocks * 512} of {st.st_size} bytes allocated"


def test_restore_from_restic_and_directory_cold_boots(guest_factory, vf, tmp_path, libvirt_conn):
    g = guest_factory([DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw", size_mib=32)])
    env = setup(vf, tmp_path, g)
    t_before, _last = back_up(vf, env, g, "--memory", "--target", "restic", "--target", "dir")
    acked = g.acked(until=t_before)
    g.watcher.close()
    delete_domain(g)

    # restic, in place, cold-booted (--no-memory): it boots and writes.
    watcher = watch(g.sock, tmp_path / "acks-restic.log")
    try:
        out = json.loads(vf("--json", "restore", g.name, "--target", "restic", "--no-memory", env=env).stdout)
        assert out["restore"]["state"] == "running" and not out["restore"]["from_memory"]
        watcher.wait_for(lambda acks: watcher.booted.is_set() and len(acks) >= 10, 60, "a boot, then writes")
        libvirt_conn.lookupByName(g.name).destroy()
    finally:
        watcher.close()
    assert_acked_in(g.disks, g.formats, acked)
    assert_sparse(g.disks["vdb"])  # restic 0.14 restores holes as zeros: they are punched again

    # The directory target, as a new domain, not started: its disk holds every record acknowledged before.
    out = json.loads(vf("--json", "restore", g.name, "--target", "dir", "--name", f"{g.name}-dir", "--no-start",
                        "--disk-dir", str(tmp_path / "dir-restored"), env=env).stdout)["restore"]
    try:
        assert out["state"] == "shutoff" and out["new"] and out["uuid"] != g.uuid
        restored = {Path(f).name.split("-")[-1].split(".")[0]: Path(f) for f in out["files"]}
        assert set(restored) == {"vda", "vdb"} and all(p.parent == tmp_path / "dir-restored" for p in restored.values())
        assert_acked_in(restored, g.formats, acked)
        assert_sparse(restored["vdb"])
        assert libvirt_conn.lookupByName(f"{g.name}-dir").state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    finally:
        libvirt_conn.lookupByName(f"{g.name}-dir").undefine()


def test_a_clone_resumed_from_memory_runs_beside_the_original(guest_factory, vf, tmp_path, libvirt_conn):
    g = guest_factory([DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw", writes=False)])
    env = setup(vf, tmp_path, g)
    t_before, last = back_up(vf, env, g, "--memory", "--target", "dir")
    quiet_disk = sha256(g.disks["vdb"])
    original_files = {p: os.stat(p).st_ino for p in g.disks.values()}

    clone = f"{g.name}-clone"
    out = vf("--json", "restore", g.name, "--target", "dir", "--name", clone, env=env)
    result = json.loads(out.stdout)["restore"]
    try:
        dom = libvirt_conn.lookupByName(clone)
        root = ET.fromstring(dom.XMLDesc(0))
        assert result["new"] and result["from_memory"] and result["state"] == "running"
        assert dom.UUIDString() != g.uuid and root.findtext("uuid") == result["uuid"]
        clone_files = {d.find("source").get("file") for d in root.findall("devices/disk")}
        assert not clone_files & {str(p) for p in g.disks}, clone_files
        sock = serial_socket(libvirt_conn, clone)
        assert sock != g.sock
        watcher = watch(sock, tmp_path / "acks-clone.log")
        try:
            t0 = time.monotonic()
            watcher.wait_for(lambda acks: any(a.disk == "vda" and a.seq > last["vda"] for a in acks), 60,
                             "the clone's writes past the freeze")
            g.watcher.wait_acks(10, after=t0)  # both run at once
            assert not watcher.booted.is_set()
            assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        finally:
            watcher.close()
        dom.destroy()
        clone_vda = next(Path(f) for f in clone_files if f.endswith("vda.qcow2"))
        assert_acked_in({"vda": clone_vda}, g.formats, {"vda": g.acked(until=t_before)["vda"]})
    finally:
        for flags in (0,):
            try:
                d = libvirt_conn.lookupByName(clone)
                if d.isActive():
                    d.destroy()
                d.undefineFlags(flags)
            except libvirt.libvirtError:
                pass
    # The original's files: the same inodes, the disk nobody wrote unchanged.
    assert {p: os.stat(p).st_ino for p in g.disks.values()} == original_files
    assert sha256(g.disks["vdb"]) == quiet_disk
    g.watcher.wait_acks(5)  # the original still writes


def test_hook_mode_borgmatic_archive_then_extract_then_restore_from_dir(guest_factory, vf, tmp_path, libvirt_conn):
    from tests.host.test_contrib import borgmatic, borgmatic_config, init_repo

    g = guest_factory([DiskSpec("vda", "qcow2")])
    vf.write_config(restore_directories=[str(g.workdir), *RIG_DIRS], memory=True)
    repo = tmp_path / "repo.borg"
    config = borgmatic_config("2.x", vf, g.name, repo, tmp_path)
    init_repo("2.x", config)
    g.watcher.wait_acks(20)
    t_before = time.monotonic()
    borgmatic("2.x", config, "create")
    acked = g.acked(until=t_before)
    g.watcher.close()
    delete_domain(g)

    dest = tmp_path / "extracted"
    dest.mkdir()
    # As the README says: only the domain's directory, then restore from it.
    inside = f"{str(vf.export).lstrip('/')}/{g.name}"
    borgmatic("2.x", config, "extract", "--archive", "latest", "--path", inside, "--destination", str(dest))
    from_dir = dest / inside
    assert [p.parent for p in dest.rglob("domain.xml")] == [from_dir]
    watcher = watch(g.sock, tmp_path / "acks-hook.log")
    try:
        out = json.loads(vf("--json", "restore", "--from", str(from_dir)).stdout)["restore"]
        assert out["from_memory"] and out["state"] == "running" and out["name"] == g.name
        watcher.wait_acks(10)
        assert not watcher.booted.is_set()
        libvirt_conn.lookupByName(g.name).destroy()
    finally:
        watcher.close()
    assert_acked_in(g.disks, g.formats, acked)
    assert (from_dir / "memory.save").exists(), "restore --from must not consume the user's extracted files"


def test_a_clone_from_a_frozen_domains_export_view(guest_factory, vf, tmp_path, libvirt_conn):
    """As the README shows: freeze --memory, restore --from the export view --name, thaw."""
    g = guest_factory([DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw", size_mib=32, block=True)])
    vf.write_config(restore_directories=[str(g.workdir), *RIG_DIRS, str(tmp_path / "clone")])
    g.watcher.wait_acks(20)
    t_before = time.monotonic()
    frozen = json.loads(vf("--json", "freeze", "--memory", g.name).stdout)["frozen"][0]
    clone = f"{g.name}-clone"
    try:
        out = json.loads(vf("--json", "restore", "--from", frozen["export_dir"], "--name", clone,
                            "--disk-dir", str(tmp_path / "clone")).stdout)["restore"]
        assert out["from_memory"] and out["state"] == "running" and out["new"]
        watcher = watch(serial_socket(libvirt_conn, clone), tmp_path / "acks-clone.log")
        try:
            watcher.wait_acks(10)
            assert not watcher.booted.is_set()
        finally:
            watcher.close()
        libvirt_conn.lookupByName(clone).destroy()
        files = {Path(f).name: Path(f) for f in out["files"]}
        assert set(files) == {f"{g.name}-clone-vda.qcow2", f"{clone}-vdb.raw"}  # the block device: a raw file
        assert_acked_in({"vda": files[f"{g.name}-clone-vda.qcow2"], "vdb": files[f"{clone}-vdb.raw"]},
                        {"vda": "qcow2", "vdb": "raw"}, g.acked(until=t_before))
    finally:
        vf("thaw", g.name)
        try:
            libvirt_conn.lookupByName(clone).undefine()
        except libvirt.libvirtError:
            pass
    g.watcher.wait_acks(5)  # the original, thawed, still writes


def test_a_disk_on_a_template_comes_back_as_a_chain_of_its_own(guest_factory, vf, tmp_path, libvirt_conn):
    """A qcow2 on a shared template: the archive holds the chain; a new domain gets its own restored chain,
    and in place (template gone too) the chain comes back where it was."""
    g = guest_factory([DiskSpec("vda", "qcow2", template=True)])
    env = setup(vf, tmp_path, g)
    t_before, _last = back_up(vf, env, g, "--target", "dir")
    acked = g.acked(until=t_before)
    template = g.workdir / "vda.template.qcow2"

    out = json.loads(vf("--json", "restore", g.name, "--target", "dir", "--name", f"{g.name}-copy", "--no-start",
                        env=env).stdout)["restore"]
    try:
        files = [Path(f) for f in out["files"]]
        assert len(files) == 2 and template not in files, files
        top = next(f for f in files if "backing" not in f.name)
        chain = json.loads(subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", str(top)],
                                          check=True, capture_output=True, text=True).stdout)
        assert [c["filename"] for c in chain] == [str(f) for f in sorted(files, key=lambda f: "backing" in f.name)]
        assert_acked_in({"vda": top}, g.formats, acked)
    finally:
        libvirt_conn.lookupByName(f"{g.name}-copy").undefine()

    g.watcher.close()
    delete_domain(g)
    template.unlink()
    out = json.loads(vf("--json", "restore", g.name, "--target", "dir", "--no-start", env=env).stdout)["restore"]
    assert set(out["files"]) == {str(g.disks["vda"]), str(template)}
    backing = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(g.disks["vda"])], check=True,
                                        capture_output=True, text=True).stdout)["backing-filename"]
    assert backing == str(template)
    assert_acked_in(g.disks, g.formats, acked)
