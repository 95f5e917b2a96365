"""The export view: what borg and restic read while a domain is frozen.

`<export>/<domain>/` holds domain.xml, disks/<target>.<format> (the frozen
base images, read-only), memory.save, nvram.fd, tpm/, manifest.json and
paths.txt. Large files stay on disk storage and only appear here, so the
export directory may be on tmpfs:

- an image file through a read-only bind mount;
- a block device (LVM volume, zvol, partition) as a read-only *regular file*
  of the device's size, through a FUSE view (`virtfreeze.device_view`, one
  small process per device): borg would store a device node as a 0-byte
  node and restic cannot read one, so every tool must see its data as a
  file;
- a disk in the segmented layout (`segmented_export`) as a directory of
  segment files, disks/<target>.segments/, through a segment view
  (`virtfreeze.segment_view`).

A view is found again by the mountpoint in its argv, so a crashed run's
view is stopped by the next `thaw` too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path

from virtfreeze import device_view, guest_view, runner, segment_view
from virtfreeze.errors import VirtfreezeError
from virtfreeze.journal import write_atomic
from virtfreeze.segment_stamps import segment_count

log = logging.getLogger(__name__)


def domain_dir_name(name: str, uuid: str) -> str:
    """A directory name for a domain that cannot escape the export directory."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        return uuid
    return name


# mount(2) and umount2(2) flags (linux/mount.h, sys/mount.h)
MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
MNT_DETACH, UMOUNT_NOFOLLOW = 2, 8
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_KEPT_FLAGS = os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC  # same bits as MS_NOSUID, MS_NODEV, MS_NOEXEC


def _syscall(what: str, path: Path, result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise VirtfreezeError(f"{what} failed: {os.strerror(err)}", path=str(path),
                              hint="virtfreeze needs root (CAP_SYS_ADMIN) for the export view"
                              if err in (errno.EPERM, errno.EACCES) else None)


def bind_readonly(source: Path, target: Path) -> None:
    """Make `source` appear read-only at `target` (a file or a block device).

    mount(2) itself, not the mount program: two calls instead of two
    processes per disk (a freeze of many domains spent a quarter of its
    time starting them).
    """
    target.touch(mode=0o600, exist_ok=True)
    _syscall(f"bind mount of {source}", target,
             _libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None))
    try:
        kept = os.statvfs(target).f_flag & _KEPT_FLAGS  # as the mount program does: keep nosuid, nodev, noexec
        _syscall("read-only remount", target,
                 _libc.mount(None, os.fsencode(target), None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept, None))
    except VirtfreezeError:
        unmount(target)
        raise


def unmount(target: Path) -> None:
    """Unmount `target` (never following a symlink there); detach lazily when it is busy."""
    try:
        _syscall("umount", target, _libc.umount2(os.fsencode(target), UMOUNT_NOFOLLOW))
    except VirtfreezeError as e:
        if is_mountpoint(target):
            log.warning("path %s: %s; detaching lazily", target, e.message)
            with contextlib.suppress(VirtfreezeError):
                _syscall("lazy umount", target, _libc.umount2(os.fsencode(target), UMOUNT_NOFOLLOW | MNT_DETACH))


# -- block devices: a read-only regular file through a FUSE view (virtfreeze.device_view) --------------

VIEW_START_TIMEOUT = 30.0  # seconds a device view gets to mount
VIEW_STOP_TIMEOUT = runner.STOP_TIMEOUT  # seconds a view gets to unmount and exit after SIGTERM
VIEW_READAHEAD_KB = 4096


def is_block_device(path: str | Path) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def image_size(path: str | Path) -> int:
    """Bytes a reader of `path` gets: a file's length, or a block device's size."""
    try:
        with open(path, "rb") as fh:
            return fh.seek(0, os.SEEK_END)
    except OSError as e:
        raise VirtfreezeError(f"cannot read the image: {e.strerror}", path=str(path)) from None


