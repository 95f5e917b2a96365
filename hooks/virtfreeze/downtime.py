"""What the guest noticed of one step: the seconds it was not running, from libvirt's lifecycle events.

A step (freeze, thaw) is measured from the outside, as `bench/downtime.py`
measures it: every suspended, stopped, shutdown or crashed event starts a
stop, the next resumed or started event ends it. The events come from
libvirt's event thread and may arrive after the call that caused them
returned, so the total is read only once a guest that runs again has said so.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

STOPS = {"suspended", "stopped", "shutdown", "crashed", "pmsuspended"}
STARTS = {"resumed", "started"}
LATE_EVENT_WAIT = 2.0  # seconds a guest that runs again may take to say so through an event


class Downtime:
    """The stops of one domain seen while it was watched."""

    def __init__(self):
        self._changed = threading.Condition()
        self._events: list[tuple[float, str]] = []
        self._until: float | None = None

    def _on_event(self, event: str, _detail: int) -> None:
        with self._changed:
            self._events.append((time.monotonic(), event))
            self._changed.notify_all()

    def _stopped_now(self) -> bool:
        relevant = [e for _t, e in self._events if e in STOPS or e in STARTS]
        return bool(relevant) and relevant[-1] in STOPS

    def settle(self, running: bool) -> None:
        """End the watch. `running`: the guest runs now, so a stop still open waits (briefly) for its
        resumed or started event."""
        with self._changed:
            if running:
                self._changed.wait_for(lambda: not self._stopped_now(), timeout=LATE_EVENT_WAIT)
            self._until = time.monotonic()

    @property
    def seconds(self) -> float:
        """Seconds not running between the start of the watch and `settle`."""
        with self._changed:
            total, down_since = 0.0, None
            for t, event in self._events:
                if event in STOPS and down_since is None:
                    down_since = t
                elif event in STARTS and down_since is not None:
                    total += t - down_since
                    down_since = None
            end = self._until if self._until is not None else time.monotonic()
            return total + (max(0.0, end - down_since) if down_since is not None else 0.0)


@contextlib.contextmanager
def watched(hv, uuid: str) -> Iterator[Downtime]:
    """Watch one domain's lifecycle events for the length of the block; settle when it ends."""
    down = Downtime()
    try:
        with hv.on_lifecycle(uuid, down._on_event):
            yield down
    finally:
        try:
            info = hv.info(uuid)
        except Exception:  # noqa: BLE001 - the measure must never change the step's outcome
            info = None
        down.settle(running=info is not None and info.state == "running")
