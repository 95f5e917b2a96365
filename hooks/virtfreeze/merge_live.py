"""Built-in merge plugin: live active block commit into the recorded base, then pivot.

Waits for the READY event (never polls cur == end), bounded in time, with
progress on a terminal; retries the pivot with backoff; survives a libvirtd
restart by reconnecting and reading the job's state from the live XML.
"""

from __future__ import annotations

import logging
import queue
import sys
import time

from virtfreeze.domain_xml import parse_disks
from virtfreeze.errors import MergeRefused, VirtfreezeError
from virtfreeze.hookspecs import hookimpl
from virtfreeze.journal import failpoint
from virtfreeze.model import MergeResult
from virtfreeze.libvirt_boundary import (
    JOB_CANCELED, JOB_COMPLETED, JOB_FAILED, JOB_READY, JOB_TYPE_ACTIVE_COMMIT, JOB_TYPE_COMMIT, PAUSED, RUNNING,
    is_not_ready_error, mirror_ready,
)

log = logging.getLogger(__name__)


class _Progress:
    """A one-line percentage on a terminal; a log line now and then otherwise."""

    def __init__(self, domain: str, target: str):
        self.label = f"domain {domain!r} disk {target}: committing"
        self.tty = sys.stderr.isatty()
        self.last_log = time.monotonic()

    def update(self, job: dict) -> None:
        end = job.get("end") or 0
        pct = 100.0 * job.get("cur", 0) / end if end else 0.0
        if self.tty:
            sys.stderr.write(f"\r{self.label} {pct:5.1f}%")
            sys.stderr.flush()
        elif time.monotonic() - self.last_log > 10:
            log.info("%s %.1f%%", self.label, pct)
            self.last_log = time.monotonic()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _live_source(hv, domain, target: str) -> str | None:
    for d in parse_disks(hv.xml(domain.uuid, domain.name)):
        if d.target == target:
            return d.source
    return None


def _wait_ready(hv, domain, target: str, events: queue.Queue, timeout: float) -> None:
    """Block until the commit job on `target` is ready to pivot, or raise.

    Waits on the READY event. Only after a reconnect (events lost meanwhile)
    is the job's state read from the live XML instead.
    """
    seen_generation = hv.generation
    if mirror_ready(hv.xml(domain.uuid, domain.name), target):
        return
    deadline = time.monotonic() + timeout
    progress = _Progress(domain.name, target)
    try:
        while True:
            try:
                disk, _type, status = events.get(timeout=1.0)
            except queue.Empty:
                if not hv.alive():
                    hv.reconnect()
                if hv.generation != seen_generation:
                    seen_generation = hv.generation
                    ready = mirror_ready(hv.xml(domain.uuid, domain.name), target)
                    if ready:
                        return
                    if ready is None:
                        raise VirtfreezeError("the commit job vanished while libvirtd was away",
                                              domain=domain.name, disk=target) from None
                if time.monotonic() > deadline:
                    raise VirtfreezeError(f"commit not ready to pivot after {timeout:.0f}s",
                                          domain=domain.name, disk=target,
                                          hint="the guest writes faster than the commit; raise "
                                               "commit_ready_timeout or use another strategy")
                progress.update(hv.block_job(domain.uuid, domain.name, target))
                continue
            if disk != target:
                continue
            if status == JOB_READY:
                return
            if status == JOB_COMPLETED:
                return  # somebody else pivoted; the caller verifies the chain
            if status in (JOB_FAILED, JOB_CANCELED):
                word = "failed" if status == JOB_FAILED else "was cancelled"
                raise VirtfreezeError(f"the commit job {word}", domain=domain.name, disk=target)
    finally:
        progress.done()


def _pivot(hv, domain, disk, events: queue.Queue, config) -> None:
    target = disk.target
    delay = 0.5
    for attempt in range(1, config.pivot_attempts + 1):
        try:
            hv.pivot(domain.uuid, domain.name, target)
            return
        except VirtfreezeError as e:
            if _live_source(hv, domain, target) == disk.base:
                return  # it went through, but the answer was lost (libvirtd restarted)
            if attempt == config.pivot_attempts:
                raise VirtfreezeError(f"pivot failed {attempt} times: {e.message}",
                                      domain=domain.name, disk=target,
                                      hint="the domain stays on its overlay; run `virtfreeze thaw` again") from None
            log.warning("domain %r disk %s: pivot attempt %d failed (%s); retrying in %.1fs",
                        domain.name, target, attempt, e.message, delay)
            if is_not_ready_error(e):
                _wait_ready(hv, domain, target, events, config.commit_ready_timeout)
            else:
                time.sleep(delay)
                delay *= 2