def pids_serving(directory: Path) -> list[int]:
    """Pids of the views serving a file under `directory`: device views, segment views and guest views
    (qemu-storage-daemon), found by the mountpoint in their argv."""
    prefix = str(directory).rstrip("/") + "/"
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                argv = [a.decode(errors="surrogateescape") for a in fh.read().split(b"\0") if a]
        except OSError:
            continue  # exited meanwhile
        mountpoint = (device_view.mountpoint_of(argv) or segment_view.mountpoint_of(argv)
                      or guest_view.mountpoint_of(argv))
        if mountpoint and mountpoint.startswith(prefix):
            pids.append(int(entry.name))
    return pids


def expose_device(device: Path, mountpoint: Path) -> None:
    """Show a block device read-only as a regular file at `mountpoint` (created here)."""
    mountpoint.touch(mode=0o400, exist_ok=True)
    runner.start_daemon(lambda fd: device_view.argv_for(str(device), str(mountpoint), fd), what="device view",
                        timeout=VIEW_START_TIMEOUT, path=str(device),
                        install_hint="it needs /dev/fuse and libfuse3 (Debian: libfuse3-3)")
    raise_readahead(mountpoint)


def raise_readahead(mountpoint: Path) -> None:
    """A FUSE mount reads ahead 128 KiB by default: too little to keep a backup tool busy.

    Measured here (bench/block_view.py's setup, no guest running): borg through the view at
    0.74x the device's speed with 128 KiB, 0.85x with 4 MiB.
    """
    dev = os.stat(mountpoint).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        knob.write_text(f"{VIEW_READAHEAD_KB}\n")
    except OSError as e:
        log.debug("path %s: cannot raise the read-ahead of its device view: %s", mountpoint, e.strerror)


def expose_segments(source: str, mountpoint: Path, stamps: Path, counters: Path, *, domain: str,
                    disk: str) -> None:
    """Show `source` as segment files in the directory `mountpoint` (created here; segment_view)."""
    mountpoint.mkdir(mode=0o500)
    runner.start_daemon(lambda fd: segment_view.argv_for(source, str(mountpoint), str(stamps), str(counters), fd),
                        what="segment view", timeout=VIEW_START_TIMEOUT, domain=domain, disk=disk, path=source,
                        install_hint="it needs /dev/fuse and libfuse3 (Debian: libfuse3-3)")
    raise_readahead(mountpoint)


