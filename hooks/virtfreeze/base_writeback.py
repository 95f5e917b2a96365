"""Keeps a running commit's base from piling up dirty pages, so that QEMU's flush of it is short.

A commit copies the overlay into the base through the host's page cache (a
disk's default cache mode). QEMU flushes the base once the copy has caught up
(before an active commit reports ready, and as a commit below the active
layer ends). With hundreds of MiB dirty, that fdatasync holds the host
filesystem's journal, and the guest's own flushes wait behind it: measured
here, up to 120 ms without a write acknowledged. Starting the writeback of
what the commit wrote every 0.1 s, while the copy runs at `commit_bandwidth`,
leaves that flush almost nothing to do (`bench/downtime.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from virtfreeze import periodic
from virtfreeze.logs import domain_log

log = logging.getLogger(__name__)

INTERVAL = 0.1  # seconds between two writeback starts: about 10 MiB at the default commit_bandwidth


@contextlib.contextmanager
def written_back(domain: str, target: str, base: str, interval: float = INTERVAL) -> Iterator[None]:
    """While inside, start the writeback of the base's dirty pages every `interval` seconds
    (`posix_fadvise(DONTNEED)`: asynchronous, it waits for nothing, and drops the base's clean
    pages, which nothing on the host needs once they are on disk). A base that cannot be opened
    (gone, not a local file) is left alone: this only spares the guest, it decides nothing."""
    try:
        fd = os.open(base, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        domain_log(log, domain, target).debug("no writeback of %s during the commit: %s", base, e.strerror)
        yield
        return
    def kick() -> bool:
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return True
        except OSError as e:
            domain_log(log, domain, target).debug("writeback of %s: %s", base, e.strerror)
            return False

    try:
        with periodic.every(interval, kick, f"writeback:{domain}:{target}"):
            yield
    finally:
        os.close(fd)
