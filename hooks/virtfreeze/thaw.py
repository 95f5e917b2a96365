"""The thaw path: merge each frozen domain's overlays back, then clean up.

Truth comes from the live, persistent and saved definitions (read together,
once per step: `merge_api.Definitions`); the journal record supplies the
recorded bases (and, when it is lost, overlays are found by name and their
backing file). The merges are plugins behind the public merge API; this
module imports none of them. Overlays are deleted only once no definition
points at them any more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from virtfreeze import downtime, export_view, file_removal, guest_view, holders, memory_freeze, qemu_img
from virtfreeze.domain_xml import is_overlay, parse_disks
from virtfreeze.errors import DomainNotFound, LeftOnOverlay, MergeRefused, VirtfreezeError
from virtfreeze.journal import FrozenDomain, Journal, domain_lock, failpoint
from virtfreeze.libvirt_boundary import MISSING, OTHER, PAUSED, SHUTOFF
from virtfreeze.merge_api import Definitions, DomainMerge, read_definitions, resume_paused
from virtfreeze.model import DiskPlan, DomainRef, MergeResult
from virtfreeze.plugins import report_done, report_failure
from virtfreeze.runtime import Runtime
from virtfreeze.logs import domain_log

log = logging.getLogger(__name__)


@dataclass
class ThawResult:
    name: str
    uuid: str
    strategy: str | None  # None: nothing was left to merge
    overlay_bytes: int
    seconds: float
    offline_bytes: int = 0
    rounds: int = 0
    stopped_seconds: float = 0.0
    held_by: list[str] = field(default_factory=list)  # left frozen: the other runs that still hold it
    note: str | None = None
    downtime_seconds: float = 0.0  # the guest was not running this long during the thaw (lifecycle events)
    frozen_by: str | None = None  # the command that froze it (freeze: hook mode; backup: driver mode)
    own_freeze: bool = False  # this run (process session) made or joined the freeze it merged

    def to_json(self) -> dict:
        return dict(self.__dict__)


def discover(rt: Runtime, ref: DomainRef, defs: Definitions | None = None) -> FrozenDomain | None:
    """Rebuild a journal record from the definitions alone (journal lost); None when nothing is frozen."""
    defs = defs or read_definitions(rt.hv, ref)
    disks: dict[str, DiskPlan] = {}
    for sources in defs.all():
        for target, source in sources.items():
            if target in disks or not is_overlay(source):
                continue
            if target in defs.backing:  # libvirt's view of the chain; no need to ask qemu-img
                backing, fmt = defs.backing[target]
            elif os.path.exists(source):
                backing, fmt = qemu_img.backing_of(source, ref.name, target)
            else:
                continue  # merged and removed while we looked
            if not backing:
                raise LeftOnOverlay("disk is on a virtfreeze overlay with no backing file", domain=ref.name,
                                    disk=target, path=source, hint="merge it by hand")
            disks[target] = DiskPlan(target, backing, fmt or "raw", "block" if export_view.is_block_device(backing) else "file", source)
    if not disks:
        return None
    export_dir = rt.config.export_directory / export_view.domain_dir_name(ref.name, ref.uuid)
    return FrozenDomain(ref.uuid, ref.name, "discovered", disks=list(disks.values()), export_dir=str(export_dir),
                        persistent=defs.persistent_domain)


def frozen_domains(rt: Runtime) -> list[FrozenDomain]:
    """Every domain with a journal record, or with a disk on a virtfreeze overlay (a record rebuilt)."""
    found = {r.uuid: r for r in rt.journal.all()}
    for info in rt.hv.domains():
        if info.uuid in found:
            continue
        try:
            xmls = [rt.hv.xml(info.uuid, info.name)]
            if info.persistent and info.state != SHUTOFF:
                xmls.append(rt.hv.xml(info.uuid, info.name, inactive=True))
        except DomainNotFound:
            continue  # undefined while we looked
        if any(is_overlay(d.source) for xml in xmls for d in parse_disks(xml)):
            found[info.uuid] = FrozenDomain(info.uuid, info.name, "discovered", persistent=info.persistent)
    return sorted(found.values(), key=lambda r: r.name)


def _remove_overlays(disks: list[DiskPlan], ref: DomainRef) -> None:
    """The merged overlays, shrunk in steps before they go: the guest runs on (file_removal)."""
    for d in disks:
        for path in d.overlays_on_disk():
            with contextlib.suppress(FileNotFoundError):
                file_removal.remove(path)
                domain_log(log, ref.name, d.target).info("removed overlay %s", path)


def _merge(rt: Runtime, merge: DomainMerge, strategy: str) -> MergeResult:
    """Call the merge hook; `auto` is live, falling back to offline when libvirt refuses."""
    asked = "live" if strategy == "auto" else strategy
    try:
        result = rt.pm.hook.virtfreeze_merge(merge=merge)
    except MergeRefused as e:
        if strategy != "auto":
            raise
        log.warning("%s; falling back to the offline merge (the guest stops while it runs)", e)
        result = merge.merge_with("offline")
    if result is None:
        raise VirtfreezeError(f"no merge plugin handles strategy {asked!r} for a domain in state "
                              f"{merge.state()}", domain=merge.domain.name)
    return result


def thaw_locked(rt: Runtime, ref: DomainRef, strategy: str | None = None,
                record: FrozenDomain | None = None) -> ThawResult:
    """Thaw one domain; the caller holds its lock (and may pass the journal record it read already)."""
    t0 = time.monotonic()
    record = record or rt.journal.load(ref.uuid)
    defs = read_definitions(rt.hv, ref)
    if record is None:
        record = discover(rt, ref, defs)
        if record is None:
            return ThawResult(ref.name, ref.uuid, None, 0, 0.0)
        domain_log(log, ref.name).warning("no journal, but disks %s are on virtfreeze overlays; merging them",
                                          ", ".join(d.target for d in record.disks))
    if defs.state == MISSING:
        ref = record.ref  # undefined since the freeze: its name is in the journal
    io_error = defs.io_error
    if io_error:
        domain_log(log, ref.name).warning("paused on an I/O error; merging it, then resuming it")
    record.name = ref.name
    disks = record.disks
    rt.journal.note(record, phase="thawing")
    overlay_bytes = sum(os.stat(p).st_size for d in disks for p in d.overlays_on_disk())
    wanted = rt.config.effective(ref.name, strategy=strategy).strategy
    asked = "live" if wanted == "auto" else wanted
    if record.export_dir:
        # The backup is over: nothing may read a base while it is merged into, and no
        # view (a FUSE process or qemu-storage-daemon) outlives the freeze.
        export_view.remove(Path(record.export_dir), guest_view.directory(rt.state_dir, record.uuid))

    def merge_of(pending: list[DiskPlan]) -> DomainMerge:
        return DomainMerge(rt.hv, rt.journal, record, pending, rt.config, asked, rt.pm, rt.progress, at_start=defs,
                           auto_fallback=wanted == "auto")

    result = None
    try:
        for _ in range(3):  # a domain may change state under us (shut down mid-commit)
            pending = defs.on_overlay(disks)
            if not pending:
                break
            if defs.state == OTHER:
                raise VirtfreezeError("domain is crashed or suspended; cannot merge it now", domain=ref.name,
                                      hint="start or destroy it, then run `virtfreeze thaw` again")
            merge = merge_of(pending)
            rt.progress.update(ref.name, f"merging ({asked}): {', '.join(d.target for d in pending)}")
            try:
                result = _merge(rt, merge, wanted)
            except VirtfreezeError as e:
                if rt.hv.state(ref.uuid) in (SHUTOFF, MISSING):
                    log.warning("%s; the domain stopped meanwhile, merging offline", e)
                    defs = read_definitions(rt.hv, ref)
                    continue
                raise
            failpoint("thaw-after-merge")
            defs = read_definitions(rt.hv, ref)
            if defs.persistent and any(d.is_ours(defs.persistent.get(d.target)) for d in disks):
                merge.repoint_persistent(disks)  # libvirt left the persistent definition on the overlay
                defs = read_definitions(rt.hv, ref)
        # A guest a merge stopped comes back, also after a crash (each plugin looks at its own marks).
        marked = bool(record.saved_by_virtfreeze or record.paused_by_virtfreeze or record.plugin_marks)
        recovering = merge_of(defs.on_overlay(disks))
        resume_paused(recovering)  # the API's own mark (DomainMerge.guest_paused)
        rt.pm.hook.virtfreeze_merge_recover(merge=recovering)
        if marked:
            defs = read_definitions(rt.hv, ref)
        if io_error and defs.state == PAUSED:
            # Its overlay is merged away: the write that failed (ENOSPC) is retried on the base.
            domain_log(log, ref.name).warning("resuming the guest, paused on an I/O error while frozen "
                                              "(was its overlay's filesystem full?)")
            rt.hv.resume(ref.uuid, ref.name)
            defs = read_definitions(rt.hv, ref)
        still = defs.on_overlay(disks)
        if still:
            raise VirtfreezeError(f"disks {', '.join(d.target for d in still)} still on their overlays",
                                  domain=ref.name)
    except VirtfreezeError as e:
        now = read_definitions(rt.hv, ref)
        if now.on_overlay(disks) or now.state == OTHER:
            raise LeftOnOverlay(e.message, domain=e.domain or ref.name, disk=e.disk, path=e.path,
                                hint=e.hint or "state kept in the journal; run `virtfreeze thaw` again") from None
        raise

    failpoint("thaw-before-cleanup")
    _remove_overlays(disks, ref)
    if record.memory_file:  # where the freeze wrote it (memory_directory may have changed since)
        memory_freeze.remove_image(Path(record.memory_file), record.uuid)
    shutil.rmtree(rt.state_dir / "memory" / ref.uuid, ignore_errors=True)  # the default place: all ours
    rt.journal.remove(ref.uuid)
    seconds = time.monotonic() - t0
    used = result.strategy if result else None
    domain_log(log, ref.name).info("thawed (%s, %d overlay bytes, %.2fs)", used or "nothing to merge",
                                   overlay_bytes, seconds)
    rt.pm.hook.virtfreeze_after_thaw(domain=ref, strategy=used, overlay_bytes=overlay_bytes)
    return ThawResult(ref.name, ref.uuid, used, overlay_bytes, seconds,
                      result.offline_bytes if result else 0, result.rounds if result else 0,
                      result.stopped_seconds if result else 0.0, note=result.note if result else None,
                      frozen_by=record.command)


def _release(rt: Runtime, ref: DomainRef, record: FrozenDomain | None, me: holders.Holder,
             own: bool) -> ThawResult | None:
    """This run (`me`; `own`: one of the record's holders) lets go of the domain. A ThawResult
    (nothing merged) when another live run still holds it, so the merge waits for that one; None
    when this thaw should merge."""
    if record is None or not record.holders:
        return None
    others = holders.live_others(record.holders, me)
    if not others:
        return None  # the last holder, or only dead ones: they protect nothing
    if own:
        rt.journal.note(record, holders=[h for h in record.holders if not h.same_run(me)])
    held = [h.describe() for h in others]
    domain_log(log, ref.name).info("left frozen: still held by %s (`thaw --force` merges it anyway)",
                                   "; ".join(held))
    return ThawResult(ref.name, ref.uuid, None, 0, 0.0, held_by=held)


def other_config(rt: Runtime, ref: DomainRef, me: holders.Holder
                 ) -> tuple[Path, FrozenDomain, list[holders.Holder]] | None:
    """Another config's journal record of this domain (the host-wide index names it: the newest
    freeze), its state directory, and the live runs other than `me` that hold it; None: no other
    journal has one."""
    found = rt.journal.elsewhere(ref.uuid)
    if found is None:
        return None
    state_dir, record = found
    return state_dir, record, holders.live_others(record.holders, me)


def adopt(rt: Runtime, state_dir: Path, record: FrozenDomain, why: str) -> FrozenDomain:
    """Make another config's record of a freeze ours (`why`: its runs are gone, or --force): merging it
    then also removes what that freeze made (its export view, memory image) and finishes what its
    crash marks say; their journal's copy is retired."""
    domain_log(log, record.name).warning("taking over the freeze recorded under state_directory %s (%s)",
                                         state_dir, why)
    rt.journal.write(record)
    try:
        Journal(state_dir, rt.journal.index_dir).remove(record.uuid)
    except (OSError, VirtfreezeError) as e:
        domain_log(log, record.name).warning("cannot retire its record under state_directory %s (%s); that "
                                             "configuration's next thaw finds nothing to merge", state_dir, e)
    return record


