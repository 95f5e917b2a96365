"""The freeze path: one atomic external snapshot per domain, then the export view.

Per domain, under its lock: merge leftovers of an earlier run, capture the
inactive definition, plan the overlays, journal, snapshot (quiesced when it
can be, with memory when asked), journal again, expose. A failure after the
snapshot is rolled back through the thaw path, so nothing is left half-frozen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from virtfreeze import (
    __version__, downtime, export_view, holders, memory_freeze, qemu_img, save_image, segmented_export,
)
from virtfreeze.domain_xml import (
    has_agent_channel, has_swtpm, ineligible_reason, is_overlay, nvram_path, overlay_path, parse_disks, snapshot_xml,
)
from virtfreeze.errors import DomainBusy, LeftOnOverlay, UsageError, VirtfreezeError
from virtfreeze.journal import FrozenDomain, domain_lock, failpoint
from virtfreeze.libvirt_boundary import PAUSED, RUNNING, SHUTOFF, DomainInfo, is_quiesce_unavailable
from virtfreeze.model import DiskPlan, DomainRef
from virtfreeze.plugins import report_done, report_failure
from virtfreeze.runtime import Runtime
from virtfreeze.merge_api import read_definitions
from virtfreeze.thaw import adopt, other_config, thaw_locked
from virtfreeze.logs import domain_log

log = logging.getLogger(__name__)

SWTPM_DIR = Path("/var/lib/libvirt/swtpm")


@dataclass
class FreezeResult:
    name: str
    uuid: str
    state: str
    consistency: str  # quiesced, crash, memory or shutoff
    disks: dict[str, str]  # target -> frozen base image
    skipped: dict[str, str] = field(default_factory=dict)  # target -> reason
    export_dir: str | None = None
    memory_file: str | None = None
    snapshot_seconds: float = 0.0
    seconds: float = 0.0
    shared_with: list[str] = field(default_factory=list)  # other runs holding this same freeze (joined)
    downtime_seconds: float = 0.0  # the guest was not running this long during the freeze (lifecycle events)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _plan(rt: Runtime, info: DomainInfo, live_xml: str) -> tuple[list, list[DiskPlan], dict[str, str]]:
    settings = rt.config.for_domain(info.name)
    disks = parse_disks(live_xml)
    plan, skipped = [], {}
    for d in disks:
        reason = ineligible_reason(d, set(settings.exclude_disks))
        if reason:
            skipped[d.target] = reason
            domain_log(log, info.name, d.target).info("left out (%s)", reason)
            continue
        overlay = overlay_path(d, info.uuid, rt.config.overlay_directory, rt.state_dir)
        chain = tuple(qemu_img.backing_chain(d.source, info.name, d.target))
        plan.append(DiskPlan(d.target, d.source, d.format or "raw", d.type, str(overlay), chain))
    return disks, plan, skipped


def _check_overlay_dirs(info: DomainInfo, plan: list[DiskPlan], rt: Runtime) -> None:
    for p in plan:
        parent = Path(p.overlay).parent
        if parent == rt.state_dir / "overlays":
            parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not parent.is_dir():
            raise UsageError("overlay directory does not exist", domain=info.name, disk=p.target,
                             path=str(parent), hint="create it or fix overlay_directory in the config")
        if not os.access(parent, os.W_OK):
            raise UsageError("overlay directory is not writable", domain=info.name, disk=p.target,
                             path=str(parent), hint="fix its permissions or choose another overlay_directory")
        fs = os.statvfs(parent)
        free, reserve = fs.f_bavail * fs.f_frsize, rt.config.overlay_min_free
        if free < reserve:
            raise VirtfreezeError(f"only {free >> 20} MiB free for the overlay, below the reserve of {reserve >> 20} "
                                  "MiB (overlay_min_free)", domain=info.name, disk=p.target, path=str(parent),
                                  hint="free space there, or set overlay_directory or overlay_min_free")
        if os.path.exists(p.overlay):
            # Leftovers were merged above, so nothing points at this file any more.
            domain_log(log, info.name, p.target).warning("removing stale overlay %s", p.overlay)
            os.unlink(p.overlay)


def _snapshot(rt: Runtime, info: DomainInfo, state: str, disks, plan, live_xml: str, memory_file: Path | None,
              quiesce: str) -> str:
    """Take the snapshot; return the consistency obtained."""
    overlays = {p.target: Path(p.overlay) for p in plan}
    xml = snapshot_xml(disks, overlays, memory_file)
    if state == SHUTOFF:
        rt.hv.snapshot(info.uuid, info.name, xml, memory=False, quiesce=False)
        return "shutoff"
    if memory_file is not None:  # the guest pauses at its end: keep that short (memory_freeze.py)
        memory_freeze.create_overlays(plan, info.name)
        with memory_freeze.written_back(memory_file):
            rt.hv.snapshot(info.uuid, info.name, xml, memory=True, quiesce=False, reuse_overlays=True)
        return "memory"
    if quiesce == "off" or state != RUNNING:
        rt.hv.snapshot(info.uuid, info.name, xml, memory=False, quiesce=False)
        return "crash"
    if not has_agent_channel(live_xml):
        if quiesce == "require":
            raise UsageError("quiesce required, but the domain has no guest agent channel", domain=info.name,
                             hint="add an org.qemu.guest_agent.0 channel, or use --quiesce auto")
        domain_log(log, info.name).warning("no guest agent channel; the snapshot is crash-consistent")
        rt.hv.snapshot(info.uuid, info.name, xml, memory=False, quiesce=False)
        return "crash"
    rt.hv.set_agent_timeout(info.uuid, info.name, rt.config.quiesce_timeout)
    try:
        rt.hv.snapshot(info.uuid, info.name, xml, memory=False, quiesce=True)
        return "quiesced"
    except VirtfreezeError as e:
        if quiesce == "require" or not is_quiesce_unavailable(e):
            raise
        domain_log(log, info.name).warning("quiesce failed (%s); falling back to crash-consistent", e.message)
    rt.hv.snapshot(info.uuid, info.name, xml, memory=False, quiesce=False)
    return "crash"


def _discard_unused_overlays(plan: list[DiskPlan], keep: set[str]) -> None:
    """Remove the overlay files this freeze made; `keep`: files that were there before it (never ours)."""
    for p in plan:
        if p.overlay not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p.overlay)


def _look(rt: Runtime, info: DomainInfo) -> tuple[str, str, str]:
    """State, inactive definition (taken before any snapshot) and live definition, read once."""
    state = rt.hv.state(info.uuid)
    if state not in (RUNNING, PAUSED, SHUTOFF):
        return state, "", ""
    inactive_xml = rt.hv.xml(info.uuid, info.name, inactive=info.persistent)
    live_xml = inactive_xml if state == SHUTOFF and info.persistent else rt.hv.xml(
        info.uuid, info.name, inactive=(state == SHUTOFF))
    return state, inactive_xml, live_xml


def _join(rt: Runtime, record: FrozenDomain, me: holders.Holder, t0: float) -> FreezeResult | None:
    """Share a complete freeze that another live run holds: no second snapshot, the same export
    view; this run becomes a holder too, and the merge waits for the last one. None when there is
    nothing to join (no other live holder, or the freeze is incomplete: leftovers to merge)."""
    others = holders.live_others(record.holders, me)
    complete = record.phase == "frozen" and record.export_dir and (Path(record.export_dir) / "manifest.json").exists()
    if not others or not complete:
        return None
    if record.disks and not read_definitions(rt.hv, record.ref).on_overlay(record.disks):
        return None  # merged behind its back: what is left are leftovers
    if not any(h.same_run(me) for h in record.holders):
        rt.journal.note(record, holders=[*record.holders, me])
    domain_log(log, record.name).info("frozen already by %s; this run shares that freeze (%s)",
                                      "; ".join(h.describe() for h in others), record.frozen_at)
    return FreezeResult(record.name, record.uuid, record.state_at_freeze or "?", record.consistency or "none",
                        {d.target: d.base for d in record.disks}, record.skipped, record.export_dir,
                        record.memory_file, 0.0, time.monotonic() - t0,
                        shared_with=[h.describe() for h in others])


def freeze_locked(rt: Runtime, info: DomainInfo, *, memory: bool | None = None,
                  quiesce: str | None = None) -> FreezeResult:
    """Freeze one domain (the caller holds its lock); `memory`/`quiesce` None: not given on the command line."""
    t0 = time.monotonic()
    ref = DomainRef(info.name, info.uuid)
    me = holders.current()
    rt.progress.update(info.name, "freezing")
    previous = rt.journal.load(info.uuid)
    joined = _join(rt, previous, me, t0) if previous else None
    if joined:
        return joined
    state, inactive_xml, live_xml = _look(rt, info)
    on_overlays = any(is_overlay(d.source) for x in (inactive_xml, live_xml) for d in parse_disks(x))
    if on_overlays and (other := other_config(rt, ref, me)):  # the newest freeze, in another config's journal
        state_dir, theirs, live = other
        if live:
            raise DomainBusy(f"frozen by a run of another configuration (state_directory {state_dir}) that still "
                             f"holds it: {'; '.join(h.describe() for h in live)}", domain=info.name,
                             hint="let that run thaw it, or run `virtfreeze thaw --force` with that configuration")
        previous = adopt(rt, state_dir, theirs, "no run of it holds it any more")
    if previous or on_overlays:
        domain_log(log, info.name).warning("leftovers of an earlier run; merging them first")
        thaw_locked(rt, ref, record=previous)
        state, inactive_xml, live_xml = _look(rt, info)

    if state not in (RUNNING, PAUSED, SHUTOFF):
        raise VirtfreezeError(f"domain is {state}; only running, paused or shut-off domains can be frozen",
                              domain=info.name)
    rt.pm.hook.virtfreeze_before_freeze(domain=ref, state=state, config=rt.config)
    wanted = rt.config.effective(info.name, memory=memory, quiesce=quiesce)
    memory, quiesce = wanted.memory and state != SHUTOFF, wanted.quiesce
    disks, plan, skipped = _plan(rt, info, live_xml)
    _check_overlay_dirs(info, plan, rt)
    memory_file = memory_freeze.image_file(rt.memory_base(), info.uuid, info.name) if memory else None
    tracker = None
    if rt.config.export_layout_of(info.name) == "segmented" and plan:
        tracker = segmented_export.Tracker(rt.state_dir, info, rt.config.segment_size)
        tracker.before_snapshot(rt.hv, state, plan, live_xml)  # this run's checkpoint, while on the bases
    elif segmented_export.state_directory(rt.state_dir, info.uuid).exists():
        segmented_export.forget(rt.hv, rt.state_dir, info)

    export_dir = rt.config.export_directory / export_view.domain_dir_name(info.name, info.uuid)
    record = FrozenDomain(info.uuid, info.name, "freezing", disks=plan, started=_now(), state_at_freeze=state,
                          persistent=info.persistent, skipped=skipped,
                          memory_file=str(memory_file) if memory_file else None, export_dir=str(export_dir),
                          holders=[me], command=rt.command)
    rt.journal.write(record)
    failpoint("freeze-before-snapshot")

    consistency = "none"
    t_snap = time.monotonic()
    if plan or memory_file:
        # Stale overlays were removed above; a file there now came meanwhile, not from us: never remove it.
        there_before = {p.overlay for p in plan if os.path.lexists(p.overlay)}
        try:
            consistency = _snapshot(rt, info, state, disks, plan, live_xml, memory_file, quiesce)
        except VirtfreezeError as e:
            if read_definitions(rt.hv, ref).on_overlay(plan):  # not with ATOMIC, but never delete data in use
                thaw_locked(rt, ref)
            else:  # no disk switched; libvirt may still have left overlay files behind
                _discard_unused_overlays(plan, there_before)
                if memory_file:
                    memory_freeze.remove_image(memory_file, info.uuid)
                rt.journal.remove(info.uuid)
            if memory_file and f"{memory_file}: No space left" in str(e) and not e.hint:
                e.hint = (f"its memory image needs up to the guest's memory size in {memory_file.parent.parent}; "
                          "free room there or set memory_directory elsewhere")
            raise
    else:
        domain_log(log, info.name).warning("no disk to snapshot; exporting its definition only")
    snapshot_seconds = time.monotonic() - t_snap
    failpoint("freeze-after-snapshot")

    try:
        if memory_file:
            os.chmod(memory_file, 0o600)
        rt.journal.note(record, phase="frozen", frozen_at=_now(), consistency=consistency)
        manifest = {
            "domain": info.name, "uuid": info.uuid, "frozen_at": record.frozen_at,
            "state_at_freeze": state, "consistency": consistency,
            "disks": {p.target: {"base": p.base, "format": p.base_format, "type": p.base_type,
                                 "file": f"disks/{p.target}.{p.base_format}",
                                 "backing": [{"path": f, "format": fmt, "file": export_view.backing_name(p.target, i, fmt)}
                                             for i, (f, fmt) in enumerate(p.backing, 1)]} for p in plan},
            "skipped_disks": skipped, "memory": bool(memory_file),
            # the program the host compressed the memory image with (qemu.conf snapshot_image_format), if any:
            # a restore checks it is installed before it extracts the archive
            "memory_compression": save_image.read(str(memory_file)).decompressor if memory_file else None,
            "virtfreeze": __version__,
        }
        tpm_dir = SWTPM_DIR / info.uuid if has_swtpm(inactive_xml) else None
        segmented = tracker.after_snapshot(plan) if tracker else None
        manifest = export_view.create(export_dir, inactive_xml=inactive_xml,
                                      disks={p.target: (p.base, p.base_format, p.backing) for p in plan},
                                      memory_file=memory_file, nvram=nvram_path(inactive_xml), tpm_dir=tpm_dir,
                                      manifest=manifest, segmented=segmented)
        failpoint("freeze-after-export")
        rt.pm.hook.virtfreeze_after_freeze(domain=ref, manifest=manifest)
    except VirtfreezeError as e:
        log.error("%s; rolling the freeze of domain %r back", e, info.name)
        try:
            thaw_locked(rt, ref)
        except VirtfreezeError as e2:
            raise LeftOnOverlay(f"freeze failed ({e.message}) and so did the rollback: {e2.message}",
                                domain=info.name, hint="run `virtfreeze thaw` once the cause is fixed") from None
        raise

    domain_log(log, info.name).info("frozen (%s) in %.2fs: %s", consistency, snapshot_seconds,
                                    ", ".join(f"{p.target}={p.base}" for p in plan) or "no disks")
    return FreezeResult(info.name, info.uuid, state, consistency, {p.target: p.base for p in plan}, skipped,
                        str(export_dir), str(memory_file) if memory_file else None, snapshot_seconds,
                        time.monotonic() - t0)


def freeze_domain(rt: Runtime, info: DomainInfo, *, memory: bool | None = None,
                  quiesce: str | None = None) -> FreezeResult:
    ref = DomainRef(info.name, info.uuid)
    try:
        with domain_lock(info.uuid, info.name, wait=rt.config.lock_wait), downtime.watched(rt.hv, info.uuid) as down:
            result = freeze_locked(rt, info, memory=memory, quiesce=quiesce)
    except VirtfreezeError as e:
        report_failure(rt.pm, ref, "freeze", e)
        raise
    finally:
        rt.progress.finish(info.name)
    result.downtime_seconds = down.seconds
    report_done(rt.pm, ref, "freeze", result, rt.command)
    return result
