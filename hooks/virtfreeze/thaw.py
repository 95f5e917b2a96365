"""The thaw path: merge each frozen domain's overlays back, then clean up.

Truth comes from the live and persistent definitions; the journal supplies
the recorded bases (and, when it is lost, overlays are found by name and
their backing file). Overlays are deleted only once no definition points at
them any more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from virtfreeze import export_view, qemu_img
from virtfreeze.domain_xml import is_overlay, parse_disks
from virtfreeze.errors import DomainNotFound, LeftOnOverlay, MergeRefused, VirtfreezeError
from virtfreeze.journal import domain_lock, failpoint
from virtfreeze.libvirt_boundary import MISSING, OTHER, SHUTOFF
from virtfreeze.merge_iterative import resume_paused
from virtfreeze.merge_offline import repoint_persistent, resume_saved
from virtfreeze.model import DiskPlan, DomainRef, MergeResult
from virtfreeze.plugins import report_failure
from virtfreeze.runtime import Runtime

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

    def to_json(self) -> dict:
        return dict(self.__dict__)


class JournalNotes:
    """What merge plugins write into a domain's journal before a mutating step."""

    def __init__(self, rt: Runtime, record: dict):
        self._rt = rt
        self.record = record

    def note(self, **fields) -> None:
        self.record.update(fields)
        self._rt.journal.write(self.record)

    def get(self, key: str, default=None):
        return self.record.get(key, default)


def _base_type(path: str) -> str:
    with contextlib.suppress(OSError):
        if stat.S_ISBLK(os.stat(path).st_mode):
            return "block"
    return "file"


def discover(rt: Runtime, uuid: str, name: str) -> dict | None:
    """Rebuild a journal record from the definitions alone (journal lost)."""
    info = rt.hv.info(uuid)
    if info is None:
        return None
    xmls = [rt.hv.xml(uuid, name)]
    if info.persistent:
        xmls.append(rt.hv.xml(uuid, name, inactive=True))
    disks: dict[str, DiskPlan] = {}
    for xml in xmls:
        for d in parse_disks(xml):
            if d.target in disks or not is_overlay(d.source):
                continue
            backing, fmt = (d.backing[0] if d.backing else qemu_img.backing_of(d.source, name, d.target))
            if not backing:
                raise LeftOnOverlay("disk is on a virtfreeze overlay with no backing file", domain=name,
                                    disk=d.target, path=d.source, hint="merge it by hand")
            disks[d.target] = DiskPlan(d.target, backing, fmt or "raw", _base_type(backing), d.source)
    if not disks:
        return None
    export_dir = rt.config.export_directory / export_view.domain_dir_name(name, uuid)
    return {"uuid": uuid, "name": name, "phase": "discovered", "disks": [p.to_json() for p in disks.values()],
            "export_dir": str(export_dir)}


def frozen_domains(rt: Runtime) -> list[DomainRef]:
    """Every domain with a journal, or with a disk on a virtfreeze overlay."""
    found = {r["uuid"]: DomainRef(r["name"], r["uuid"]) for r in rt.journal.all()}
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
            found[info.uuid] = DomainRef(info.name, info.uuid)
    return sorted(found.values(), key=lambda r: r.name)


def _sources(rt: Runtime, ref: DomainRef) -> list[dict[str, str | None]]:
    """The disk sources of each existing definition (live and persistent)."""
    info = rt.hv.info(ref.uuid)
    if info is None:
        return []
    xmls = []
    if info.state != SHUTOFF:
        xmls.append(rt.hv.xml(ref.uuid, ref.name))
    if info.persistent:
        xmls.append(rt.hv.xml(ref.uuid, ref.name, inactive=True))
        if info.state == SHUTOFF and rt.hv.has_managed_save(ref.uuid, ref.name):
            xmls.append(rt.hv.managed_save_xml(ref.uuid, ref.name))  # a saved guest resumes from this
    return [{d.target: d.source for d in parse_disks(x)} for x in xmls]


def on_overlay(rt: Runtime, ref: DomainRef, disks: list[DiskPlan]) -> list[DiskPlan]:
    """The disks some definition still points at an overlay (or, domain gone, whose overlay exists)."""
    defs = _sources(rt, ref)
    if not defs:
        return [d for d in disks if d.overlays_on_disk()]
    return [d for d in disks if any(d.is_ours(src.get(d.target)) for src in defs)]


def _repoint_persistent(rt: Runtime, ref: DomainRef, disks: list[DiskPlan]) -> None:
    info = rt.hv.info(ref.uuid)
    if info is not None and info.persistent:
        repoint_persistent(rt.hv, ref, disks)


def _remove_overlays(disks: list[DiskPlan], ref: DomainRef) -> None:
    for d in disks:
        for path in d.overlays_on_disk():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                log.info("domain %r disk %s: removed overlay %s", ref.name, d.target, path)


