"""Which segments of a disk changed since the last run, and the stamps the segment view shows for them.

Issue 13, second step (pure logic; nothing in freeze uses it yet). A stamp
names one content of one segment: borg and restic re-read a segment exactly
when its stamp (mtime/ctime in `segment_view`) moved. So:

- a segment in the change set, or every segment when the previous state
  cannot be trusted, gets this run's stamp; the others keep theirs;
- this run's stamp is newer than every earlier one (never reused for other
  content) and older than the run's freeze (borg keeps a files-cache entry
  only when it is older than the newest file it read: the manifest);
- whenever the previous state cannot be trusted, the answer is a full read,
  with the reason, never a wrong archive.

The change set comes from a dirty bitmap (qcow2) or from per-segment
hashes of the frozen base (raw files, block devices): `changed_by_hash`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from virtfreeze.direct_read import DirectReader

MARGIN_NS = 10**9  # a stamp is at least this much older than the freeze (coarse file system clocks)


@dataclass(frozen=True)
class Identity:
    """What says the base image is still the one the last run saw."""

    path: str
    device: int
    inode: int
    size: int
    format: str

    @classmethod
    def of(cls, path: str, fmt: str, size: int | None = None) -> "Identity":
        """`size`: the guest-visible bytes (a qcow2's), None: the bytes in the file or device."""
        st = os.stat(path)
        if size is None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
        return cls(os.path.realpath(path), st.st_dev, st.st_ino, size, fmt)


@dataclass
class SegmentState:
    """One disk's segments as the last run left them (kept in the state directory)."""

    segment_size: int
    identity: Identity
    stamps: list[int]
    hashes: list[str] = field(default_factory=list)  # per segment, when the change set comes from hashes
    qemu: str | None = None  # which QEMU process and block node wrote the disk; None: not running

    def to_json(self) -> dict:
        return {"segment_size": self.segment_size, "identity": self.identity.__dict__, "stamps": self.stamps,
                "hashes": self.hashes, "qemu": self.qemu}

    @classmethod
    def from_json(cls, data: dict) -> "SegmentState":
        return cls(data["segment_size"], Identity(**data["identity"]), list(data["stamps"]),
                   list(data.get("hashes") or []), data.get("qemu"))


def segment_count(size: int, segment_size: int) -> int:
    return (size + segment_size - 1) // segment_size


def distrust(previous: SegmentState | None, segment_size: int, identity: Identity,
             qemu: str | None, *, has_change_set: bool) -> str | None:
    """Why the previous state cannot tell what changed (a full read is due), or None when it can."""
    if previous is None:
        return "first run (no earlier state)"
    if previous.segment_size != segment_size:
        return f"segment size changed ({previous.segment_size} -> {segment_size})"
    if previous.identity != identity:
        return "the base image is not the one the last run saw (path, device, inode, size or format changed)"
    if len(previous.stamps) != segment_count(identity.size, segment_size):
        return "the earlier state does not fit the disk"
    if qemu is None or previous.qemu != qemu:  # a bitmap only knows what one running QEMU wrote
        return "the guest's QEMU process is not the one the last run saw (restarted, crashed or shut off)"
    if not has_change_set:
        return "no dirty bitmap from the last run (none made, or bitmap lost)"
    return None


def next_stamps(previous: SegmentState | None, changed: set[int] | None, count: int, freeze_ns: int) -> list[int]:
    """The stamps of this run: `changed` None (untrusted) restamps every segment."""
    newest = max(previous.stamps, default=0) if previous else 0
    stamp = max(newest + 1, freeze_ns - MARGIN_NS)  # never an earlier one, even if the clock went back: then
    # it is not older than the freeze, and borg does not cache it (one more read next time), never a wrong one
    if previous is None or changed is None or len(previous.stamps) != count:
        return [stamp] * count
    if any(i < 0 or i >= count for i in changed):
        raise ValueError("a changed segment outside the disk")
    return [stamp if i in changed else previous.stamps[i] for i in range(count)]


def changed_by_hash(source: str, segment_size: int, previous: list[str]) -> tuple[set[int], list[str]]:
    """(segments whose SHA-256 differs from `previous`, the new hashes) of a frozen raw image or device."""
    reader = segment_reader(source)
    try:
        count = segment_count(reader.size, segment_size)
        hashes = [_segment_hash(reader, segment_size, i) for i in range(count)]
    finally:
        reader.close()
    changed = {i for i, h in enumerate(hashes) if i >= len(previous) or previous[i] != h}
    return changed, hashes


def rehash(source: str, segment_size: int, previous: list[str], changed: set[int]) -> list[str]:
    """`previous` with the hashes of the `changed` segments read again (the others are known unchanged),
    so that a later run that must compare hashes re-reads only what really changed."""
    reader = segment_reader(source)
    try:
        count = segment_count(reader.size, segment_size)
        old = previous if len(previous) == count else [""] * count
        return [_segment_hash(reader, segment_size, i) if i in changed or not old[i] else old[i]
                for i in range(count)]
    finally:
        reader.close()


def segment_reader(source: str) -> DirectReader:
    """The source read as the segment view reads it: O_DIRECT, except a guest view (a FUSE mount that
    reads its base with O_DIRECT itself), read through its page cache and raised read-ahead."""
    return DirectReader(source, direct=not os.path.ismount(source))


def _segment_hash(reader: DirectReader, segment_size: int, i: int) -> str:
    digest, pos, end = hashlib.sha256(), i * segment_size, (i + 1) * segment_size
    while pos < end:
        block = reader.pread(min(end - pos, 4 << 20), pos)
        if not block:  # the end of the source: the last segment is shorter
            break
        digest.update(block)
        pos += len(block)
    return digest.hexdigest()

