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
- save: the offline merge (managed save, qemu-img commit, restore). The
  guest is stopped for seconds whatever the overlay's size: QEMU exits and
  starts again.
- auto: pause; save when libvirt refuses the commit.

The last step hands the disks on through the public API (`merge_with`: the
live merge with the guest paused, or the offline merge), so this plugin
imports no other merge.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time

from virtfreeze.base_writeback import written_back
from virtfreeze.errors import MergeRefused, VirtfreezeError
from virtfreeze.hookspecs import hookimpl
from virtfreeze.journal import failpoint
from virtfreeze.merge_api import PAUSED, RUNNING, allocated_bytes
from virtfreeze.model import MergeResult
from virtfreeze.logs import domain_log

log = logging.getLogger(__name__)


def one_round(merge, disks, tops: dict[str, str]) -> dict[str, str]:
    """New overlays on top, then commit the previous tops into the bases. Returns the new tops."""
    n = max(d.round_of(tops[d.target]) for d in disks) + 1
    new = {d.target: d.round_overlay(n) for d in disks}
    for path in new.values():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale file of a crashed round: nothing points at it
    merge.note(iterative_round=n)
    merge.progress(f"round {n - 1}: committing live")
    merge.new_overlays(new)
    empty = {t: allocated_bytes(p) for t, p in new.items()}  # qcow2 metadata of a fresh overlay, not data
    merge.note(iterative_empty=empty)
    failpoint("iterative-snapshot")
    with merge.watch_jobs() as watch:
        for d in disks:
            merge.start_commit(d, top=tops[d.target])
        failpoint("iterative-commit-started")
        with contextlib.ExitStack() as written:  # QEMU's flush as each commit ends then finds little to do
            for d in disks:
                written.enter_context(written_back(merge.domain.name, d.target, d.base))
            watch.wait(disks, "completed")
    live = merge.definitions().live or {}
    for d in disks:
        if live.get(d.target) != new[d.target]:
            raise VirtfreezeError(f"after a commit round the disk is on {live.get(d.target)!r}",
                                  domain=merge.domain.name, disk=d.target)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tops[d.target])  # merged into the base and out of every chain
    return new


# Longest wait for a commit to become ready while the guest is paused; after it
# the guest runs again and the commit goes on live (the next thaw pivots it).
PAUSED_READY_TIMEOUT = 60.0


def merge_paused(merge, disks) -> tuple[int, float]:
    """Merge the last overlays with the guest's vCPUs stopped; returns (bytes, seconds stopped).

    A guest that was paused already stays paused. Raises MergeRefused (the
    guest running again) when libvirt refuses the commit.
    """
    bounded = dataclasses.replace(merge.config, commit_ready_timeout=min(merge.config.commit_ready_timeout,
                                                                         PAUSED_READY_TIMEOUT))
    live = merge.definitions().live or {}
    merged = sum(allocated_bytes(live[d.target]) for d in disks if d.is_ours(live.get(d.target)))
    t0 = time.monotonic()
    with merge.guest_paused() as paused:
        merge.progress(f"last {merged >> 20} MiB: guest paused")
        failpoint("iterative-paused")
        if merge.merge_with("live", disks, config=bounded) is None:
            raise VirtfreezeError("no merge plugin handles the live step", domain=merge.domain.name)
    stopped = time.monotonic() - t0 if paused else 0.0
    domain_log(log, merge.domain.name).info("merged the last %d bytes with the guest paused %.3fs", merged, stopped)
    return merged, stopped


def final_step(merge, disks) -> tuple[int, float]:
    """Merge the last, small overlays with the guest stopped, as `iterative_final_step` says."""
    step = merge.config.iterative_final_step
    if step != "save":
        try:
            return merge_paused(merge, disks)
        except MergeRefused as e:
            if step == "pause":
                raise
            log.warning("%s; merging the last overlay with the guest saved instead (a stop of seconds)", e)
    result = merge.merge_with("offline", disks)
    if result is None:
        raise VirtfreezeError("no merge plugin handles the offline step", domain=merge.domain.name)
    return result.offline_bytes, result.stopped_seconds


@hookimpl
def virtfreeze_merge(merge):
    if merge.strategy != "iterative" or merge.state() not in (RUNNING, PAUSED):
        return None
    tops = merge.definitions().live or {}
    disks = [d for d in merge.disks if d.is_ours(tops.get(d.target))]
    for d in disks:  # a round of an interrupted run: cancelling leaves a valid chain
        if merge.job(d) == "commit":
            domain_log(log, merge.domain.name, d.target).info("cancelling the commit of an interrupted round")
            with merge.watch_jobs() as watch:
                merge.cancel(d)
                watch.wait([d], "gone", timeout=60)
    rounds = 0

    def data_bytes(tops):
        empty = merge.record.iterative_empty
        return sum(max(0, allocated_bytes(tops[d.target]) - empty.get(d.target, 0)) for d in disks)

    size = data_bytes(tops)
    config = merge.config
    while disks and rounds < config.iterative_max_rounds and size > config.iterative_threshold:
        try:
            tops = one_round(merge, disks, tops)
        except MergeRefused:
            if rounds:
                raise VirtfreezeError("libvirt refused a later commit round", domain=merge.domain.name) from None
            raise  # the first commit refused: the caller may fall back to the offline merge
        rounds += 1
        remaining = data_bytes(tops)
        merge.progress(f"round {rounds}: {size >> 20} MiB merged live, {remaining >> 20} MiB left")
        domain_log(log, merge.domain.name).info("round %d merged %d bytes live; %d bytes left on the new overlays",
                                                rounds, size, remaining)
        if remaining * config.iterative_factor > size:
            size = remaining
            break  # not shrinking fast enough: more rounds would not pay
        size = remaining
    merged, stopped = final_step(merge, disks)
    return MergeResult("iterative", offline_bytes=merged, rounds=rounds, stopped_seconds=stopped)

