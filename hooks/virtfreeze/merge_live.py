"""Built-in merge plugin: live active block commit into the recorded base, then pivot.

Waits for the READY event (never polls cur == end), bounded in time, with
progress on a terminal; retries the pivot with backoff; survives a libvirtd
restart by reconnecting and reading the job's state from the live XML.
"""

from __future__ import annotations

import logging
import sys
import time

from virtfreeze.domain_xml import parse_disks
from virtfreeze.errors import MergeRefused, VirtfreezeError
from virtfreeze.hookspecs import hookimpl
from virtfreeze.journal import failpoint
from virtfreeze.model import MergeResult
from virtfreeze.libvirt_boundary import (
    JOB_TYPE_ACTIVE_COMMIT, JOB_TYPE_COMMIT, PAUSED, RUNNING, is_not_ready_error,
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


def _wait_ready(hv, domain, target: str, events, timeout: float) -> None:
    """Block until the commit job on `target` is ready to pivot (READY event), or raise."""
    progress = _Progress(domain.name, target)
    try:
        hv.wait_for_jobs(domain.uuid, domain.name, {target}, events, until="ready", timeout=timeout,
                         on_tick=lambda _t, job: progress.update(job))
    finally:
        progress.done()


def _pivot(hv, domain, disk, events, config) -> None:
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
            hv.wait_for_jobs(domain.uuid, domain.name, {disk.target}, events, until="gone", timeout=60)
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
