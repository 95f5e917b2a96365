"""Driver mode: per domain, freeze -> archive to each target -> thaw.

Each overlay lives only as long as its own domain's archive. An archive
failure still thaws the domain; it only makes the result (and exit code) a
failure.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path

from virtfreeze import priority, runner
from virtfreeze.errors import VirtfreezeError
from virtfreeze.freeze import freeze_domain
from virtfreeze.libvirt_boundary import DomainInfo
from virtfreeze.model import DomainRef
from virtfreeze.plugins import report_done, report_failure
from virtfreeze.progress import ByteProgress, human_bytes, rate
from virtfreeze.runtime import Runtime
from virtfreeze.targets import ArchiveResult, StorageTarget, describe_shortfall, progress_to, short_of_data
from virtfreeze.thaw import thaw_domain
from virtfreeze.logs import domain_log

log = logging.getLogger(__name__)


@dataclass
class BackupResult:
    name: str
    uuid: str
    consistency: str
    archives: list[ArchiveResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    freeze_seconds: float = 0.0
    snapshot_seconds: float = 0.0
    thaw_seconds: float = 0.0
    overlay_bytes: int = 0
    strategy: str | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict:
        d = dict(self.__dict__, archives=[a.to_json() for a in self.archives], ok=self.ok)
        return d


def _check_contents(ref: DomainRef, target: StorageTarget, archive: str, manifest: dict) -> bool:
    """Compare the target's own listing of a new archive with the frozen files' sizes.

    Raises when a data file is missing or short: an archive without a disk's
    data is a failure, never a success. False when the target cannot list.
    """
    contents = target.contents(archive)
    if contents is None:
        domain_log(log, ref.name).warning("target %s (type %s) cannot list an archive's contents; %s not verified",
                                          target.name, target.type, archive)
        return False
    short = short_of_data(manifest.get("sizes", {}), contents)
    if short:
        disks = {d["file"]: t for t, d in manifest.get("disks", {}).items()}  # a segmented disk's: its directory
        lacking = {disks.get(p) or disks.get(posixpath.dirname(p)) for p, _w, _g in short}
        raise VirtfreezeError(f"archive {archive} in target {target.name} lacks data: "
                              + "; ".join(describe_shortfall(*s) for s in short), domain=ref.name,
                              disk=",".join(sorted(lacking - {None})) or None,
                              hint="the archive is incomplete; check the target plugin and the tool's log")
    return True


def _guest_images(rt: Runtime, uuid: str) -> list[str]:
    """The files the frozen guest writes into and goes back to (whose disks the archive's priority spares)."""
    record = rt.journal.load(uuid)
    return record.images() if record else []


def backup_domain(rt: Runtime, info: DomainInfo, targets: list[StorageTarget], *, memory: bool | None = None,
                  quiesce: str | None = None, strategy: str | None = None) -> BackupResult:
    """Freeze, archive to each target, thaw; memory/quiesce/strategy None: not given on the command line."""
    ref = DomainRef(info.name, info.uuid)
    archive_priority = priority.Priority.from_config(rt.config.archive_priority)
    frozen = freeze_domain(rt, info, memory=memory, quiesce=quiesce)
    result = BackupResult(info.name, info.uuid, frozen.consistency, freeze_seconds=frozen.seconds,
                          snapshot_seconds=frozen.snapshot_seconds)
    try:
        images = (_guest_images(rt, info.uuid)
                  if archive_priority.write_bps or archive_priority.writeback_interval else [])
        export_dir = Path(frozen.export_dir)
        manifest = json.loads((export_dir / "manifest.json").read_text())
        for target in targets:
            try:
                rt.progress.update(info.name, f"archiving to {target.name}")
                why = "the domain paused on an I/O error (is its overlay's filesystem full?)"
                with runner.cancel_scope() as scope, rt.hv.on_io_error(info.uuid, lambda: scope.cancel(why)):
                    info_now = rt.hv.info(info.uuid)
                    if info_now is not None and info_now.io_error:  # before we listened
                        scope.cancel(why)
                    shown = (ByteProgress(rt.progress, info.name, f"archiving to {target.name}")
                             if rt.progress.live else None)  # a terminal: show the bytes the plugin reports
                    behind_the_guests = priority.archiving(archive_priority, images, info.name)
                    with behind_the_guests, progress_to(shown):
                        archived = target.archive(ref, export_dir, manifest)
                    scope.check(f"archive to {target.name}")
                result.archives.append(archived)
                archived.verified = _check_contents(ref, target, archived.archive, manifest)
                domain_log(log, info.name).info("archived to %s as %s (%s, %.1f s, %s)", target.name, archived.archive,
                                                human_bytes(archived.bytes), archived.seconds,
                                                rate(archived.bytes, archived.seconds))
            except Exception as e:  # noqa: BLE001 - a plugin's bug must not skip the other targets or the thaw
                if not isinstance(e, VirtfreezeError):
                    domain_log(log, info.name).debug("target %s raised", target.name, exc_info=True)
                    e = VirtfreezeError(f"target plugin for {target.type!r} raised {type(e).__name__}: {e}",
                                        domain=info.name)
                domain_log(log, info.name).error("archive to %s failed: %s", target.name, e)
                result.errors.append(f"{target.name}: {e}")
                report_failure(rt.pm, ref, "archive", e)
    finally:
        t0 = time.monotonic()
        thawed = thaw_domain(rt, ref, strategy)  # whatever happened above
        result.thaw_seconds = time.monotonic() - t0
        result.overlay_bytes = thawed.overlay_bytes
        result.strategy = thawed.strategy
    report_done(rt.pm, ref, "backup", result, rt.command)
    return result