def commit_and_pivot(hv, domain, disk, config) -> None:
    """Merge one disk's overlay into its recorded base while the guest runs."""
    with hv.block_job_events(domain.uuid) as events:
        job = hv.block_job(domain.uuid, domain.name, disk.target)
        if job and job.get("type") == JOB_TYPE_COMMIT:
            # A round of an interrupted iterative merge: cancelling leaves a valid chain.
            log.info("domain %r disk %s: cancelling the commit of an interrupted iterative merge",
                     domain.name, disk.target)
            hv.cancel_job(domain.uuid, domain.name, disk.target)
            _wait_gone(hv, domain, disk.target, events)
            job = {}
        if job:
            if job.get("type") != JOB_TYPE_ACTIVE_COMMIT:
                raise VirtfreezeError(f"another block job (type {job.get('type')}) runs on this disk",
                                      domain=domain.name, disk=disk.target,
                                      hint="wait for it, or end it with `virsh blockjob --abort`")
            log.info("domain %r disk %s: resuming the commit of an earlier run", domain.name, disk.target)
        else:
            log.info("domain %r disk %s: live commit of %s into %s", domain.name, disk.target,
                     _live_source(hv, domain, disk.target), disk.base)
            try:
                hv.block_commit(domain.uuid, domain.name, disk.target, disk.base, active=True)
            except VirtfreezeError as e:
                raise MergeRefused(e.message, domain=e.domain, disk=e.disk, path=e.path, hint=e.hint) from None
        failpoint("thaw-commit-started")
        _wait_ready(hv, domain, disk.target, events, config.commit_ready_timeout)
        try:
            _pivot(hv, domain, disk, events, config)
        except VirtfreezeError:
            _cancel_quietly(hv, domain, disk.target)
            raise
    source = _live_source(hv, domain, disk.target)
    if source != disk.base:
        raise VirtfreezeError(f"after the pivot the disk is on {source!r}, not its base",
                              domain=domain.name, disk=disk.target, path=disk.base)
    log.info("domain %r disk %s: back on %s", domain.name, disk.target, disk.base)


def _wait_gone(hv, domain, target: str, events: queue.Queue, timeout: float = 60.0) -> None:
    """After cancelling a job: wait for its end event (or for libvirt to report none)."""
    deadline = time.monotonic() + timeout
    while hv.block_job(domain.uuid, domain.name, target):
        try:
            disk, _type, status = events.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise VirtfreezeError("a cancelled block job did not end", domain=domain.name, disk=target) from None
        if disk == target and status in (JOB_CANCELED, JOB_COMPLETED, JOB_FAILED):
            return


def _cancel_quietly(hv, domain, target: str) -> None:
    try:
        if hv.block_job(domain.uuid, domain.name, target):
            hv.cancel_job(domain.uuid, domain.name, target)
    except VirtfreezeError as e:
        log.warning("domain %r disk %s: could not cancel the commit job: %s", domain.name, target, e.message)


def merge_running(hv, domain, disks, config) -> None:
    """Active commit + pivot of every disk still on an overlay of ours."""
    for disk in disks:
        source = _live_source(hv, domain, disk.target)
        if source == disk.base:
            continue
        if not disk.is_ours(source):
            raise VirtfreezeError(f"disk is on {source!r}, neither its overlay nor its base",
                                  domain=domain.name, disk=disk.target,
                                  hint="somebody changed the chain; merge by hand")
        commit_and_pivot(hv, domain, disk, config)


@hookimpl
def virtfreeze_merge(hv, domain, disks, config, strategy, journal):
    if strategy != "live" or hv.state(domain.uuid) not in (RUNNING, PAUSED):
        return None
    merge_running(hv, domain, disks, config)
    return MergeResult("live")
