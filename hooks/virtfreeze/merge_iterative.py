"""Built-in merge plugin: iterative live commit, then a short offline step.

Each round takes a new overlay on top (an external snapshot) and commits the
previous one into the base while the guest runs on the new one (a commit of
a middle layer: it ends with COMPLETED, no pivot). Rounds go on while the
remaining overlay keeps shrinking by `iterative_factor`, up to
`iterative_max_rounds` or until it holds less than `iterative_threshold`
bytes; then the guest is stopped only to merge that last, small overlay
(`iterative_final_step`):

- pause: the guest's vCPUs stop while QEMU commits the last overlay into the
  base and pivots; nothing writes, so the commit is ready at once. The guest
  is stopped for milliseconds, and never for a commit that cannot converge.
- save: the offline step of `merge_offline` (managed save, qemu-img commit,
  restore). The guest is stopped for seconds whatever the overlay's size:
  QEMU exits and starts again.
- auto: pause; save when libvirt refuses the commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time

from virtfreeze.domain_xml import parse_disks, snapshot_xml
from virtfreeze.errors import MergeRefused, VirtfreezeError
from virtfreeze.hookspecs import hookimpl
from virtfreeze.journal import failpoint
from virtfreeze.libvirt_boundary import JOB_TYPE_COMMIT, PAUSED, RUNNING
from virtfreeze.merge_live import merge_running
from virtfreeze.merge_offline import save_commit_restore
from virtfreeze.model import MergeResult

log = logging.getLogger(__name__)


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def one_round(hv, domain, disks, live_xml: str, tops: dict[str, str], config, journal) -> dict[str, str]:
    """New overlays on top, then commit the previous tops into the bases. Returns the new tops."""
    n = max(d.round_of(tops[d.target]) for d in disks) + 1
    new = {d.target: d.round_overlay(n) for d in disks}
    for path in new.values():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale file of a crashed round: nothing points at it
    journal.note(iterative_round=n)
    xml = snapshot_xml(parse_disks(live_xml), {t: p for t, p in new.items()})
    hv.snapshot(domain.uuid, domain.name, xml, memory=False, quiesce=False)
    empty = {t: _allocated(p) for t, p in new.items()}  # qcow2 metadata of a fresh overlay, not data
    journal.note(iterative_empty=empty)
    failpoint("iterative-snapshot")
    with hv.block_job_events(domain.uuid) as events:
        for d in disks:
            hv.block_commit(domain.uuid, domain.name, d.target, d.base, top=tops[d.target], active=False)
        failpoint("iterative-commit-started")
        hv.wait_for_jobs(domain.uuid, domain.name, {d.target for d in disks}, events, until="completed",
                         timeout=config.commit_ready_timeout)
    live = {d.target: d.source for d in parse_disks(hv.xml(domain.uuid, domain.name))}
    for d in disks:
        if live.get(d.target) != new[d.target]:
            raise VirtfreezeError(f"after a commit round the disk is on {live.get(d.target)!r}",
                                  domain=domain.name, disk=d.target)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tops[d.target])  # merged into the base and out of every chain
    return new


# Longest wait for a commit to become ready while the guest is paused; after it
# the guest runs again and the commit goes on live (the next thaw pivots it).
PAUSED_READY_TIMEOUT = 60.0


def merge_paused(hv, domain, disks, config, journal) -> tuple[int, float]:
    """Merge the last overlays with the guest's vCPUs stopped; returns (bytes, seconds stopped).

    A guest that was paused already stays paused. Raises MergeRefused (the
    guest running again) when libvirt refuses the commit.
    """
    bounded = dataclasses.replace(config, commit_ready_timeout=min(config.commit_ready_timeout,
                                                                   PAUSED_READY_TIMEOUT))
    live = {d.target: d.source for d in parse_disks(hv.xml(domain.uuid, domain.name))}
    merged = sum(_allocated(live[d.target]) for d in disks if d.is_ours(live.get(d.target)))
    pause = hv.state(domain.uuid) == RUNNING
    t0 = time.monotonic()
    if pause:
        journal.note(paused_by_virtfreeze=True)
        hv.suspend(domain.uuid, domain.name)
    try:
        failpoint("iterative-paused")
        merge_running(hv, domain, disks, bounded)
    finally:
        resume_paused(hv, domain, journal)
    stopped = time.monotonic() - t0 if pause else 0.0
    log.info("domain %r: merged the last %d bytes with the guest paused %.3fs", domain.name, merged, stopped)
    return merged, stopped


def resume_paused(hv, domain, journal) -> None:
    """Resume a guest virtfreeze paused (after a crash too); a no-op otherwise."""
    if journal.get("paused_by_virtfreeze"):
        if hv.state(domain.uuid) == PAUSED:
            log.info("domain %r: resuming the guest virtfreeze paused", domain.name)
            hv.resume(domain.uuid, domain.name)
        journal.note(paused_by_virtfreeze=None)


def final_step(hv, domain, disks, config, journal) -> tuple[int, float]:
    """Merge the last, small overlays with the guest stopped, as `iterative_final_step` says."""
    if config.iterative_final_step != "save":
        try:
            return merge_paused(hv, domain, disks, config, journal)
        except MergeRefused as e:
            if config.iterative_final_step == "pause":
                raise
            log.warning("%s; merging the last overlay with the guest saved instead (a stop of seconds)", e)
    return save_commit_restore(hv, domain, disks, journal)


@hookimpl
def virtfreeze_merge(hv, domain, disks, config, strategy, journal):
    if strategy != "iterative" or hv.state(domain.uuid) not in (RUNNING, PAUSED):
        return None
    live_xml = hv.xml(domain.uuid, domain.name)
    tops = {d.target: d.source for d in parse_disks(live_xml)}
    disks = [d for d in disks if d.is_ours(tops.get(d.target))]
    for d in disks:  # a round of an interrupted run: cancelling leaves a valid chain
        job = hv.block_job(domain.uuid, domain.name, d.target)
        if job and job.get("type") == JOB_TYPE_COMMIT:
            log.info("domain %r disk %s: cancelling the commit of an interrupted round", domain.name, d.target)
            hv.cancel_job(domain.uuid, domain.name, d.target)
    rounds = 0
    empty = journal.get("iterative_empty") or {}

    def data_bytes(tops):
        return sum(max(0, _allocated(tops[d.target]) - empty.get(d.target, 0)) for d in disks)

    size = data_bytes(tops)
    while disks and rounds < config.iterative_max_rounds and size > config.iterative_threshold:
        try:
            tops = one_round(hv, domain, disks, live_xml, tops, config, journal)
        except VirtfreezeError as e:
            if rounds == 0 and "block commit" in e.message:
                raise MergeRefused(e.message, domain=e.domain, disk=e.disk, hint=e.hint) from None
            raise
        rounds += 1
        live_xml = hv.xml(domain.uuid, domain.name)
        empty = journal.get("iterative_empty") or {}
        remaining = data_bytes(tops)
        log.info("domain %r: round %d merged %d bytes live; %d bytes left on the new overlays",
                 domain.name, rounds, size, remaining)
        if remaining * config.iterative_factor > size:
            size = remaining
            break  # not shrinking fast enough: more rounds would not pay
        size = remaining
    merged, stopped = final_step(hv, domain, disks, config, journal)
    return MergeResult("iterative", offline_bytes=merged, rounds=rounds, stopped_seconds=stopped)
