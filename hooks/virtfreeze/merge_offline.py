"""Built-in merge plugin: `qemu-img commit` with the guest stopped.

- A domain shut down, destroyed or undefined since the freeze: each overlay
  is committed into its recorded base (any strategy; registered `trylast`).
- `offline` for a running or paused guest: libvirt's managed save stops it
  and keeps its state on disk, the overlays are committed, the saved state's
  XML and the persistent definition are pointed at the bases, and the guest
  is started again from its saved state, running or paused as it was.

A crash at any point leaves the guest shut off with its managed save image;
the next thaw finishes the commit, fixes the saved XML and brings it back.
"""

from __future__ import annotations

import logging
import os
import time

from virtfreeze import qemu_img
from virtfreeze.domain_xml import BaseImage, parse_disks, repoint_disks
from virtfreeze.errors import VirtfreezeError
from virtfreeze.hookspecs import hookimpl
from virtfreeze.journal import failpoint
from virtfreeze.libvirt_boundary import MISSING, PAUSED, RUNNING, SHUTOFF
from virtfreeze.model import MergeResult

log = logging.getLogger(__name__)


def _top_of(disk, sources: list[str | None]) -> str | None:
    """The top overlay of a disk's chain: what a definition points at, else the newest round on disk."""
    for src in sources:
        if disk.is_ours(src) and os.path.exists(src):
            return src
    on_disk = disk.overlays_on_disk()
    return on_disk[-1] if on_disk else None


def commit_stopped(hv, domain, disks, journal) -> int:
    """Commit every disk of a stopped (or vanished) domain; fix its saved state's XML. Returns bytes."""
    state = hv.state(domain.uuid)
    xmls = []
    saved = state == SHUTOFF and hv.has_managed_save(domain.uuid, domain.name)
    if state != MISSING:
        xmls.append(hv.xml(domain.uuid, domain.name, inactive=True))
        if saved:
            xmls.append(hv.managed_save_xml(domain.uuid, domain.name))
    sources = [{d.target: d.source for d in parse_disks(x)} for x in xmls]
    merged = 0
    for disk in disks:
        top = _top_of(disk, [s.get(disk.target) for s in sources])
        if top is None:
            continue
        if sources and not any(disk.is_ours(s.get(disk.target)) for s in sources):
            continue  # committed and re-pointed by an earlier run; the overlays are spent
        merged += os.stat(top).st_blocks * 512
        log.info("domain %r disk %s: offline commit of %s into %s", domain.name, disk.target, top, disk.base)
        qemu_img.commit(top, disk.base, domain=domain.name, disk=disk.target)
        failpoint("thaw-offline-committed")
    if saved:
        xml, changed = _repointed(hv.managed_save_xml(domain.uuid, domain.name), disks)
        if changed:
            hv.managed_save_define(domain.uuid, domain.name, xml)
            log.info("domain %r: saved state now points at the base of %s", domain.name, ", ".join(changed))
    return merged


def _repointed(xml: str, disks) -> tuple[str, list[str]]:
    """`xml` with every disk that is on one of our overlays pointed back at its base."""
    current = {d.target: d.source for d in parse_disks(xml)}
    bases = {d.target: BaseImage(d.base, d.base_format, d.base_type) for d in disks}
    return repoint_disks(xml, bases, only_if_source={
        d.target: current.get(d.target) for d in disks if d.is_ours(current.get(d.target))})


def repoint_persistent(hv, domain, disks) -> None:
    """Point the persistent definition back at the bases (a no-op when it already is)."""
    xml, changed = _repointed(hv.xml(domain.uuid, domain.name, inactive=True), disks)
    if changed:
        log.info("domain %r: persistent definition of %s pointed back at the base", domain.name, ", ".join(changed))
        hv.define(xml, domain.name)


def save_commit_restore(hv, domain, disks, journal) -> tuple[int, float]:
    """Stop a running or paused guest into its managed save, merge, and bring it back as it was."""
    info = hv.info(domain.uuid)
    if info is None or not info.persistent:
        raise VirtfreezeError("the offline merge of a running guest needs a persistent domain (managed save)",
                              domain=domain.name, hint="use --strategy live, or define the domain")
    paused = info.state == PAUSED
    journal.note(saved_by_virtfreeze="paused" if paused else "running")
    t0 = time.monotonic()
    log.info("domain %r: saving its state to merge offline", domain.name)
    hv.managed_save(domain.uuid, domain.name, paused)
    failpoint("offline-saved")
    merged = commit_stopped(hv, domain, disks, journal)
    repoint_persistent(hv, domain, disks)
    failpoint("offline-before-restore")
    resume_saved(hv, domain, journal)
    stopped = time.monotonic() - t0
    log.info("domain %r: merged %d bytes offline; the guest was stopped %.2fs", domain.name, merged, stopped)
    return merged, stopped


def resume_saved(hv, domain, journal) -> None:
    """Start a guest virtfreeze saved, from its saved state (a no-op otherwise)."""
    if journal.get("saved_by_virtfreeze") and hv.state(domain.uuid) == SHUTOFF:
        log.info("domain %r: restoring it from its saved state (%s)", domain.name,
                 journal.get("saved_by_virtfreeze"))
        hv.start(domain.uuid, domain.name)
    journal.note(saved_by_virtfreeze=None)


@hookimpl(trylast=True)
def virtfreeze_merge(hv, domain, disks, config, strategy, journal):
    state = hv.state(domain.uuid)
    if state in (SHUTOFF, MISSING):
        merged = commit_stopped(hv, domain, disks, journal)
        if state == SHUTOFF:
            repoint_persistent(hv, domain, disks)
        return MergeResult("offline", offline_bytes=merged)
    if strategy != "offline" or state not in (RUNNING, PAUSED):
        return None
    merged, stopped = save_commit_restore(hv, domain, disks, journal)
    return MergeResult("offline", offline_bytes=merged, stopped_seconds=stopped)