def unescape_mountinfo(field: str) -> str:
    """Undo the octal escapes (\\040 for a space, ...) of a /proc/self/mountinfo field."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mountinfo_paths() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        return [unescape_mountinfo(line.split()[4]) for line in fh]


def is_mountpoint(path: Path) -> bool:
    return str(path) in _mountinfo_paths()


def mounts_under(directory: Path) -> list[Path]:
    prefix = str(directory).rstrip("/") + "/"
    return sorted((Path(p) for p in _mountinfo_paths() if p.startswith(prefix)), key=lambda p: -len(str(p)))


def stop_views(directory: Path) -> None:
    """Stop every view serving a file under `directory` (also a crashed run's)."""
    for pid in pids_serving(directory):
        runner.stop_pid(pid, timeout=VIEW_STOP_TIMEOUT, what="view")


def remove(directory: Path, guest_views: Path | None = None) -> None:
    """Unmount everything under a domain's export directory, stop its views, delete it; then stop the
    guest views (`guest_view`) under `guest_views` the segment views read."""
    views = pids_serving(directory)
    for mp in mounts_under(directory):  # stacked mounts (a device view) are listed once per layer
        unmount(mp)
    for pid in views:  # unmounted, each exits on its own (a segment view writes its counters first)
        runner.stop_pid(pid, timeout=VIEW_STOP_TIMEOUT, what="view", grace=VIEW_STOP_TIMEOUT)
    for mp in mounts_under(directory):
        unmount(mp)
    if mounts_under(directory):
        raise VirtfreezeError("export view still has mounts; not deleting it", path=str(directory),
                              hint="check what holds them open (borg or restic still running?)")
    shutil.rmtree(directory, ignore_errors=True)
    if guest_views is not None:
        guest_view.stop_all(guest_views)


def backing_name(target: str, depth: int, fmt: str) -> str:
    """Export name of the depth-th image below a disk's base (1 = its backing file)."""
    return f"disks/{target}.backing-{depth}.{fmt}"


def create(directory: Path, *, inactive_xml: str, disks: dict[str, tuple[str, str, tuple]],
           memory_file: Path | None, nvram: str | None, tpm_dir: Path | None,
           manifest: dict, segmented: dict | None = None) -> dict:
    """Build a domain's export view; return the manifest as written.

    `disks` maps target -> (base image path, format, backing chain of the base).
    A base on a backing chain (a template) is exported with its whole chain.
    A disk in `segmented` (target -> segmented_export.SegmentedDisk) is
    exported instead as segment files of its guest-visible bytes.
    The manifest gains `files` (what the view holds) and `sizes` (the bytes
    an archive must hold for each data file), and each disk its `size`.
    """
    if directory.exists():
        remove(directory)
    directory.mkdir(parents=True, mode=0o700)
    try:
        return _populate(directory, inactive_xml, disks, memory_file, nvram, tpm_dir, manifest, segmented or {})
    except BaseException:
        remove(directory)  # no half-built view, no daemon left behind
        raise


def _populate(directory: Path, inactive_xml: str, disks: dict[str, tuple[str, str, tuple]],
              memory_file: Path | None, nvram: str | None, tpm_dir: Path | None, manifest: dict,
              segmented: dict) -> dict:
    paths: list[Path] = []
    sizes: dict[str, int] = {}

    def expose(source: Path, dst: Path) -> None:
        if is_block_device(source):
            expose_device(source, dst)
        else:
            bind_readonly(source, dst)
        sizes[str(dst.relative_to(directory))] = image_size(source)
        paths.append(dst)

    xml_path = directory / "domain.xml"
    write_atomic(xml_path, inactive_xml.encode())
    paths.append(xml_path)

    disk_dir = directory / "disks"
    disk_dir.mkdir(mode=0o700)
    for target, (base, fmt, chain) in sorted(disks.items()):
        if target in segmented:
            seg = segmented[target]
            dst = disk_dir / f"{target}.segments"
            expose_segments(seg.source, dst, seg.stamps_file, seg.counters_file, domain=manifest.get("domain"),
                            disk=target)
            count = segment_count(seg.size, seg.segment_size)
            for i in range(count):
                sizes[f"disks/{target}.segments/{segment_view.segment_name(i, count)}"] = \
                    min(seg.segment_size, seg.size - i * seg.segment_size)
            paths.append(dst)
            continue
        expose(Path(base), disk_dir / f"{target}.{fmt}")
        for depth, (image, image_fmt) in enumerate(chain, 1):
            expose(Path(image), directory / backing_name(target, depth, image_fmt))

    if memory_file is not None:
        expose(memory_file, directory / "memory.save")
    if nvram and os.path.exists(nvram):
        dst = directory / "nvram.fd"
        shutil.copyfile(nvram, dst)
        os.chmod(dst, 0o600)
        sizes["nvram.fd"] = image_size(dst)
        paths.append(dst)
    if tpm_dir is not None and tpm_dir.is_dir():
        dst = directory / "tpm"
        shutil.copytree(tpm_dir, dst, symlinks=True)
        paths.append(dst)

    manifest_path = directory / "manifest.json"
    disk_entries = {t: segmented[t].manifest_entry(dict(d, size=segmented[t].size)) if t in segmented
                    else dict(d, size=sizes.get(d.get("file"))) for t, d in manifest.get("disks", {}).items()}
    manifest = dict(manifest, disks=disk_entries, files=[str(p.relative_to(directory)) for p in paths],
                    sizes=sizes)
    write_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())
    paths.append(manifest_path)
    write_atomic(directory / "paths.txt", "".join(f"{p}\n" for p in paths).encode())
    return manifest


def write_index(export_root: Path) -> None:
    """The top-level paths.txt: every frozen domain's paths, for --paths-from-command/--files-from."""
    lines = []
    if export_root.is_dir():
        for sub in sorted(export_root.iterdir()):
            with contextlib.suppress(OSError):
                if sub.is_dir():
                    lines.append((sub / "paths.txt").read_text())
    export_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(export_root / "paths.txt", "".join(lines).encode())
