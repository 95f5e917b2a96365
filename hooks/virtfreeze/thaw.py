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
from virtfreeze.domain_xml import BaseImage, is_overlay, parse_disks, repoint_disks
from virtfreeze.errors import DomainNotFound, LeftOnOverlay, VirtfreezeError
from virtfreeze.journal import domain_lock, failpoint
from virtfreeze.libvirt_boundary import MISSING, OTHER, SHUTOFF
from virtfreeze.model import DiskPlan, DomainRef
from virtfreeze.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class ThawResult:
    name: str
    uuid: str
    strategy: str | None  # None: nothing was left to merge
    overlay_bytes: int
    seconds: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


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
    return {"uuid": uuid, "name": name, "phase": "discovered", "disks": [p.to_json() for p in disks.values()]}


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
    out = []
    if info.state != SHUTOFF:
        out.append({d.target: d.source for d in parse_disks(rt.hv.xml(ref.uuid, ref.name))})
    if info.persistent:
        out.append({d.target: d.source for d in parse_disks(rt.hv.xml(ref.uuid, ref.name, inactive=True))})
    return out


def on_overlay(rt: Runtime, ref: DomainRef, disks: list[DiskPlan]) -> list[DiskPlan]:
    """The disks some definition still points at their overlay (or, domain gone, whose overlay exists)."""
    defs = _sources(rt, ref)
    if not defs:
        return [d for d in disks if os.path.exists(d.overlay)]
    return [d for d in disks if any(src.get(d.target) == d.overlay for src in defs)]


def _repoint_persistent(rt: Runtime, ref: DomainRef, disks: list[DiskPlan]) -> None:
    info = rt.hv.info(ref.uuid)
    if info is None or not info.persistent:
        return
    xml = rt.hv.xml(ref.uuid, ref.name, inactive=True)
    bases = {d.target: BaseImage(d.base, d.base_format, d.base_type) for d in disks}
    new_xml, changed = repoint_disks(xml, bases, only_if_source={d.target: d.overlay for d in disks})
    if changed:
        log.info("domain %r: persistent definition of %s pointed back at the base", ref.name, ", ".join(changed))
        rt.hv.define(new_xml, ref.name)


def _remove_overlays(disks: list[DiskPlan], ref: DomainRef) -> None:
    for d in disks:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(d.overlay)
            log.info("domain %r disk %s: removed overlay %s", ref.name, d.target, d.overlay)


def thaw_locked(rt: Runtime, ref: DomainRef) -> ThawResult:
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
    rt.journal.write(dict(record, phase="thawing"))
    overlay_bytes = sum(os.stat(d.overlay).st_size for d in disks if os.path.exists(d.overlay))

    strategy = None
    try:
        for _ in range(3):  # a domain may change state under us (shut down mid-commit)
            pending = on_overlay(rt, ref, disks)
            if not pending:
                break
            if rt.hv.state(ref.uuid) == OTHER:
                raise VirtfreezeError("domain is crashed or suspended; cannot merge it now", domain=ref.name,
                                      hint="start or destroy it, then run `virtfreeze thaw` again")
            try:
                strategy = rt.pm.hook.virtfreeze_merge(hv=rt.hv, domain=ref, disks=pending, config=rt.config)
            except VirtfreezeError as e:
                if rt.hv.state(ref.uuid) in (SHUTOFF, MISSING):
                    log.warning("%s; the domain stopped meanwhile, merging offline", e)
                    continue
                raise
            if strategy is None:
                raise VirtfreezeError(f"no merge plugin handles a domain in state {rt.hv.state(ref.uuid)}",
                                      domain=ref.name)
            failpoint("thaw-after-merge")
            _repoint_persistent(rt, ref, disks)
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
    export_dir = record.get("export_dir")
    if export_dir:
        export_view.remove(Path(export_dir))
    shutil.rmtree(rt.memory_dir(ref.uuid), ignore_errors=True)
    rt.journal.remove(ref.uuid)
    seconds = time.monotonic() - t0
    log.info("domain %r: thawed (%s, %d overlay bytes, %.2fs)", ref.name, strategy or "nothing to merge",
             overlay_bytes, seconds)
    rt.pm.hook.virtfreeze_after_thaw(domain=ref, strategy=strategy, overlay_bytes=overlay_bytes)
    return ThawResult(ref.name, ref.uuid, strategy, overlay_bytes, seconds)


def thaw_domain(rt: Runtime, ref: DomainRef) -> ThawResult:
    with domain_lock(ref.uuid, ref.name):
        return thaw_locked(rt, ref)
