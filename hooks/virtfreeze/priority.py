"""The archive runs behind the guests: low CPU and I/O priority for the tools that read the disks.

In driver mode the archive (borg, restic, the directory target's copy)
competes with the running guests for the host's CPUs and disks; the guest's
writes then stall. Inside `archiving(...)`, every command the thread runs
through `runner.run` is started under `nice` and `ionice` and joins a cgroup
with a small CPU weight (cgroup v2 `cpu.weight`, or v1 `cpu.shares`, as this
host has; no systemd needed), and the thread's own work (an in-process copy)
runs niced. `ionice` classes are honoured by BFQ, and by mq-deadline since
Linux 5.15 (it serves idle-class requests after the others, up to its
`prio_aging_expire`); `none` ignores them, and page-cache writeback done by
the kernel's flusher carries no class.

With `write_bps`, the same commands' writes to the disks holding the
guests' images are limited (cgroup v2 `io.max` wbps, v1
`blkio.throttle.write_bps_device`): a repository on the images' disk then
no longer floods it with writes, and the guests' own flushes no longer
queue behind them (`bench/contention.py`: borg 64 ms stall unlimited, 18 ms
at 200 MB/s, taking 3.0 against 1.7 s). What is limited: on v1, the writes
a tool submits itself (its fsyncs, O_DIRECT) and the writeback that
archive_writeback's thread starts for it (the thread joins the group), not
what the kernel's flusher writes back on its own; on v2 page-cache
writeback too where the memory controller is enabled beside io. On v1 the
calling thread joins the group as well (the directory target's in-process
copy, which fsyncs each file); v2 cannot move one thread, so there that
copy is not limited.

With `writeback_interval` (on by default), what the archive writes to those
disks is sent to disk while it runs, in small steps, instead of in one burst
at the tool's final flush (see archive_writeback).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from virtfreeze import archive_writeback
from virtfreeze.logs import domain_log

log = logging.getLogger(__name__)

CGROUP_NAME = "virtfreeze-archive"
CGROUP_ROOT = Path("/sys/fs/cgroup")
_IONICE = {"idle": ["ionice", "-c", "3"], "best-effort": ["ionice", "-c", "2", "-n", "7"], "none": []}
_current = threading.local()
_cgroup_lock = threading.Lock()
_cgroups: dict[tuple[Path, int], Path | None] = {}
_write_groups: dict[tuple[Path, int, frozenset[str]], tuple[str, Path] | None] = {}


@dataclass(frozen=True)
class Priority:
    nice: int = 19  # 0 (normal) .. 19 (lowest)
    ionice: str = "idle"  # idle, best-effort (lowest level) or none
    cpu_weight: int | None = 10  # cgroup CPU weight, 1..10000 (everything else has 100); None: no cgroup
    write_bps: int | None = None  # bytes/s the archive may write to a disk holding the guests' images; None: any
    writeback_interval: float | None = archive_writeback.INTERVAL  # s between writeback starts; None: the kernel's

    @classmethod
    def from_config(cls, settings: dict | None) -> "Priority":
        return cls(**(settings or {}))

    @property
    def normal(self) -> bool:
        return (self.nice == 0 and self.ionice == "none" and self.cpu_weight is None and self.write_bps is None
                and self.writeback_interval is None)


def disks_under(path: str | Path) -> frozenset[str]:
    """"MAJOR:MINOR" of each whole disk that writes to `path` reach: the device of its file system (or
    `path` itself when it is a block device), the disk of a partition, the disks beneath device-mapper or
    md (LVM, dm-crypt, RAID: a write limit applies to whole disks, and writes through an LV reach them as
    writes of the same cgroup). Empty where no block device is beneath (tmpfs, btrfs, NFS). `path` need
    not exist yet: its nearest existing parent decides."""
    path = Path(path)
    while True:
        try:
            st = os.stat(path)
            break
        except FileNotFoundError:
            if path.parent == path:
                return frozenset()
            path = path.parent
        except OSError:
            return frozenset()
    return disks_of_device(st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev)


def disks_of_device(dev: int) -> frozenset[str]:
    """"MAJOR:MINOR" of each whole disk beneath block device number `dev` (a file system's st_dev); empty
    for an anonymous device (tmpfs, overlayfs, btrfs subvolumes, NFS)."""
    if os.major(dev) == 0:
        return frozenset()
    try:
        return _disks_beneath(Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve())
    except OSError:
        return frozenset()


def _disks_beneath(node: Path, class_block: Path = Path("/sys/class/block"), depth: int = 0) -> frozenset[str]:
    """The whole disks under a sysfs block device directory (a partition's parent; a dm/md device's
    slaves, recursively)."""
    if (node / "partition").exists():
        node = node.parent
    slaves = sorted((node / "slaves").iterdir()) if (node / "slaves").is_dir() and depth < 8 else []
    if not slaves:
        return frozenset({(node / "dev").read_text().strip()})
    return frozenset().union(*(_disks_beneath((class_block / s.name).resolve(), class_block, depth + 1)
                               for s in slaves))


def _make_group(root: Path, controller: str, name: str, v2_files: list[tuple[str, str]],
                v1_hierarchy: str, v1_files: list[tuple[str, str]]) -> tuple[str, Path] | None:
    """("v2"|"v1", directory) of the cgroup `name` with these files written: on v2 where `controller` is
    delegated, else in the v1 hierarchy that has the first of `v1_files`; None where this host does not let
    us (no such controller, read-only, a systemd-managed hierarchy we may not write)."""
    def made(group: Path, files: list[tuple[str, str]]) -> Path:
        group.mkdir(exist_ok=True)
        for file, text in files:
            (group / file).write_text(text)
        return group

    try:
        if controller in (root / "cgroup.subtree_control").read_text().split():  # cgroup v2
            return "v2", made(root / name, v2_files)
    except OSError as e:
        log.debug("no v2 cgroup %s for the archive: %s", name, e)
    if (root / v1_hierarchy / v1_files[0][0]).exists():  # cgroup v1
        try:
            return "v1", made(root / v1_hierarchy / name, v1_files)
        except OSError as e:
            log.debug("no v1 cgroup %s for the archive: %s", name, e)
    return None


def write_limit_group(bps: int, disks: frozenset[str], root: Path = CGROUP_ROOT) -> tuple[str, Path] | None:
    """("v2"|"v1", group directory) of a cgroup limiting writes to `disks` to `bps` (one per rate and set of
    disks, so that runs with other disks do not widen it), or None where this host does not let us. On v2
    it holds the CPU weight as well (a process is in one v2 cgroup)."""
    with _cgroup_lock:
        key = (root, bps, disks)
        if key not in _write_groups:
            listed = sorted(disks)
            name = f"{CGROUP_NAME}-write-{bps}-{hashlib.sha256(' '.join(listed).encode()).hexdigest()[:8]}"
            _write_groups[key] = _make_group(
                root, "io", name, [("io.max", f"{d} wbps={bps}\n") for d in listed],
                "blkio", [("blkio.throttle.write_bps_device", f"{d} {bps}\n") for d in listed])
        return _write_groups[key]


def cgroup_procs(weight: int, root: Path = CGROUP_ROOT) -> Path | None:
    """The `cgroup.procs` of a cgroup with this CPU weight (made once), or None where this host does
    not let us."""
    with _cgroup_lock:
        if (root, weight) not in _cgroups:
            found = _make_group(root, "cpu", f"{CGROUP_NAME}-{weight}", [("cpu.weight", f"{weight}\n")],
                                "cpu", [("cpu.shares", f"{max(2, weight * 1024 // 100)}\n")])
            _cgroups[root, weight] = found[1] / "cgroup.procs" if found else None
        return _cgroups[root, weight]


def command_prefix() -> list[str]:
    """What `runner.run` puts before a command run inside `archiving` (empty outside)."""
    prio = getattr(_current, "priority", None)
    if prio is None:
        return []
    return [*_IONICE[prio.ionice], *(["nice", "-n", str(prio.nice)] if prio.nice else [])]


def child_cgroups() -> list[Path]:
    """The cgroup.procs files a command run inside `archiving` joins before it execs (none outside)."""
    return list(getattr(_current, "cgroups", ()))


@contextlib.contextmanager
def running(pid: int) -> Iterator[None]:
    """A command `runner.run` started (inside `archiving`: what it writes to the guests' disks is written
    back as it goes)."""
    commands = getattr(_current, "commands", None)
    if commands is None:
        yield
        return
    commands.add(pid)
    try:
        yield
    finally:
        commands.discard(pid)


def _archive_cgroups(prio: Priority, disks: frozenset[str], say,
                     root: Path = CGROUP_ROOT) -> tuple[list[Path], Path | None]:
    """The cgroup.procs files the archive's commands join, and a v1 blkio group's `tasks` for the thread."""
    limit = write_limit_group(prio.write_bps, disks, root) if disks else None
    if disks and limit is None:
        say.warning("archive_priority.write_bps: no cgroup limiting the archive's writes could be made here "
                    "(it needs cgroup v2 with io delegated, or v1 blkio; -v says why); they are not limited")
    if limit and limit[0] == "v2":  # one cgroup per process: the CPU weight goes into the limiting group
        if prio.cpu_weight:
            with contextlib.suppress(OSError):
                (limit[1] / "cpu.weight").write_text(f"{prio.cpu_weight}\n")
        return [limit[1] / "cgroup.procs"], None
    cpu = cgroup_procs(prio.cpu_weight, root) if prio.cpu_weight else None
    procs = [p for p in (cpu, limit[1] / "cgroup.procs" if limit else None) if p]
    return procs, (limit[1] / "tasks" if limit else None)


def blkio_group(proc_cgroup: str) -> Path | None:
    """The v1 blkio cgroup's directory named in a /proc/<pid>/cgroup text (None: no blkio hierarchy)."""
    for line in proc_cgroup.splitlines():
        _id, controllers, path = line.split(":", 2)
        if "blkio" in controllers.split(","):
            return CGROUP_ROOT / "blkio" / path.lstrip("/")
    return None


def _blkio_tasks_of_this_thread() -> Path | None:
    """The v1 blkio cgroup's `tasks` this thread is in now (to go back to)."""
    with contextlib.suppress(OSError):
        group = blkio_group(Path("/proc/thread-self/cgroup").read_text())
        return group / "tasks" if group else None
    return None


def _join(tasks: Path, tid: int, say) -> bool:
    """Move thread `tid` into the v1 cgroup of `tasks`; False (and a warning) when it could not."""
    try:
        tasks.write_text(f"{tid}\n")
        return True
    except OSError as e:
        say.warning("archive_priority.write_bps: could not move the archive's thread into %s: %s",
                    tasks.parent, e.strerror)
        return False


@contextlib.contextmanager
def archiving(prio: Priority, images: list[str] | tuple[str, ...] = (), domain: str | None = None) -> Iterator[None]:
    """Commands this thread runs inside the block, and the thread itself, run at `prio`; `images`: the
    files of `domain` (overlays and bases) whose disks `prio.write_bps` protects."""
    if prio.normal:
        yield
        return
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    say = domain_log(log, domain) if domain else log
    disks = (frozenset().union(*map(disks_under, images))
             if prio.write_bps or prio.writeback_interval else frozenset())
    if (prio.write_bps or prio.writeback_interval) and images and not disks:
        say.info("archive_priority: its images are on no block device (tmpfs, btrfs, NFS); the archive's "
                 "writes are neither limited (write_bps) nor sent to disk as it goes (writeback_interval)")
    cgroups, thread_group = _archive_cgroups(prio, disks if prio.write_bps else frozenset(), say)
    back = _blkio_tasks_of_this_thread() if thread_group else None
    commands = archive_writeback.Commands()
    written_back = (archive_writeback.written_as_made(
        commands, lambda dev: bool(disks_of_device(dev) & disks), prio.writeback_interval,
        join=(lambda t: _join(thread_group, t, say)) if thread_group else None, say=say, name=domain or "archive")
        if prio.writeback_interval and disks else contextlib.nullcontext())
    _current.priority = prio
    _current.cgroups = cgroups
    _current.commands = commands
    moved = False
    try:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, prio.nice)  # this thread only (Linux): an in-process copy
        if back is not None:  # v1 moves threads one by one: the in-process copy's writes are limited too
            moved = _join(thread_group, tid, say)
        with written_back:
            yield
    finally:
        _current.priority = None
        _current.cgroups = ()
        _current.commands = None
        if moved:
            _join(back, tid, say)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, before)
