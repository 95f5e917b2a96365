"""Assertions shared by the host tests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pty
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from tests.conftest import URI
from tests.rig.guest import Guest
from tests.rig.integrity import check_image, records_in

from virtfreeze.export_view import image_size


def disk_sources(dom: libvirt.virDomain, inactive: bool = False) -> dict[str, str | None]:
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    root = ET.fromstring(dom.XMLDesc(flags))
    out = {}
    for d in root.findall("devices/disk"):
        src = d.find("source")
        out[d.find("target").get("dev")] = None if src is None else (src.get("file") or src.get("dev"))
    return out


def overlays_left(*dirs: Path) -> list[Path]:
    return [p for d in dirs if Path(d).exists() for p in Path(d).rglob("*.virtfreeze*.qcow2")]


def assert_back_on_base(g: Guest, vf=None) -> None:
    """Live and persistent definitions point at the bases; no overlay, journal or export left."""
    dom = g.dom
    want = {t: str(p) for t, p in g.disks.items()}
    if dom.isActive():
        live = disk_sources(dom)
        assert {t: live[t] for t in want} == want, f"live definition not on base: {live}"
    if dom.isPersistent():
        persistent = disk_sources(dom, inactive=True)
        assert {t: persistent[t] for t in want} == want, f"persistent definition not on base: {persistent}"
    assert overlays_left(g.workdir) == []
    if vf is not None:
        assert not vf.journal(g.uuid).exists(), "journal left behind"
        assert not (vf.export / g.name).exists(), f"export view left: {vf.export / g.name}"


def assert_all_acked_present(g: Guest) -> None:
    """Stop the guest, then every write it acknowledged must be in its base image."""
    if g.dom.isActive():
        g.dom.destroy()
    for target in g.writing:
        report = g.check(target)
        assert report.checked > 0 and report.ok, report


def copy_export(export_dir: Path, dest: Path) -> Path:
    """What a backup tool would archive: a plain copy of the export view."""
    shutil.copytree(export_dir, dest)
    return dest


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def now() -> float:
    return time.monotonic()


def assert_archive_holds_disks(g, export: Path, t_before: float) -> None:
    """Each archived image is a regular file of the frozen image's full size with every acknowledged record.

    Full size: a block device's size (fixed), else what the archived manifest
    recorded at the freeze (a qcow2 base grows when the overlay is merged).
    """
    sizes = json.loads((export / "manifest.json").read_text())["sizes"]
    for t in g.writing:
        image = export / "disks" / f"{t}.{g.formats[t]}"
        st = os.lstat(image)
        assert stat.S_ISREG(st.st_mode), f"{image} is not a regular file in the archive"
        is_block = stat.S_ISBLK(os.stat(g.disks[t]).st_mode)
        want = image_size(g.disks[t]) if is_block else sizes[f"disks/{image.name}"]
        assert st.st_size == want > 0, (image, st.st_size, want, _size_clues(g, t, image, t_before))
        if g.formats[t] == "qcow2":
            subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", str(image)], check=True)
        report = check_image(image, t, g.acked(until=t_before)[t], g.formats[t])
        assert report.checked > 0 and report.ok, report


def _size_clues(g, target: str, image: Path, t_before: float) -> dict:
    """What tells a base that changed after its freeze from a manifest that measured it wrong: the live
    base's size now, the newest record in the archived image and when the guest acknowledged it."""
    _, found = records_in(image, target, g.formats[target])
    top = max(found.values(), default=None)
    acks = {a.seq: a.t for a in g.watcher.snapshot() if a.disk == target}
    return {"base_now": image_size(g.disks[target]), "newest_record": top,
            "its_ack_after_t_before_s": None if top not in acks else round(acks[top] - t_before, 3),
            "newest_acked_before_t_before": max((s for s, t in acks.items() if t < t_before), default=None)}


def install_plugin(tmp_path: Path, dist: str, entry_point: str, source: str) -> Path:
    """Install a plugin as its own distribution (entry point group `virtfreeze`); return its site dir."""
    module = dist.replace("-", "_")
    src = tmp_path / dist
    (src / module).mkdir(parents=True)
    (src / module / "__init__.py").write_text(source)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{dist}"\nversion = "1.0"\n'
        f'[project.entry-points.virtfreeze]\n{entry_point} = "{module}"\n')
    site = tmp_path / f"site-{dist}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True)
    return site


def on_a_terminal(argv: list[str], env: dict, timeout: float = 300) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal as stdin, stdout and stderr; its exit code and what it drew."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    screen = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)  # blocks until output; EIO once the child closed the terminal
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
    finally:
        os.close(master)
    return proc.wait(timeout=timeout), screen.decode(errors="replace")


def blkio_written(group: Path, disk: str) -> int:
    """Bytes a v1 blkio cgroup has written to `disk` ("MAJOR:MINOR") through its throttle (0: no group yet)."""
    try:
        lines = (group / "blkio.throttle.io_service_bytes").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in lines:
        dev, op, *value = line.split()
        if dev == disk and op == "Write":
            return int(value[0])
    return 0


def restart_libvirtd() -> None:
    """Restart libvirtd; return once the new one serves and has reconnected to every running guest."""
    if os.path.isdir("/run/systemd/system"):
        subprocess.run(["systemctl", "restart", "libvirtd"], check=True)
    else:
        # Not a daemon killed earlier and never reaped (a zombie: without an init, nobody waits for it).
        pid = int(subprocess.check_output(["pgrep", "-x", "--runstates", "R,S,D", "libvirtd"]))
        pidfd = os.pidfd_open(pid)
        os.kill(pid, signal.SIGTERM)
        ready, _, _ = select.select([pidfd], [], [], 60)  # readable when the process has exited
        os.close(pidfd)
        assert ready, "libvirtd did not exit on SIGTERM"
        # The parent returns once the daemon listens (libvirt's remote_daemon.c: "ready to accept
        # net connections"); a connection made before its drivers are up waits until it serves.
        subprocess.run(["libvirtd", "-d"], check=True, timeout=60)
    # The new daemon reconnects to each running guest in a job of its own; a domain destroyed meanwhile
    # races it ("domain is not running"). A query job waits behind it.
    conn = libvirt.open(URI)
    try:
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            with contextlib.suppress(libvirt.libvirtError):  # it stopped meanwhile
                dom.memoryStats()
    finally:
        conn.close()


QEMU_CONF = Path("/etc/libvirt/qemu.conf")
TEST_SETTING_MARK = "# virtfreeze test setting (scripts/prepare-host.sh removes one a killed test left)"


@contextlib.contextmanager
def qemu_conf_setting(line: str):
    """libvirtd restarted with `line` added to qemu.conf, then restarted without it, pass or fail.
    Only for tests marked exclusive: every connection made before dies with the old daemon."""
    original = QEMU_CONF.read_text()
    QEMU_CONF.write_text(f"{original.rstrip(chr(10))}\n{TEST_SETTING_MARK}\n{line}\n")
    try:
        restart_libvirtd()
        yield
    finally:
        QEMU_CONF.write_text(original)
        restart_libvirtd()
