"""Sends the archive's writes to the guests' disks as the tools make them, not in one burst at their end.

A backup tool writes its repository through the host's page cache and
flushes it once it is done: borg 1.2.4 (Debian 12) fdatasyncs a segment only
as it closes it (up to 500 MiB; it calls no sync_file_range here, strace),
so a 512 MiB archive reached the disk in 0.15 s at the very end, 32 requests
deep, and a guest writing on that disk waited up to 50 ms for its own
writes. While an archive runs, a thread starts the writeback of each file
the archive's commands (and this process: the directory target's copy) hold
open for writing on a disk of the frozen guests, every `interval` seconds
(`posix_fadvise(DONTNEED)`, as base_writeback does for a commit's base:
asynchronous, it waits for nothing). The data then goes out in small steps
while the tool reads and compresses, and its final flush finds little left:
`bench/contention.py` measured the guest's largest stall fall from 40 to
21 ms, and borg's own run from 1.69 to 1.45 s. Files on other disks are left to
the kernel, and so are unlinked ones (restic's temporary packs), whose
pages need never reach a disk. A file's disk is its mount's device
(mountinfo), never a stat of the file (on NFS that waits for its writeback):
on an overlayfs whose mount shows an anonymous device, the files it passes
through to a disk are left to the kernel too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Callable, Iterator

from virtfreeze import periodic

log = logging.getLogger(__name__)

INTERVAL = 0.025  # seconds between two writeback starts: about 9 MiB of a 350 MB/s archive


class Commands:
    """The processes of the archive's running commands (runner.run adds and removes them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pids: set[int] = set()

    def add(self, pid: int) -> None:
        with self._lock:
            self._pids.add(pid)

    def discard(self, pid: int) -> None:
        with self._lock:
            self._pids.discard(pid)

    def pids(self) -> list[int]:
        with self._lock:
            return sorted(self._pids)


def files_written_by(pid: int) -> list[tuple[str, int]]:
    """(/proc/<pid>/fd link, mount id) of each file `pid` holds open for writing, read from fdinfo alone:
    nothing is stat'ed or opened here (a stat on NFS would wait for the file's writeback). Empty when the
    process is gone or not ours to look into."""
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            info = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
                        if ":" in line)
            if int(info["flags"], 8) & (os.O_WRONLY | os.O_RDWR):
                found.append((f"/proc/{pid}/fd/{fd}", int(info["mnt_id"])))
        except (OSError, KeyError, ValueError):  # closed meanwhile, or not ours
            continue
    return found


def mount_devices(pid: int) -> dict[int, int]:
    """Mount id -> device number (st_dev of the files on it), from /proc/<pid>/mountinfo."""
    devices = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
            mount_id, _parent, major_minor = line.split()[:3]
            major, minor = major_minor.split(":")
            devices[int(mount_id)] = os.makedev(int(major), int(minor))
    return devices


def start_writeback(link: str) -> bool:
    """Start the writeback of a file's dirty pages (and drop its clean ones). False, touching nothing, for
    what is not a regular file still linked (an unlinked file's pages need never reach a disk; an fd closed
    and reused for a device meanwhile is never opened: O_PATH first), or cannot be opened."""
    try:
        pinned = os.open(link, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(pinned)
        if not stat.S_ISREG(st.st_mode) or not st.st_nlink:
            return False
        fd = os.open(f"/proc/self/fd/{pinned}", os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    finally:
        os.close(pinned)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def written_as_made(commands: Commands, on_guest_disk: Callable[[int], bool], interval: float = INTERVAL,
                    join: Callable[[int], bool] | None = None, say: logging.LoggerAdapter | logging.Logger = log,
                    name: str = "archive") -> Iterator[None]:
    """While inside, every `interval` seconds start the writeback of what the `commands` and this process
    write into files on a guest's disk (`on_guest_disk(st_dev)`). `join(tid)` first puts the thread where
    the archive's writes are limited (`write_bps`), so what it writes back is limited too. This only
    spares the guests: whatever fails here is logged (-v) and never fails the archive."""
    started = [0]
    wanted: dict[int, bool] = {}  # st_dev -> on a guest's disk
    devices: dict[int, dict[int, int | None]] = {}  # pid -> its mount ids' devices

    def on_a_guests_disk(pid: int, mount_id: int) -> bool:
        if mount_id not in devices.get(pid, {}):  # a process not seen yet, or mounted since
            devices[pid] = mount_devices(pid)
            devices[pid].setdefault(mount_id, None)  # pipes, sockets: kernel mounts mountinfo never lists
        dev = devices[pid][mount_id]
        if dev is not None and dev not in wanted:
            wanted[dev] = on_guest_disk(dev)
        return dev is not None and wanted[dev]

    def kick() -> bool:
        try:
            for pid in [os.getpid(), *commands.pids()]:
                for link, mount_id in files_written_by(pid):
                    if on_a_guests_disk(pid, mount_id) and start_writeback(link):
                        started[0] += 1
            return True
        except Exception:  # noqa: BLE001 - a bug here must not print a traceback or touch the archive
            say.debug("the archive's writeback thread stopped", exc_info=True)
            return False

    setup = (lambda: join(threading.get_native_id())) if join is not None else None
    try:
        with periodic.every(interval, kick, f"writeback:{name}", setup):
            yield
    finally:
        say.debug("the archive's writes to the guests' disks: %d writeback starts while it ran", started[0])
