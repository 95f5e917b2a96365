"""The public API of merge plugins: `DomainMerge`, one domain's merge, and `Definitions`.

The `virtfreeze_merge` and `virtfreeze_merge_recover` hooks receive a
`DomainMerge`. Its fields and methods are everything a merge needs; the
built-in merges (live, iterative, offline) use nothing else, so a
third-party merge can be written from this module and `hookspecs.py` alone.
Every method works on the one domain the object is bound to and raises
`VirtfreezeError` (naming the domain and disk) when something fails;
`MergeRefused` means libvirt refused before anything changed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator

from virtfreeze import qemu_img
from virtfreeze.config import Config
from virtfreeze.domain_xml import BaseImage, parse_disks, repoint_disks, snapshot_xml
from virtfreeze.errors import NotReadyToPivot, VirtfreezeError
from virtfreeze.journal import FrozenDomain, Journal
from virtfreeze.libvirt_boundary import (
    JOB_TYPE_ACTIVE_COMMIT, JOB_TYPE_COMMIT, MISSING, OTHER, PAUSED, RUNNING, SHUTOFF, Hypervisor, is_not_ready_error,
)
from virtfreeze.model import DiskPlan, DomainRef, MergeResult
from virtfreeze.logs import domain_log

# The domain states `DomainMerge.state()` and `Definitions.state` give, for plugins.
__all__ = ["DomainMerge", "Definitions", "JobWatch", "read_definitions",
           "RUNNING", "PAUSED", "SHUTOFF", "MISSING", "OTHER"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Definitions:
    """Where each disk of a domain points, in every definition that exists, read at one moment.

    `live` is None when the domain does not run, `persistent` when it is
    transient or gone, `saved` when it has no managed save image (a guest
    saved by the offline merge resumes from that image's definition).
    """

    state: str  # running, paused, shutoff, missing or other
    persistent_domain: bool
    live: dict[str, str | None] | None
    persistent: dict[str, str | None] | None
    saved: dict[str, str | None] | None
    backing: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # target -> (image below, format)
    io_error: bool = False  # paused because a write failed (its overlay's filesystem full?)

    def all(self) -> list[dict[str, str | None]]:
        return [d for d in (self.live, self.persistent, self.saved) if d is not None]

    def on_overlay(self, disks: list[DiskPlan]) -> list[DiskPlan]:
        """The disks that some definition still points at one of their overlays."""
        defs = self.all()
        if self.state == MISSING:  # the domain is gone: what is left is its overlay files
            return [d for d in disks if d.overlays_on_disk()]
        return [d for d in disks if any(d.is_ours(src.get(d.target)) for src in defs)]


def read_definitions(hv: Hypervisor, ref: DomainRef) -> Definitions:
    """One look at a domain: its state and the disk sources of each of its definitions."""
    info = hv.info(ref.uuid)
    if info is None:
        return Definitions(MISSING, False, None, None, None)

    backing: dict[str, tuple[str, str | None]] = {}

    def sources(xml: str) -> dict[str, str | None]:
        disks = parse_disks(xml)
        for d in disks:
            if d.backing:
                backing.setdefault(d.target, d.backing[0])
        return {d.target: d.source for d in disks}

    live = sources(hv.xml(ref.uuid, ref.name)) if info.state != SHUTOFF else None
    persistent = sources(hv.xml(ref.uuid, ref.name, inactive=True)) if info.persistent else None
    saved = None
    if info.persistent and info.state == SHUTOFF and hv.has_managed_save(ref.uuid, ref.name):
        saved = sources(hv.managed_save_xml(ref.uuid, ref.name))
    return Definitions(info.state, info.persistent, live, persistent, saved, backing, info.io_error)


class JobWatch:
    """Block-job events of the bound domain, collected from the moment the watch was entered."""

    def __init__(self, merge: "DomainMerge", events):
        self._merge = merge
        self._events = events

    def wait(self, disks: list[DiskPlan], until: str, timeout: float | None = None) -> None:
        """Wait until the job on each disk reached `until`: ``ready`` (an active commit may be
        pivoted), ``completed`` (a commit below the active layer finished) or ``gone`` (a cancelled
        job ended). Event-driven; bounded by `timeout` (default: the config's commit_ready_timeout)."""
        m = self._merge
        on_tick = m._progress if until == "ready" else None
        m._hv.wait_for_jobs(m.domain.uuid, m.domain.name, {d.target for d in disks}, self._events, until=until,
                            timeout=m.config.commit_ready_timeout if timeout is None else timeout,
                            on_tick=on_tick)


class DomainMerge:
    """One domain's merge, as merge plugins see it.

    Fields: ``domain`` (`DomainRef`), ``disks`` (the `DiskPlan`s still on an
    overlay), ``config`` (`Config`), ``strategy`` (the strategy asked for:
    live, iterative or offline; ``auto_fallback`` says that it was chosen by
    ``auto``, which allows falling back to a stop of the guest), ``record`` (the domain's `FrozenDomain`
    journal record: read it freely, change it only through `note`),
    ``at_start`` (the `Definitions` read just before the hook was called;
    `definitions()` reads them again).
    """

    def __init__(self, hv: Hypervisor, journal: Journal, record: FrozenDomain, disks: list[DiskPlan],
                 config: Config, strategy: str, pm, progress=None, at_start: Definitions | None = None,
                 auto_fallback: bool = False):
        self._hv = hv
        self._journal = journal
        self._pm = pm
        self._progress_cb = progress
        self.record = record
        self.domain = record.ref
        self.disks = disks
        self.config = config
        self.strategy = strategy
        self.auto_fallback = auto_fallback
        self.at_start = at_start or read_definitions(hv, record.ref)

    # -- reading ---------------------------------------------------------------
    def state(self) -> str:
        """running, paused, shutoff, missing (undefined) or other (crashed, suspended to RAM)."""
        return self._hv.state(self.domain.uuid)

    def definitions(self) -> Definitions:
        """Where each disk points now, in the live, persistent and saved definitions."""
        return read_definitions(self._hv, self.domain)

    def live_source(self, disk: DiskPlan) -> str | None:
        """The image the running guest writes `disk` into now."""
        return next((d.source for d in parse_disks(self._hv.xml(self.domain.uuid, self.domain.name))
                     if d.target == disk.target), None)

    def job(self, disk: DiskPlan) -> str | None:
        """The block job on a disk: ``active-commit``, ``commit`` (below the active layer), another
        job's libvirt type number as a string, or None when none runs."""
        info = self._hv.block_job(self.domain.uuid, self.domain.name, disk.target)
        if not info:
            return None
        return {JOB_TYPE_ACTIVE_COMMIT: "active-commit", JOB_TYPE_COMMIT: "commit"}.get(info.get("type"),
                                                                                      str(info.get("type")))

    # -- the journal -----------------------------------------------------------
    def note(self, **changes) -> None:
        """Write changes of the journal record durably *before* the step they prepare, so that a crash
        is finished by the next thaw. Fields: see `FrozenDomain`; a plugin's own go into
        ``plugin_marks`` (``note(plugin_marks={**merge.record.plugin_marks, "mine": 1})``)."""
        self._journal.note(self.record, **changes)

    # -- live merges -------------------------------------------------------------
    @contextlib.contextmanager
    def watch_jobs(self) -> Iterator[JobWatch]:
        """Enter before starting a job, so that none of its events is missed; `.wait()` on it."""
        with self._hv.block_job_events(self.domain.uuid) as events:
            yield JobWatch(self, events)

    def start_commit(self, disk: DiskPlan, top: str | None = None, bandwidth: int | None = None) -> None:
        """Commit into `disk.base` while the guest runs: the whole active chain (top None: an active
        commit, ready to pivot once it caught up), or the layer `top` below the active one (it
        completes by itself), copying at most `bandwidth` bytes/s (None: the config's
        commit_bandwidth; 0: no limit). Raises `MergeRefused` when libvirt refuses to start it."""
        self._hv.block_commit(self.domain.uuid, self.domain.name, disk.target, disk.base, top=top,
                              active=top is None,
                              bandwidth=self.config.commit_bandwidth if bandwidth is None else bandwidth)

    def set_speed(self, disk: DiskPlan, bandwidth: int) -> None:
        """Change the copy rate of the disk's running job (bytes/s, 0: unlimited)."""
        self._hv.set_job_speed(self.domain.uuid, self.domain.name, disk.target, bandwidth)

    def pivot(self, disk: DiskPlan) -> None:
        """Switch the guest to the base once an active commit is ready; ends the job. Raises
        `NotReadyToPivot` when the commit is not ready (wait for ``ready`` again, then retry)."""
        try:
            self._hv.pivot(self.domain.uuid, self.domain.name, disk.target)
        except VirtfreezeError as e:
            if is_not_ready_error(e):
                raise NotReadyToPivot(e.message, domain=e.domain, disk=e.disk) from None
            raise

    def cancel(self, disk: DiskPlan) -> None:
        """Cancel the block job on a disk (the chain stays valid); `.wait(until="gone")` for its end."""
        self._hv.cancel_job(self.domain.uuid, self.domain.name, disk.target)

    def new_overlays(self, overlays: dict[str, str]) -> None:
        """Put a new qcow2 overlay (target -> path, must not exist) on top of those disks, atomically."""
        xml = snapshot_xml(parse_disks(self._hv.xml(self.domain.uuid, self.domain.name)), overlays)
        self._hv.snapshot(self.domain.uuid, self.domain.name, xml, memory=False, quiesce=False)

    # -- stopping the guest -------------------------------------------------------
    def pause(self) -> None:
        """Stop the guest's vCPUs (QEMU and its block jobs keep running)."""
        self._hv.suspend(self.domain.uuid, self.domain.name)

    def resume(self) -> None:
        self._hv.resume(self.domain.uuid, self.domain.name)

    @contextlib.contextmanager
    def guest_paused(self) -> Iterator[bool]:
        """Stop the guest's vCPUs for the block, noted in the journal first (a crash meanwhile: the next
        thaw resumes it); yields whether this paused it (a guest paused already stays paused)."""
        pause = self.state() == RUNNING
        if pause:
            self.note(paused_by_virtfreeze=True)
            self.pause()
        try:
            yield pause
        finally:
            if pause:
                resume_paused(self)

    def save(self, paused: bool) -> None:
        """Stop the guest into libvirt's managed save (state on disk); `start` brings it back,
        paused or running as `paused` says."""
        self._hv.managed_save(self.domain.uuid, self.domain.name, paused)

    def start(self) -> None:
        """Start the domain (from its managed save image when it has one)."""
        self._hv.start(self.domain.uuid, self.domain.name)

    # -- offline ----------------------------------------------------------------------
    def commit_offline(self, disk: DiskPlan, top: str) -> int:
        """`qemu-img commit` of `top` (and anything between) into `disk.base`, with nothing running on
        it; returns the bytes it held. Refuses a base that is not in `top`'s chain."""
        merged = os.stat(top).st_blocks * 512
        domain_log(log, self.domain.name, disk.target).info("offline commit of %s into %s", top, disk.base)
        qemu_img.commit(top, disk.base, domain=self.domain.name, disk=disk.target)
        return merged

    def repoint_persistent(self, disks: list[DiskPlan] | None = None) -> list[str]:
        """Point the persistent definition's disks that are on an overlay back at their bases;
        returns the targets changed (a no-op for a transient or gone domain)."""
        info = self._hv.info(self.domain.uuid)
        if info is None or not info.persistent:
            return []
        xml, changed = _repointed(self._hv.xml(self.domain.uuid, self.domain.name, inactive=True),
                                  disks or self.disks)
        if changed:
            self._hv.define(xml, self.domain.name)
            domain_log(log, self.domain.name).info("persistent definition of %s pointed back at the base",
                                                   ", ".join(changed))
        return changed

    def repoint_saved(self, disks: list[DiskPlan] | None = None) -> list[str]:
        """The same for the managed save image's definition, which a saved guest resumes from."""
        xml, changed = _repointed(self._hv.managed_save_xml(self.domain.uuid, self.domain.name),
                                  disks or self.disks)
        if changed:
            self._hv.managed_save_define(self.domain.uuid, self.domain.name, xml)
            domain_log(log, self.domain.name).info("saved state now points at the base of %s", ", ".join(changed))
        return changed

    # -- composing and reporting --------------------------------------------------------
    def merge_with(self, strategy: str, disks: list[DiskPlan] | None = None,
                   config: Config | None = None) -> MergeResult | None:
        """Hand (some of) the disks to the merge plugins as strategy `strategy` (e.g. the iterative
        merge's last step is a live merge with the guest paused, or an offline one); returns what
        that plugin returned, None when none took it."""
        other = DomainMerge(self._hv, self._journal, self.record, disks or self.disks, config or self.config,
                            strategy, self._pm, self._progress_cb)  # definitions read anew: things changed
        return self._pm.hook.virtfreeze_merge(merge=other)

    def progress(self, text: str) -> None:
        """Say what the merge is doing now, for the progress display (e.g. "round 2: 3 MiB left")."""
        if self._progress_cb is not None:
            self._progress_cb.update(self.domain.name, text)

    def _progress(self, target: str, job: dict) -> None:
        if job.get("end"):
            self.progress(f"disk {target}: committing {100.0 * job.get('cur', 0) / job['end']:.0f}%")


def allocated_bytes(path: str) -> int:
    """Bytes an overlay holds on disk (0 when it is gone or cannot be seen)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def resume_paused(merge: DomainMerge) -> None:
    """Resume a guest a merge paused (`guest_paused`, also after a crash); a no-op otherwise."""
    if merge.record.paused_by_virtfreeze:
        if merge.state() == PAUSED:
            domain_log(log, merge.domain.name).info("resuming the guest virtfreeze paused")
            merge.resume()
        merge.note(paused_by_virtfreeze=None)


def _repointed(xml: str, disks: list[DiskPlan]) -> tuple[str, list[str]]:
    """`xml` with every disk that is on one of its overlays pointed back at its base."""
    current = {d.target: d.source for d in parse_disks(xml)}
    bases = {d.target: BaseImage(d.base, d.base_format, d.base_type) for d in disks}
    return repoint_disks(xml, bases, only_if_source={
        d.target: current.get(d.target) for d in disks if d.is_ours(current.get(d.target))})