def _merge(rt: Runtime, ref: DomainRef, pending: list[DiskPlan], strategy: str, notes: JournalNotes) -> MergeResult:
    """Call the merge hook; `auto` is live, falling back to offline when libvirt refuses."""
    asked = "live" if strategy == "auto" else strategy
    try:
        result = rt.pm.hook.virtfreeze_merge(hv=rt.hv, domain=ref, disks=pending, config=rt.config,
                                             strategy=asked, journal=notes)
    except MergeRefused as e:
        if strategy != "auto":
            raise
        log.warning("%s; falling back to the offline merge (the guest stops while it runs)", e)
        result = rt.pm.hook.virtfreeze_merge(hv=rt.hv, domain=ref, disks=pending, config=rt.config,
                                             strategy="offline", journal=notes)
    if result is None:
        raise VirtfreezeError(f"no merge plugin handles strategy {asked!r} for a domain in state "
                              f"{rt.hv.state(ref.uuid)}", domain=ref.name)
    return result


def thaw_locked(rt: Runtime, ref: DomainRef, strategy: str | None = None) -> ThawResult:
    """Thaw one domain; the caller holds its lock."""
    t0 = time.monotonic()
    record = rt.journal.load(ref.uuid)
    if record is None:
        record = discover(rt, ref.uuid, ref.name)
        if record is None:
            return ThawResult(ref.name, ref.uuid, None, 0, 0.0)
        log.warning("domain %r: no journal, but disks %s are on virtfreeze overlays; merging them",
                    ref.name, ", ".join(d["target"] for d in record["disks"]))
    ref = DomainRef(record.get("name", ref.name), ref.uuid) if rt.hv.info(ref.uuid) is None else ref
    disks = [DiskPlan.from_json(d) for d in record.get("disks", [])]
    notes = JournalNotes(rt, dict(record, phase="thawing"))
    notes.note()
    overlay_bytes = sum(os.stat(p).st_size for d in disks for p in d.overlays_on_disk())
    wanted = rt.config.effective(ref.name, strategy=strategy).strategy
    export_dir = record.get("export_dir")
    if export_dir:
        # The backup is over: nothing may read a base while it is merged into, and no
        # device view (a FUSE process) outlives the freeze.
        export_view.remove(Path(export_dir))

    result = None
    try:
        for _ in range(3):  # a domain may change state under us (shut down mid-commit)
            pending = on_overlay(rt, ref, disks)
            if not pending:
                break
            if rt.hv.state(ref.uuid) == OTHER:
                raise VirtfreezeError("domain is crashed or suspended; cannot merge it now", domain=ref.name,
                                      hint="start or destroy it, then run `virtfreeze thaw` again")
            try:
                result = _merge(rt, ref, pending, wanted, notes)
            except VirtfreezeError as e:
                if rt.hv.state(ref.uuid) in (SHUTOFF, MISSING):
                    log.warning("%s; the domain stopped meanwhile, merging offline", e)
                    continue
                raise
            failpoint("thaw-after-merge")
            _repoint_persistent(rt, ref, disks)
        resume_saved(rt.hv, ref, notes)  # a guest virtfreeze saved or paused comes back, even after a crash
        resume_paused(rt.hv, ref, notes)
        still = on_overlay(rt, ref, disks)
        if still:
            raise VirtfreezeError(f"disks {', '.join(d.target for d in still)} still on their overlays",
                                  domain=ref.name)
    except VirtfreezeError as e:
        if on_overlay(rt, ref, disks) or rt.hv.state(ref.uuid) == OTHER:
            raise LeftOnOverlay(e.message, domain=e.domain or ref.name, disk=e.disk, path=e.path,
                                hint=e.hint or "state kept in the journal; run `virtfreeze thaw` again") from None
        raise

    failpoint("thaw-before-cleanup")
    _remove_overlays(disks, ref)
    shutil.rmtree(rt.memory_dir(ref.uuid), ignore_errors=True)
    rt.journal.remove(ref.uuid)
    seconds = time.monotonic() - t0
    used = result.strategy if result else None
    log.info("domain %r: thawed (%s, %d overlay bytes, %.2fs)", ref.name, used or "nothing to merge",
             overlay_bytes, seconds)
    rt.pm.hook.virtfreeze_after_thaw(domain=ref, strategy=used, overlay_bytes=overlay_bytes)
    return ThawResult(ref.name, ref.uuid, used, overlay_bytes, seconds,
                      result.offline_bytes if result else 0, result.rounds if result else 0,
                      result.stopped_seconds if result else 0.0)


def thaw_domain(rt: Runtime, ref: DomainRef, strategy: str | None = None) -> ThawResult:
    try:
        with domain_lock(ref.uuid, ref.name):
            return thaw_locked(rt, ref, strategy)
    except VirtfreezeError as e:
        report_failure(rt.pm, ref, "thaw", e)
        raise
