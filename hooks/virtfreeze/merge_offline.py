"""Built-in merge plugin: `qemu-img commit` with the guest stopped.

- A domain shut down, destroyed or undefined since the freeze: each overlay
  is committed into its recorded base (any strategy; registered `trylast`).
- `offline` for a running or paused guest: libvirt's managed save stops it
  and keeps its state on disk, the overlays are committed, the saved state's
  XML and the persistent definition are pointed at the bases, and the guest
  is started again from its saved state, running or paused as it was.

A crash at any point leaves the guest shut off with its managed save image
and the mark ``saved_by_virtfreeze`` in the journal; the next thaw finishes
the commit, fixes the saved XML and brings it back (`virtfreeze_merge_recover`).
Uses only the public merge API (`virtfreeze.merge_api`).
"""

from __future__ import annotations

import logging
import os
import time

from virtfreeze.errors import VirtfreezeError
from virtfreeze.hookspecs import hookimpl
from virtfreeze.journal import failpoint
from virtfreeze.merge_api import MISSING, PAUSED, RUNNING, SHUTOFF
from virtfreeze.model import MergeResult
from virtfreeze.logs import domain_log

log = logging.getLogger(__name__)


def _top_of(disk, sources: list[str | None]) -> str | None:
    """The top overlay of a disk's chain: what a definition points at, else the newest round on disk."""
    for src in sources:
        if disk.is_ours(src) and os.path.exists(src):
            return src
    on_disk = disk.overlays_on_disk()
    return on_disk[-1] if on_disk else None


def commit_stopped(merge) -> int:
    """Commit every disk of a stopped (or vanished) domain; fix its saved state's XML. Returns bytes."""
    defs = merge.definitions()
    sources = [s for s in (defs.persistent, defs.saved) if s is not None]
    merged = 0
    for disk in merge.disks:
        top = _top_of(disk, [s.get(disk.target) for s in sources])
        if top is None:
            continue
        if sources and not any(disk.is_ours(s.get(disk.target)) for s in sources):
            continue  # committed and re-pointed by an earlier run; the overlays are spent
        merged += merge.commit_offline(disk, top)
        failpoint("thaw-offline-committed")
    if defs.saved is not None:
        merge.repoint_saved()
    return merged


def save_commit_restore(merge) -> tuple[int, float]:
    """Stop a running or paused guest into its managed save, merge, and bring it back as it was."""
    defs = merge.definitions()
    if not defs.persistent_domain:
        raise VirtfreezeError("the offline merge of a running guest needs a persistent domain (managed save)",
                              domain=merge.domain.name, hint="use --strategy live, or define the domain")
    paused = defs.state == PAUSED
    merge.note(saved_by_virtfreeze="paused" if paused else "running")
    t0 = time.monotonic()
    domain_log(log, merge.domain.name).info("saving its state to merge offline")
    merge.progress("guest saved: committing offline")
    merge.save(paused)
    failpoint("offline-saved")
    merged = commit_stopped(merge)
    merge.repoint_persistent()
    failpoint("offline-before-restore")
    resume_saved(merge)
    stopped = time.monotonic() - t0
    domain_log(log, merge.domain.name).info("merged %d bytes offline; the guest was stopped %.2fs", merged, stopped)
    return merged, stopped


def resume_saved(merge) -> None:
    """Start a guest this plugin saved, from its saved state (a no-op otherwise)."""
    how = merge.record.saved_by_virtfreeze
    if not how:
        return
    if merge.state() == SHUTOFF:
        domain_log(log, merge.domain.name).info("restoring it from its saved state (%s)", how)
        merge.start()
    merge.note(saved_by_virtfreeze=None)


@hookimpl(trylast=True)
def virtfreeze_merge(merge):
    state = merge.state()
    if state in (SHUTOFF, MISSING):
        merged = commit_stopped(merge)
        if state == SHUTOFF:
            merge.repoint_persistent()
        return MergeResult("offline", offline_bytes=merged)
    if merge.strategy != "offline" or state not in (RUNNING, PAUSED):
        return None
    merged, stopped = save_commit_restore(merge)
    return MergeResult("offline", offline_bytes=merged, stopped_seconds=stopped)


@hookimpl
def virtfreeze_merge_recover(merge):
    resume_saved(merge)
