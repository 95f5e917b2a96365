"""Progress of the domains a command works on, as the core reports it.

The core says what each domain is doing (`update`) and when it is done
(`finish`); it never writes to the terminal. The CLI installs a display
(`cli.TerminalProgress`: one line per domain, updated in place) when stderr
is a terminal; otherwise this silent one stays, and the logs tell the story.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from virtfreeze.logs import domain_log

log = logging.getLogger(__name__)


class Progress:
    """Receives progress; this base class shows nothing."""

    # True: updates are drawn as they come (a terminal). Only then does the core gather fine-grained
    # progress, such as the bytes an archive has read (which may make a tool write more output).
    live = False

    def update(self, domain: str, text: str) -> None:
        """`domain` is now doing `text` (e.g. "disk vda: committing 45%", "round 2: 3 MiB left")."""

    def finish(self, domain: str) -> None:
        """`domain` is done with this command (its line goes away)."""


SILENT = Progress()


def human_bytes(n: float) -> str:
    """A byte count as people read it: "512 B", "1.2 KiB", "85.0 MiB", "4.0 GiB"."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def rate(n_bytes: float, seconds: float) -> str:
    """"85.0 MiB/s"; "-" when no time passed."""
    return f"{human_bytes(n_bytes / seconds)}/s" if seconds > 0 else "-"


class ByteProgress:
    """A progress sink for one piece of work that reads bytes (e.g. an archive to one target):
    called with (bytes done, total or None), it updates `domain`'s line with
    "<label>: 1.2 GiB of 4.0 GiB, 85.0 MiB/s", the rate over the last `window` seconds,
    at most every `interval` seconds. Never raises: a display is no reason to fail the work."""

    def __init__(self, progress: Progress, domain: str, label: str, *, interval: float = 0.25,
                 window: float = 5.0, clock=time.monotonic):
        self._progress, self._domain, self._label = progress, domain, label
        self._interval, self._window, self._clock = interval, window, clock
        self._samples: deque[tuple[float, int]] = deque()
        self._shown_at: float | None = None
        self._shown_done: int | None = None

    def text(self, done: int, total: int | None) -> str:
        """The line for `done` of `total` bytes, with the rate over the samples so far."""
        text = f"{self._label}: {human_bytes(done)}" + (f" of {human_bytes(total)}" if total else "")
        if len(self._samples) > 1:
            (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
            if t1 > t0:
                text += f", {rate(max(d1 - d0, 0), t1 - t0)}"
        return text

    def __call__(self, done: int, total: int | None = None) -> None:
        try:
            now = self._clock()
            self._samples.append((now, done))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
                self._samples.popleft()
            last = total is not None and done >= total and done != self._shown_done  # always shown
            if self._shown_at is not None and now - self._shown_at < self._interval and not last:
                return
            self._shown_at, self._shown_done = now, done
            self._progress.update(self._domain, self.text(done, total))
        except Exception:  # noqa: BLE001 - a display's bug must not fail an archive
            domain_log(log, self._domain).debug("progress display failed", exc_info=True)
