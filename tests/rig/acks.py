"""Host-side record of the guest's acknowledged writes.

The guest prints `ACK <disk> <seq>` on its second serial port after each write
returned (O_DIRECT + fsync). QEMU exposes that port as a unix socket; a thread
here reads it, stamps each line with the host's monotonic clock, and lets
tests wait for conditions on it (no sleeping).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from virtfreeze.thread_names import name_this_thread


@dataclass(frozen=True)
class Ack:
    t: float  # host time.monotonic() when the line arrived
    disk: str
    seq: int


class AckWatcher:
    """Reads acknowledgements from the guest's serial socket in a thread.

    Survives the QEMU process going away and coming back (save/restore):
    it reconnects when the socket reappears, until `close()`.
    """

    def __init__(self, sock_path: Path, log_path: Path | None = None):
        self.sock_path = Path(sock_path)
        self.log_path = log_path
        self.acks: list[Ack] = []
        self.booted = threading.Event()
        self.connected = threading.Event()
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name=f"acks:{sock_path.name}", daemon=True)
        self._thread.start()

    # -- reading ---------------------------------------------------------
    def _connect(self) -> socket.socket | None:
        delay = 0.005
        while not self._closed.is_set():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.sock_path))
                return s
            except OSError:
                s.close()
                # The socket appears when QEMU starts: wait for that condition.
                self._closed.wait(delay)
                delay = min(delay * 2, 0.02)  # bounds how late acks after a restore are seen
        return None

    def _run(self) -> None:
        name_this_thread("acks-reader")  # what a scheduler trace (bench/stall_trace.py) calls this thread
        log = open(self.log_path, "a") if self.log_path else None
        try:
            while not self._closed.is_set():
                s = self._connect()
                if s is None:
                    return
                self._sock = s
                self.connected.set()
                buf = b""
                while True:
                    try:
                        chunk = s.recv(65536)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        break
                    now = time.monotonic()
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    new = []
                    for raw in lines:
                        line = raw.decode(errors="replace").strip()
                        if log:
                            log.write(f"{now:.6f} {line}\n")
                        parts = line.split()
                        if len(parts) == 3 and parts[0] == "ACK" and parts[2].isdigit():
                            new.append(Ack(now, parts[1], int(parts[2])))
                        elif parts and parts[0] == "BOOTED":
                            self.booted.set()
                            try:
                                s.sendall(b"GO\n")
                            except OSError:
                                pass
                    if log:
                        log.flush()
                    if new:
                        with self._cond:
                            self.acks.extend(new)
                            self._cond.notify_all()
                self.connected.clear()
                s.close()
        finally:
            if log:
                log.close()

    def close(self) -> None:
        self._closed.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)

    # -- queries ---------------------------------------------------------
    def snapshot(self) -> list[Ack]:
        with self._cond:
            return list(self.acks)

    def wait_for(self, predicate, timeout: float, what: str = "condition") -> None:
        """Wait until predicate(acks) is true; raise TimeoutError naming `what`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.acks):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"guest acks: timed out after {timeout}s waiting for {what} "
                                       f"({len(self.acks)} acks so far, socket {self.sock_path})")
                self._cond.wait(left)

    def wait_acks(self, n: int, timeout: float = 60.0, after: float | None = None) -> None:
        """Wait for n more acknowledgements (after host time `after`, if given)."""
        if after is None:
            start = len(self.snapshot())
            self.wait_for(lambda a: len(a) >= start + n, timeout, f"{n} more acks")
        else:
            self.wait_for(lambda a: sum(1 for x in a if x.t > after) >= n, timeout,
                          f"{n} acks after t={after:.3f}")

    def last_seq(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.snapshot():
            out[a.disk] = max(out.get(a.disk, -1), a.seq)
        return out


def acked_by_disk(acks: list[Ack], until: float | None = None) -> dict[str, list[int]]:
    """Sequence numbers acknowledged per disk (up to host time `until`)."""
    out: dict[str, list[int]] = {}
    for a in acks:
        if until is None or a.t <= until:
            out.setdefault(a.disk, []).append(a.seq)
    return out


def max_gap(acks: list[Ack], start: float, end: float) -> float:
    """Largest interval without any acknowledgement inside [start, end].

    This is the guest-visible stall: how long the guest's writes did not
    complete, as seen by the host. The window edges count as boundaries.
    """
    times = sorted(a.t for a in acks if start <= a.t <= end)
    points = [start, *times, end]
    return max(b - a for a, b in zip(points, points[1:]))
