"""Built-in merge plugin: live active block commit into the recorded base, then pivot.

Waits for the READY event (never polls cur == end), bounded in time, with
progress; retries the pivot with backoff; survives a libvirtd restart (the
block-job waiter reconnects and reads the job's state). While the guest runs
the copy is held to `commit_bandwidth` with the base written back as it goes
(`base_writeback`), and the limit is lifted once the commit has caught up:
the guest then notices the merge no more than a quiet minute
(`bench/downtime.py`). Uses only the public merge API (`virtfreeze.merge_api`).
"""

from __future__ import annotations

import logging
import time

from virtfreeze.base_writeback import written_back
from virtfreeze.errors import CommitNotReady, NotReadyToPivot, VirtfreezeError
from virtfreeze.hookspecs import hookimpl
from virtfreeze.journal import failpoint
from virtfreeze.merge_api import PAUSED, RUNNING, allocated_bytes
from virtfreeze.model import MergeResult
from virtfreeze.logs import domain_log

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
            domain_log(log, merge.domain.name, disk.target).warning("pivot attempt %d failed (%s); retrying in %.1fs",
                                                                    attempt, e.message, delay)
            if isinstance(e, NotReadyToPivot):
                watch.wait([disk], "ready")
            else:
                time.sleep(delay)  # backoff: libvirt gives no event for "may pivot again"
                delay *= 2


def commit_and_pivot(merge, disk) -> float:
    """Merge one disk's overlay into its recorded base while the guest runs; returns the seconds the
    guest was paused for it (0 unless the commit did not converge under strategy auto)."""
    name = merge.domain.name
    running = merge.state() == RUNNING  # read once: the rate and the fallback both follow it
    held = allocated_bytes(disk.overlay)
    rate = _copy_rate(merge, held, running)
    with merge.watch_jobs() as watch:
        job = merge.job(disk)
        if job == "commit":
            # A round of an interrupted iterative merge: cancelling leaves a valid chain.
            domain_log(log, name, disk.target).info("cancelling the commit of an interrupted iterative merge")
            merge.cancel(disk)
            watch.wait([disk], "gone", timeout=60)
            job = None
        if job == "active-commit":
            domain_log(log, name, disk.target).info("resuming the commit of an earlier run")
            merge.set_speed(disk, rate)  # whatever rate that run left it at
        elif job is not None:
            raise VirtfreezeError(f"another block job (type {job}) runs on this disk", domain=name,
                                  disk=disk.target, hint="wait for it, or end it with `virsh blockjob --abort`")
        else:
            domain_log(log, name, disk.target).info("live commit of %s into %s",
                                                    (merge.at_start.live or {}).get(disk.target), disk.base)
            # MergeRefused when libvirt refuses: the caller may go offline
            merge.start_commit(disk, bandwidth=rate)
        failpoint("thaw-commit-started")
        stopped = 0.0
        converge = merge.auto_fallback and running
        try:
            _wait_caught_up(merge, disk, watch, min(merge.config.live_converge_timeout,
                                                    merge.config.commit_ready_timeout) if converge
                            else merge.config.commit_ready_timeout, bandwidth=rate, held=held)
        except CommitNotReady:
            if not converge:
                raise
            stopped = _finish_paused(merge, disk, watch)
        else:
            try:
                _pivot(merge, disk, watch)
            except VirtfreezeError:
                _cancel_quietly(merge, disk)
                raise
    source = merge.live_source(disk)
    if source != disk.base:
        raise VirtfreezeError(f"after the pivot the disk is on {source!r}, not its base", domain=name,
                              disk=disk.target, path=disk.base)
    domain_log(log, name, disk.target).info("back on %s", disk.base)
    return stopped


def _copy_rate(merge, held: int, running: bool) -> int:
    """commit_bandwidth while the guest runs and its overlay holds (`held` bytes) at least a second's
    copy at that rate; else 0 (no limit: a paused guest, or too little to leave much dirty)."""
    bandwidth = merge.config.commit_bandwidth
    return bandwidth if running and bandwidth and held >= bandwidth else 0


def _wait_caught_up(merge, disk, watch, timeout: float, bandwidth: int, held: int) -> None:
    """Wait (up to `timeout` s) for the commit to become ready, with the base written back as the copy
    goes; then lift its bandwidth limit, so that the pivot copies the last writes at full speed. A
    copy held to commit_bandwidth that has not caught up in twice the time its overlay needs at that
    rate (at least 10 s) gets its limit lifted early: the guest out-writes the limit."""
    with written_back(merge.domain.name, disk.target, disk.base):
        if not bandwidth:
            watch.wait([disk], "ready", timeout=timeout)
            return
        allowed = max(10.0, 2 * held / bandwidth)
        t0 = time.monotonic()
        try:
            watch.wait([disk], "ready", timeout=min(allowed, timeout))
        except CommitNotReady:
            if allowed >= timeout:
                raise
            domain_log(log, merge.domain.name, disk.target).info(
                "the commit, held to %g MiB/s, has not caught up with the guest's writes in %.0fs; lifting the "
                "limit", bandwidth / 2**20, allowed)
            merge.set_speed(disk, 0)
            watch.wait([disk], "ready", timeout=timeout - (time.monotonic() - t0))
            return
    merge.set_speed(disk, 0)


# Longest wait for the commit to become ready while the guest is paused; after it the
# guest runs again and the commit goes on live (the next thaw pivots it).
PAUSED_READY_TIMEOUT = 60.0


def _finish_paused(merge, disk, watch) -> float:
    """Strategy auto, a commit the guest out-writes: pause the vCPUs (nothing writes), lift any
    bandwidth limit, pivot once ready, resume. Returns the seconds the guest was stopped."""
    domain_log(log, merge.domain.name, disk.target).warning(
        "the live commit did not catch up with the guest's writes in %gs; merging the rest with the guest "
        "paused", min(merge.config.live_converge_timeout, merge.config.commit_ready_timeout))
    t0 = time.monotonic()
    with merge.guest_paused():
        merge.progress(f"disk {disk.target}: guest paused for the rest of the commit")
        merge.set_speed(disk, 0)
        watch.wait([disk], "ready", timeout=PAUSED_READY_TIMEOUT)
        _pivot(merge, disk, watch)
    stopped = time.monotonic() - t0
    domain_log(log, merge.domain.name, disk.target).info("pivoted with the guest paused %.3fs", stopped)
    return stopped


def _cancel_quietly(merge, disk) -> None:
    try:
        if merge.job(disk):
            merge.cancel(disk)
    except VirtfreezeError as e:
        domain_log(log, merge.domain.name, disk.target).warning("could not cancel the commit job: %s", e.message)


def merge_running(merge) -> float:
    """Active commit + pivot of every disk still on an overlay of ours; returns seconds paused."""
    stopped = 0.0
    live = merge.at_start.live or {}
    for disk in merge.disks:
        source = live.get(disk.target)
        if source == disk.base:
            continue
        if not disk.is_ours(source):
            raise VirtfreezeError(f"disk is on {source!r}, neither its overlay nor its base",
                                  domain=merge.domain.name, disk=disk.target,
                                  hint="somebody changed the chain; merge by hand")
        stopped += commit_and_pivot(merge, disk)
    return stopped


@hookimpl
def virtfreeze_merge(merge):
    if merge.strategy != "live" or merge.state() not in (RUNNING, PAUSED):
        return None
    stopped = merge_running(merge)
    note = f"did not converge: the rest merged with the guest paused {stopped:.3f}s" if stopped else None
    return MergeResult("live", stopped_seconds=stopped, note=note)
