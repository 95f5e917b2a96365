"""Built-in merge plugin: live active block commit into the recorded base, then pivot.

Waits for the READY event (never polls cur == end), bounded in time, with
progress; retries the pivot with backoff; survives a libvirtd restart (the
block-job waiter reconnects and reads the job's state). Uses only the
public merge API (`virtfreeze.merge_api`).
"""

from __future__ import annotations

import logging
import time

from virtfreeze.errors import NotReadyToPivot, VirtfreezeError
from virtfreeze.hookspecs import hookimpl
from virtfreeze.journal import failpoint
from virtfreeze.merge_api import PAUSED, RUNNING
from virtfreeze.model import MergeResult

log = logging.getLogger(__name__)


def _pivot(merge, disk, watch) -> None:
    delay = 0.5
    attempts = merge.config.pivot_attempts
    for attempt in range(1, attempts + 1):
        try:
            merge.pivot(disk)
            return
        except VirtfreezeError as e:
            if merge.live_source(disk) == disk.base:
                return  # it went through, but the answer was lost (libvirtd restarted)
            if attempt == attempts:
                raise VirtfreezeError(f"pivot failed {attempt} times: {e.message}", domain=merge.domain.name,
                                      disk=disk.target,
                                      hint="the domain stays on its overlay; run `virtfreeze thaw` again") from None
            log.warning("domain %r disk %s: pivot attempt %d failed (%s); retrying in %.1fs",
                        merge.domain.name, disk.target, attempt, e.message, delay)
            if isinstance(e, NotReadyToPivot):
                watch.wait([disk], "ready")
            else:
                time.sleep(delay)  # backoff: libvirt gives no event for "may pivot again"
                delay *= 2


def commit_and_pivot(merge, disk) -> None:
    """Merge one disk's overlay into its recorded base while the guest runs."""
    name = merge.domain.name
    with merge.watch_jobs() as watch:
        job = merge.job(disk)
        if job == "commit":
            # A round of an interrupted iterative merge: cancelling leaves a valid chain.
            log.info("domain %r disk %s: cancelling the commit of an interrupted iterative merge", name, disk.target)
            merge.cancel(disk)
            watch.wait([disk], "gone", timeout=60)
            job = None
        if job == "active-commit":
            log.info("domain %r disk %s: resuming the commit of an earlier run", name, disk.target)
        elif job is not None:
            raise VirtfreezeError(f"another block job (type {job}) runs on this disk", domain=name,
                                  disk=disk.target, hint="wait for it, or end it with `virsh blockjob --abort`")
        else:
            log.info("domain %r disk %s: live commit of %s into %s", name, disk.target,
                     (merge.at_start.live or {}).get(disk.target), disk.base)
            merge.start_commit(disk)  # MergeRefused when libvirt refuses: the caller may go offline
        failpoint("thaw-commit-started")
        watch.wait([disk], "ready")
        try:
            _pivot(merge, disk, watch)
        except VirtfreezeError:
            _cancel_quietly(merge, disk)
            raise
    source = merge.live_source(disk)
    if source != disk.base:
        raise VirtfreezeError(f"after the pivot the disk is on {source!r}, not its base", domain=name,
                              disk=disk.target, path=disk.base)
    log.info("domain %r disk %s: back on %s", name, disk.target, disk.base)


def _cancel_quietly(merge, disk) -> None:
    try:
        if merge.job(disk):
            merge.cancel(disk)
    except VirtfreezeError as e:
        log.warning("domain %r disk %s: could not cancel the commit job: %s", merge.domain.name, disk.target,
                    e.message)


def merge_running(merge) -> None:
    """Active commit + pivot of every disk still on an overlay of ours."""
    live = merge.at_start.live or {}
    for disk in merge.disks:
        source = live.get(disk.target)
        if source == disk.base:
            continue
        if not disk.is_ours(source):
            raise VirtfreezeError(f"disk is on {source!r}, neither its overlay nor its base",
                                  domain=merge.domain.name, disk=disk.target,
                                  hint="somebody changed the chain; merge by hand")
        commit_and_pivot(merge, disk)


@hookimpl
def virtfreeze_merge(merge):
    if merge.strategy != "live" or merge.state() not in (RUNNING, PAUSED):
        return None
    merge_running(merge)
    return MergeResult("live")
