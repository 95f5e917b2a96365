"""The segmented layout (``export_layout: segmented``): what changed since the last run, per segment.

A segmented disk appears in the export view as ``disks/<target>.segments/``,
fixed-size files of the guest-visible bytes (`segment_view`). borg and
restic re-read a segment exactly when its stamp moved, so each run decides,
while the domain is frozen, which segments changed since the last one:

- a qcow2 disk of a running domain: from the dirty bitmap of the libvirt
  checkpoint the last run made just before its snapshot (`dirty_bitmap`),
  when the same QEMU process has run the guest since (nothing else could
  have written the image) and the bitmap is there and consistent;
- otherwise (raw files, block devices, a shut-off domain, the first run, a
  restarted guest, a lost bitmap): by comparing each segment's SHA-256 with
  the last run's. That reads the whole disk here, but the backup tool still
  reads only what changed; the reason is logged.

The state between runs is ``<state_directory>/segments/<uuid>/state.json``;
the stamps the view shows and the bytes it served (``<target>.read.json``,
written when the view stops) are beside it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from virtfreeze import dirty_bitmap, guest_view
from virtfreeze.domain_xml import parse_disks
from virtfreeze.errors import VirtfreezeError
from virtfreeze.export_view import image_size
from virtfreeze.journal import write_atomic
from virtfreeze.libvirt_boundary import PAUSED, RUNNING, DomainInfo
from virtfreeze.logs import domain_log
from virtfreeze.model import DiskPlan
from virtfreeze.segment_stamps import (
    Identity, SegmentState, changed_by_hash, distrust, next_stamps, rehash, segment_count,
)

log = logging.getLogger(__name__)

QEMU_PID_DIR = Path("/run/libvirt/qemu")


@dataclass(frozen=True)
class SegmentedDisk:
    """One disk as this run exports it in segments."""

    target: str
    source: str  # what the segment view reads: the raw base, or a qcow2 base's guest view
    size: int  # guest-visible bytes
    segment_size: int
    stamps_file: Path
    counters_file: Path
    changed: int  # segments this run's archive reads
    change_source: str  # "dirty bitmap" or "hashes"
    why_full: str | None  # why the dirty bitmap could not be used (None: it was, or the disk has none)

    def manifest_entry(self, base_entry: dict) -> dict:
        count = segment_count(self.size, self.segment_size)
        return dict(base_entry, layout="segmented", file=f"disks/{self.target}.segments", backing=[],
                    segments={"segment_size": self.segment_size, "count": count, "size": self.size},
                    changes={"segments": self.changed, "source": self.change_source, "why_full": self.why_full})


def state_directory(state_dir: Path, uuid: str) -> Path:
    return state_dir / "segments" / uuid


def qemu_identity(name: str) -> str | None:
    """Which QEMU process runs domain `name` (boot, pid, start time), None when it cannot be told."""
    try:
        pid = int((QEMU_PID_DIR / f"{name}.pid").read_text().strip())
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        with open(f"/proc/{pid}/stat") as fh:
            started = fh.read().rsplit(")", 1)[1].split()[19]  # field 22, after the command name
    except (OSError, ValueError, IndexError):
        return None
    return f"{boot}:{pid}:{started}"


def forget(hv, state_dir: Path, info: DomainInfo) -> None:
    """The domain left the segmented layout: delete its checkpoints and state (a checkpoint costs its
    bitmap's upkeep on every write, and keeps e.g. `virsh undefine` from working without
    --checkpoints-metadata). libvirt deletes a checkpoint's bitmaps only from a running domain: a shut-off
    one keeps its state until a run finds it running."""
    if info.state not in (RUNNING, PAUSED):
        return
    try:
        for name in hv.checkpoint_names(info.uuid, info.name):
            if name.startswith(dirty_bitmap.CHECKPOINT_PREFIX):
                hv.delete_checkpoint(info.uuid, info.name, name)
    except VirtfreezeError as e:
        domain_log(log, info.name).warning("not in the segmented layout any more, but its checkpoints stay (%s); "
                                           "the next run tries again", e.message)
        return
    shutil.rmtree(state_directory(state_dir, info.uuid), ignore_errors=True)
    domain_log(log, info.name).info("not in the segmented layout any more: its checkpoints and state are removed")


class Tracker:
    """One domain's change tracking in one freeze: `before_snapshot`, then `after_snapshot`."""

    def __init__(self, state_dir: Path, info: DomainInfo, segment_size: int):
        self.info = info
        self.dir = state_directory(state_dir, info.uuid)
        self.views = guest_view.directory(state_dir, info.uuid)
        self.segment_size = segment_size
        self.log = domain_log(log, info.name)
        try:
            data = json.loads((self.dir / "state.json").read_text())
            self.previous_checkpoint = data.get("checkpoint")
            self.previous = {t: SegmentState.from_json(d) for t, d in (data.get("disks") or {}).items()}
        except FileNotFoundError:
            self.previous_checkpoint, self.previous = None, {}
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log.warning("unreadable segment state %s (%s); every disk is compared in full",
                             self.dir / "state.json", e)
            self.previous_checkpoint, self.previous = None, {}
        self.qemu: dict[str, str] = {}  # target -> the QEMU process and block node writing it (running only)
        self.checkpoint: str | None = None

    def before_snapshot(self, hv, state: str, plan: list[DiskPlan], live_xml: str) -> None:
        """While the guest still writes its bases: drop older checkpoints of ours, make this run's.

        A problem here only costs the next run its bitmap (it compares hashes): it is logged, never fatal."""
        process = qemu_identity(self.info.name) if state in (RUNNING, PAUSED) else None
        if process is None:
            return
        nodes = {d.target: d.index for d in parse_disks(live_xml)}
        # A disk unplugged and plugged in again (edited meanwhile?) is a new block node: not the same writer.
        self.qemu = {p.target: f"{process}/{nodes.get(p.target)}" for p in plan}
        tracked = [p.target for p in plan if p.base_format == "qcow2" and self._can_hold_bitmaps(p)]
        if not tracked:
            return
        untracked = [t for t in nodes if t and t not in tracked]
        name = f"{dirty_bitmap.CHECKPOINT_PREFIX}{time.time_ns()}"
        try:
            for old in hv.checkpoint_names(self.info.uuid, self.info.name):
                if old.startswith(dirty_bitmap.CHECKPOINT_PREFIX) and old != self.previous_checkpoint:
                    hv.delete_checkpoint(self.info.uuid, self.info.name, old)
            hv.create_checkpoint(self.info.uuid, self.info.name, dirty_bitmap.checkpoint_xml(name, tracked, untracked))
            self.checkpoint = name
        except VirtfreezeError as e:
            self.log.warning("no dirty bitmap for the next run (%s); it compares hashes instead", e.message)

    def _can_hold_bitmaps(self, p: DiskPlan) -> bool:
        """Not a qcow2 of compat 0.10: its checkpoint would fail for every disk of the domain."""
        try:
            if dirty_bitmap.holds_bitmaps(p.base, self.info.name, p.target):
                return True
        except VirtfreezeError:
            return False
        self.log.info("disk %s: qcow2 compat 0.10 holds no dirty bitmap; its segments are compared by hash", p.target)
        return False

    def after_snapshot(self, plan: list[DiskPlan]) -> dict[str, SegmentedDisk]:
        """While frozen: each disk's source, change set and stamps; the state for the next run.

        Any failure is a VirtfreezeError, on which the caller rolls the freeze back."""
        target = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            freeze_ns = time.time_ns()
            disks, states = {}, {}
            for p in plan:
                target = p.target
                disks[p.target], states[p.target] = self._disk(p, freeze_ns)
            target = None
            state = {"checkpoint": self.checkpoint, "disks": {t: s.to_json() for t, s in states.items()}}
            write_atomic(self.dir / "state.json", json.dumps(state).encode())
            return disks
        except (OSError, ValueError) as e:
            raise VirtfreezeError(f"cannot tell which segments changed: {e}", domain=self.info.name, disk=target,
                                  path=str(self.dir)) from None

    def _disk(self, p: DiskPlan, freeze_ns: int) -> tuple[SegmentedDisk, SegmentState]:
        seg = self.segment_size
        if p.base_format == "raw":
            source = p.base
        else:
            source = str(guest_view.start(p.base, p.base_format, self.views / f"{p.target}.raw",
                                          block=p.base_type == "block", domain=self.info.name, disk=p.target))
        size = image_size(source)
        count = segment_count(size, seg)
        identity = Identity.of(p.base, p.base_format, size)
        prev = self.previous.get(p.target)
        fits = prev is not None and prev.segment_size == seg and len(prev.stamps) == count

        why_full = None
        if p.base_format == "qcow2":
            why_full = distrust(prev, seg, identity, self.qemu.get(p.target),
                                has_change_set=self.previous_checkpoint is not None)
            if why_full is None:
                why_full = dirty_bitmap.bitmap_problem(p.base, self.previous_checkpoint, self.info.name, p.target)
        if p.base_format == "qcow2" and why_full is None:
            changed = dirty_bitmap.segments_of(
                dirty_bitmap.dirty_ranges(p.base, self.previous_checkpoint, self.info.name, p.target,
                                          block=p.base_type == "block"), seg)
            hashes = rehash(source, seg, prev.hashes, changed)  # for a run that must compare hashes
            how = "dirty bitmap"
        else:
            if why_full is not None:
                (self.log.info if why_full.startswith("first run") else self.log.warning)(
                    "disk %s: %s; comparing the hash of every segment (a full read here)", p.target, why_full)
            changed, hashes = changed_by_hash(source, seg, prev.hashes if fits else [])
            how = "hashes"
        stamps = next_stamps(prev if fits else None, changed, count, freeze_ns)
        stamps_file = self.dir / f"{p.target}.stamps.json"
        write_atomic(stamps_file, json.dumps({"segment_size": seg, "stamps": stamps}).encode())
        self.log.info("disk %s: %d of %d segments changed (%s)", p.target, len(changed), count, how)
        disk = SegmentedDisk(p.target, source, size, seg, stamps_file, self.dir / f"{p.target}.read.json",
                             len(changed), how, why_full)
        return disk, SegmentState(seg, identity, stamps, hashes, self.qemu.get(p.target))
