"""The durable journal of what virtfreeze did to each domain, and the per-domain lock.

One JSON file per domain, keyed by UUID, rewritten atomically (temp file,
fsync, rename, fsync directory) *before* every mutating step, so a crash at
any point leaves a record that `thaw` can finish from.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator

from virtfreeze.errors import DomainBusy, VirtfreezeError

VERSION = 1

# Host-wide, not per state directory: two runs with different configs must
# still never work on the same domain at once.
LOCK_DIR = Path("/run/virtfreeze/locks")


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


class Journal:
    """Per-domain records under `<state_directory>/journal/<uuid>.json`."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir) / "journal"

    def _ensure(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise VirtfreezeError(f"cannot create journal directory: {e.strerror}", path=str(self.dir),
                                  hint="check state_directory in the config") from None

    def path(self, uuid: str) -> Path:
        return self.dir / f"{uuid}.json"

    def load(self, uuid: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(uuid).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise VirtfreezeError(f"journal unreadable: {e}", path=str(self.path(uuid)),
                                  hint="move it aside; `thaw` also finds overlays without it") from None

    def write(self, record: dict[str, Any]) -> None:
        self._ensure()
        record = dict(record, version=VERSION)
        write_atomic(self.path(record["uuid"]), json.dumps(record, indent=2, sort_keys=True).encode())

    def remove(self, uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(uuid).unlink()
            _fsync_dir(self.dir)

    def all(self) -> list[dict[str, Any]]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in sorted(self.dir.glob("*.json")):
            rec = self.load(p.stem)
            if rec:
                out.append(rec)
        return out


@contextlib.contextmanager
def domain_lock(uuid: str, name: str, lock_dir: Path = LOCK_DIR) -> Iterator[None]:
    """Hold an exclusive lock on one domain for the length of a freeze or thaw.

    flock: released by the kernel when the process dies, so a crashed run never
    blocks the next one.
    """
    try:
        lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise VirtfreezeError(f"cannot create lock directory: {e.strerror}", path=str(lock_dir)) from None
    fd = os.open(lock_dir / f"{uuid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DomainBusy("another virtfreeze run is working on this domain", domain=name,
                                 hint="wait for it to finish, then run the command again") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)
