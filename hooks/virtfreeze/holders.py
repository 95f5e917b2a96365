"""Which run holds a freeze: the process session, identified by its leader's start time.

A freeze belongs to the run that made it. The recipes call `freeze` and
`thaw` as two processes, so a run is not a process: it is the session they
share. borgmatic's or the restic wrapper's hooks run in the session of the
job that started them; cron and systemd give every job its own session; an
operator's commands share their terminal's. A session is identified by its
id (the leader's pid), the leader's start time (so that a reused pid is
another run) and the boot (a reboot ends every run).

A process whose session began outside its PID namespace (a container's
processes often have session id 0) has no visible leader; its run is then
the top-most ancestor it can see (the process whose parent is 0 or 1), the
job the container's init started.

A holder whose session is gone protects nothing: the next `thaw`, freeze
or boot-time service merges what it left.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path


@dataclass(frozen=True)
class Holder:
    """One run that holds a domain frozen."""

    sid: int  # the run's leader: the session id, or the top-most ancestor where the session is not visible
    started: int  # the leader's start time, in clock ticks after boot (0: the leader had exited already)
    boot: str  # /proc/sys/kernel/random/boot_id when it froze
    since: str  # when it took hold, UTC
    command: str  # the leader's command line, for people reading `status`

    def same_run(self, other: "Holder") -> bool:
        return (self.sid, self.started, self.boot) == (other.sid, other.started, other.boot)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Holder":
        return cls(**data)

    def describe(self) -> str:
        return f"run of session {self.sid} ({self.command or '?'}) since {self.since}"


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """A process's start time in clock ticks after boot (None: no such process); with its pid it
    names one process, whatever reuses the pid later."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of stat(5); the list starts at field 3


def _session_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[3]) if fields else None  # field 6


def _command(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    return " ".join(a.decode(errors="replace") for a in argv if a)[:200]


def _parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None  # field 4


def _top_ancestor(pid: int) -> int:
    """The ancestor of a process whose parent is the namespace's init (1) or outside it (0)."""
    while True:
        parent = _parent_of(pid)
        if parent is None or parent <= 1:
            return pid
        pid = parent


def _run_of(pid: int) -> int | None:
    """The run a process belongs to, by the rule `current` uses (None: no such process)."""
    sid = _session_of(pid)
    return _top_ancestor(pid) if sid == 0 else sid


def current() -> Holder:
    """The run this process belongs to."""
    sid = os.getsid(0) or _top_ancestor(os.getpid())
    started = start_time(sid) or 0
    return Holder(sid, started, _boot_id(), datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  _command(sid) if started else "")


def alive(holder: Holder) -> bool:
    """Whether the run still exists: same boot, and its leader (or, if it had exited already, any
    process of that run) is there."""
    if holder.boot != _boot_id():
        return False
    if holder.started:
        return start_time(holder.sid) == holder.started
    return any(_run_of(int(p)) == holder.sid for p in os.listdir("/proc") if p.isdigit())


def live_others(held_by: list[Holder], me: Holder) -> list[Holder]:
    """The runs among `held_by` that still exist, other than `me`: the ones a merge must wait for."""
    return [h for h in held_by if not h.same_run(me) and alive(h)]