def _settle_other_config(rt: Runtime, ref: DomainRef, me: holders.Holder, record: FrozenDomain | None,
                         force: bool) -> tuple[FrozenDomain | None, ThawResult | None]:
    """The record this thaw works from, and a ThawResult (nothing merged) when a live run of another
    config holds the freeze: merging it would change the base under that run's archive."""
    other = other_config(rt, ref, me)
    if other is None:
        return record, None
    state_dir, theirs, live = other
    if live and not force:
        if discover(rt, ref) is None:  # merged by other means since: nothing to leave, nothing to take over
            return record, None
        held = [f"{h.describe()}, with state_directory {state_dir}" for h in live]
        domain_log(log, ref.name).warning("left frozen: a run of another configuration holds it (%s); that run's "
                                          "thaw merges it (`thaw --force` merges it anyway)", "; ".join(held))
        return record, ThawResult(ref.name, ref.uuid, None, 0, 0.0, held_by=held)
    return adopt(rt, state_dir, theirs, "--force" if live else "no run of it holds it any more"), None


def thaw_domain(rt: Runtime, ref: DomainRef, strategy: str | None = None, force: bool = False) -> ThawResult:
    """Thaw one domain, unless another live run still holds its freeze (`force`: merge anyway)."""
    try:
        with domain_lock(ref.uuid, ref.name, wait=rt.config.lock_wait), downtime.watched(rt.hv, ref.uuid) as down:
            me = holders.current()
            record, left = _settle_other_config(rt, ref, me, rt.journal.load(ref.uuid), force)
            own = record is not None and any(h.same_run(me) for h in record.holders)
            if left is None and not force:
                left = _release(rt, ref, record, me, own)
            result = left or thaw_locked(rt, ref, strategy, record)
            result.own_freeze = own
    except VirtfreezeError as e:
        report_failure(rt.pm, ref, "thaw", e)
        raise
    finally:
        rt.progress.finish(ref.name)
    result.downtime_seconds = down.seconds
    report_done(rt.pm, ref, "thaw", result, rt.command)
    return result
