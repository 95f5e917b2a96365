"""The archive runs behind the guests: low CPU and I/O priority for the tools that read the disks.

In driver mode the archive (borg, restic, the directory target's copy)
competes with the running guests for the host's CPUs and disks; the guest's
writes then stall. Inside `archiving(...)`, every command the thread runs
through `runner.run` is started under `nice` and `ionice` and joins a cgroup
with a small CPU weight (cgroup v2 `cpu.weight`, or v1 `cpu.shares`, as this
host has; no systemd needed), and the thread's own work (an in-process copy)
runs niced. `ionice` classes work with the BFQ and CFQ schedulers only
(mq-deadline and none ignore them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

CGROUP_NAME = "virtfreeze-archive"
CGROUP_ROOT = Path("/sys/fs/cgroup")
_IONICE = {"idle": ["ionice", "-c", "3"], "best-effort": ["ionice", "-c", "2", "-n", "7"], "none": []}
_current = threading.local()
_cgroup_lock = threading.Lock()
_cgroups: dict[int, Path | None] = {}


@dataclass(frozen=True)
class Priority:
    nice: int = 19  # 0 (normal) .. 19 (lowest)
    ionice: str = "idle"  # idle, best-effort (lowest level) or none
    cpu_weight: int | None = 10  # cgroup CPU weight, 1..10000 (everything else has 100); None: no cgroup

    @classmethod
    def from_config(cls, settings: dict | None) -> "Priority":
        return cls(**(settings or {}))

    @property
    def normal(self) -> bool:
        return self.nice == 0 and self.ionice == "none" and self.cpu_weight is None


def cgroup_procs(weight: int, root: Path = CGROUP_ROOT) -> Path | None:
    """The `cgroup.procs` of a cgroup with this CPU weight (made once), or None where this host does
    not let us (no cpu controller, read-only, a systemd-managed hierarchy we may not write)."""
    with _cgroup_lock:
        if weight in _cgroups:
            return _cgroups[weight]
        found = None
        try:
            if "cpu" in (root / "cgroup.subtree_control").read_text().split():  # cgroup v2, cpu delegated
                group = root / f"{CGROUP_NAME}-{weight}"
                group.mkdir(exist_ok=True)
                (group / "cpu.weight").write_text(f"{weight}\n")
                found = group / "cgroup.procs"
        except OSError:
            pass
        if found is None and (root / "cpu" / "cpu.shares").exists():  # cgroup v1
            try:
                group = root / "cpu" / f"{CGROUP_NAME}-{weight}"
                group.mkdir(exist_ok=True)
                (group / "cpu.shares").write_text(f"{max(2, weight * 1024 // 100)}\n")
                found = group / "cgroup.procs"
            except OSError as e:
                log.debug("no cgroup for the archive: %s", e)
        _cgroups[weight] = found
        return found


def command_prefix() -> list[str]:
    """What `runner.run` puts before a command run inside `archiving` (empty outside)."""
    prio = getattr(_current, "priority", None)
    if prio is None:
        return []
    return [*_IONICE[prio.ionice], *(["nice", "-n", str(prio.nice)] if prio.nice else [])]


def child_cgroup() -> Path | None:
    """The cgroup.procs a command run inside `archiving` joins before it execs (None outside)."""
    return getattr(_current, "cgroup", None)


@contextlib.contextmanager
def archiving(prio: Priority) -> Iterator[None]:
    """Commands this thread runs inside the block, and the thread itself, run at `prio`."""
    if prio.normal:
        yield
        return
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    _current.priority = prio
    _current.cgroup = cgroup_procs(prio.cpu_weight) if prio.cpu_weight else None
    try:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, prio.nice)  # this thread only (Linux): an in-process copy
        yield
    finally:
        _current.priority = None
        _current.cgroup = None
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, before)
