"""The names the kernel shows for virtfreeze's threads (top -H, ps -L, a scheduler trace), not "python3"."""

from __future__ import annotations

import contextlib
from pathlib import Path


def name_this_thread(name: str) -> None:
    """Give the calling thread this name in the kernel (its first 15 bytes); where /proc says no, keep the
    old one: a name is never worth failing for."""
    with contextlib.suppress(OSError):
        Path("/proc/thread-self/comm").write_bytes(name.encode()[:15])
