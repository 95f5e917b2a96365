"""The durable journal of what virtfreeze did to each domain, and the per-domain lock.

One JSON file per domain, keyed by UUID, rewritten atomically (temp file,
fsync, rename, fsync directory) *before* every mutating step, so a crash at
any point leaves a record that `thaw` can finish from. The record is typed
(`FrozenDomain`) and versioned: an older version is migrated when read, a
newer one refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

from virtfreeze.errors import DomainBusy, VirtfreezeError
from virtfreeze.holders import Holder
from virtfreeze.model import DiskPlan, DomainRef

log = logging.getLogger(__name__)

# 1: the untyped record of virtfreeze 0.x (the same keys, no plugin_marks). 2: FrozenDomain.
VERSION = 2

# Host-wide, not per state directory: two runs with different configs must
# still never work on the same domain at once.
LOCK_DIR = Path("/run/virtfreeze/locks")
# Host-wide too: <uuid> holds the path of the journal file with the domain's record, so that a run of
# another config (another state_directory) sees who holds a freeze before it merges it (`Journal.elsewhere`).
INDEX_DIR = Path("/run/virtfreeze/journals")


def failpoint(name: str) -> None:
    """Crash tests: VIRTFREEZE_FAILPOINT=NAME kills the process here with SIGKILL;
    NAME:stop stops it with SIGSTOP (the test continues it with SIGCONT). Fires once."""
    want = os.environ.get("VIRTFREEZE_FAILPOINT", "")
    if want == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif want == f"{name}:stop":
        del os.environ["VIRTFREEZE_FAILPOINT"]
        os.kill(os.getpid(), signal.SIGSTOP)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` durably: temp file, fsync, rename, fsync dir."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@dataclass
class FrozenDomain:
    """What virtfreeze knows about one frozen domain: its journal record.

    Read once per step and passed on; every change is written (`Journal.note`)
    before the step it prepares.
    """

    uuid: str
    name: str
    phase: str  # freezing, frozen, thawing, or discovered (rebuilt from the definitions: journal lost)
    disks: list[DiskPlan] = field(default_factory=list)
    started: str | None = None
    frozen_at: str | None = None
    state_at_freeze: str | None = None
    persistent: bool = True
    consistency: str | None = None  # quiesced, crash, memory, shutoff or none
    skipped: dict[str, str] = field(default_factory=dict)  # disk target -> why it was left out
    memory_file: str | None = None
    export_dir: str | None = None
    holders: list[Holder] = field(default_factory=list)  # the runs that hold it frozen (holders.py)
    command: str | None = None  # what froze it: freeze (hook mode) or backup (driver mode)
    # Marks of the built-in merges, so that a crash mid-merge is finished by the next thaw:
    saved_by_virtfreeze: str | None = None  # the offline merge saved the guest: "running" or "paused"
    paused_by_virtfreeze: bool | None = None  # the iterative merge paused the guest's vCPUs
    iterative_round: int | None = None
    iterative_empty: dict[str, int] = field(default_factory=dict)  # bytes of a fresh overlay, per disk
    plugin_marks: dict[str, Any] = field(default_factory=dict)  # a third-party merge plugin's own marks

    @property
    def ref(self) -> DomainRef:
        return DomainRef(self.name, self.uuid)

    def to_json(self) -> dict[str, Any]:
        return dict(asdict(self), disks=[d.to_json() for d in self.disks], version=VERSION)

    def images(self) -> list[str]:
        """The files the frozen guest writes into (overlays) and goes back to (bases)."""
        return [p.overlay for p in self.disks] + [p.base for p in self.disks]

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path | str | None = None) -> "FrozenDomain":
        """A record as written by this or an older version (migrated); a newer one is refused."""
        version = data.get("version", 1)
        if not isinstance(version, int) or version > VERSION:
            raise VirtfreezeError(f"journal written by a newer virtfreeze (record version {version}, this one "
                                  f"reads up to {VERSION})", path=str(path) if path else None,
                                  hint="thaw with that version, or move the file aside (`thaw` also finds "
                                       "overlays without it)")
        known = {f.name for f in fields(cls)}
        try:
            values = {k: v for k, v in data.items() if k in known}
            values["disks"] = [DiskPlan.from_json(d) for d in data.get("disks") or []]
            values["holders"] = [Holder.from_json(h) for h in data.get("holders") or []]
            for key in ("skipped", "iterative_empty", "plugin_marks"):
                values[key] = values.get(key) or {}
            return cls(**values)
        except (TypeError, ValueError, KeyError) as e:
            raise VirtfreezeError(f"journal record is damaged: {e}", path=str(path) if path else None,
                                  hint="move it aside; `thaw` also finds overlays without it") from None


class Journal:
    """Per-domain records under `<state_directory>/journal/<uuid>.json`, each also named in the host-wide
    index (`index_dir`, default INDEX_DIR) while it exists."""

    def __init__(self, state_dir: Path, index_dir: Path | None = None):
        self.dir = Path(os.path.abspath(state_dir)) / "journal"
        self.index_dir = index_dir

    def _ensure(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise VirtfreezeError(f"cannot create journal directory: {e.strerror}", path=str(self.dir),
                                  hint="check state_directory in the config") from None

    def path(self, uuid: str) -> Path:
        return self.dir / f"{uuid}.json"

    def load(self, uuid: str) -> FrozenDomain | None:
        path = self.path(uuid)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise VirtfreezeError(f"journal unreadable: {e}", path=str(path),
                                  hint="move it aside; `thaw` also finds overlays without it") from None
        if not isinstance(data, dict):
            raise VirtfreezeError("journal record is not an object", path=str(path),
                                  hint="move it aside; `thaw` also finds overlays without it")
        return FrozenDomain.from_json(data, path)

    def write(self, record: FrozenDomain) -> None:
        self._ensure()
        write_atomic(self.path(record.uuid), json.dumps(record.to_json(), indent=2, sort_keys=True).encode())
        self._index(record.uuid)

    def _index_entry(self, uuid: str) -> Path:
        return (self.index_dir or INDEX_DIR) / uuid

    def _index(self, uuid: str) -> None:
        """Name this journal's record in the host-wide index (kept in /run: a reboot ends every run)."""
        entry, mine = self._index_entry(uuid), str(self.path(uuid))
        if self._indexed(uuid) == mine:
            return
        try:
            entry.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(entry, mine.encode())
        except OSError as e:  # only another config's runs would miss it; the record itself is written
            log.warning("domain %s: cannot name its journal record in %s: %s", uuid, entry.parent, e.strerror)

    def _indexed(self, uuid: str) -> str | None:
        """The journal file the index names for this domain (None: none, or unreadable)."""
        try:
            return self._index_entry(uuid).read_text()
        except (OSError, ValueError):
            return None

    def elsewhere(self, uuid: str) -> tuple[Path, FrozenDomain] | None:
        """The state directory and record of another config's journal that holds this domain (the index
        names it, and it exists and reads); None when there is none."""
        named = self._indexed(uuid)
        if named is None:
            return None
        other = Path(named)
        if other == self.path(uuid) or other.name != f"{uuid}.json" or other.parent.name != "journal":
            return None
        state_dir = other.parent.parent
        try:
            record = Journal(state_dir, self.index_dir).load(uuid)
        except (OSError, ValueError, VirtfreezeError) as e:  # unreadable: nobody to defer to
            log.warning("domain %s: cannot read the journal record %s the host-wide index names: %s", uuid, other, e)
            return None
        return (state_dir, record) if record is not None else None  # None: gone (thawed)

    def note(self, record: FrozenDomain, **changes) -> None:
        """Change fields of a record and write it durably; nothing is written when nothing changes."""
        changed = False
        for key, value in changes.items():
            if not hasattr(record, key):
                raise TypeError(f"FrozenDomain has no field {key!r}")
            if getattr(record, key) != value:
                setattr(record, key, value)
                changed = True
        if changed:
            self.write(record)

    def remove(self, uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(uuid).unlink()
            _fsync_dir(self.dir)
        if self._indexed(uuid) == str(self.path(uuid)):  # else another config's record is named since: theirs
            with contextlib.suppress(OSError):
                self._index_entry(uuid).unlink()

    def all(self) -> list[FrozenDomain]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in sorted(self.dir.glob("*.json")):
            rec = self.load(p.stem)
            if rec:
                out.append(rec)
        return out

    def readable(self, on_error: Callable[[Exception], None]) -> list[FrozenDomain]:
        """Every record that can be read; `on_error` gets why each other one (or the directory) cannot."""
        try:
            self.dir.stat()  # not is_dir(): Python 3.14's says False for a directory it may not search
            if not os.access(self.dir, os.R_OK | os.X_OK):  # glob would find nothing, silently
                raise PermissionError(errno.EACCES, "cannot read the journal", str(self.dir))
            paths = sorted(self.dir.glob("*.json"))
        except FileNotFoundError:
            return []
        except OSError as e:
            on_error(e)
            return []
        out = []
        for p in paths:
            try:
                rec = self.load(p.stem)
            except VirtfreezeError as e:
                on_error(e)
                continue
            if rec:
                out.append(rec)
        return out


@contextlib.contextmanager
def domain_lock(uuid: str, name: str, lock_dir: Path = LOCK_DIR, wait: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on one domain for the length of a freeze or thaw.

    flock: released by the kernel when the process dies, so a crashed run never
    blocks the next one. Another run holding it is waited for up to `wait`
    seconds (flock has no timeout: it is tried again, at most every 0.2 s);
    overlapping schedules often hold a domain's lock for a moment only (a
    bare `thaw` that leaves another run's freeze alone).
    """
    try:
        lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise VirtfreezeError(f"cannot create lock directory: {e.strerror}", path=str(lock_dir)) from None
    fd = os.open(lock_dir / f"{uuid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline, delay, said = time.monotonic() + wait, 0.01, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise DomainBusy("another virtfreeze run is working on this domain"
                                 + (f" (waited {wait:g}s)" if wait else ""), domain=name,
                                 hint="wait for it to finish, then run the command again (lock_wait: how long "
                                      "a run waits)")
            if not said:
                log.info("domain %r: another virtfreeze run is working on it; waiting up to %gs", name, wait)
                said = True
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)
