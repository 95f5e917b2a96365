"""A disk shown as fixed-size segment files whose identity moves only when their data did.

This is the layout that lets borg's and restic's own file caches skip what
did not change (`export_layout: segmented`). At the
mountpoint, a directory, segment ``000000``, ``000001``, ... holds bytes
``[i * segment_size, (i + 1) * segment_size)`` of the source (a raw image
file or a block device; the last one may be shorter), read-only.

What the tools compare, and so what this view controls:

- borg's files cache keys on the absolute path, inode, size and ctime, and
  keeps an entry only when its ctime is older than the newest ctime it read
  in that run;
- restic compares path, size, mtime, ctime and inode with its parent
  snapshot.

So each segment has a fixed inode (``INO_BASE + i``, the same on every
mount; directory entries carry it too, since entries with inode 0 are
dropped), and mtime = ctime = its stamp from the stamps file. The caller
owns the stamps: a stamp names one content of one segment and is never
reused for another, and every stamp is older than a file the tool reads
after the segments in the same run (the export view's manifest.json).

Bytes served are counted and written to the counters file at unmount, for
tests and benchmarks: the proof that a run read only what changed.

Run as a small detached process per disk, like `device_view`:
``python -m virtfreeze.segment_view --source SRC --mountpoint DIR
--stamps FILE --counters FILE --ready-fd N``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
from pathlib import Path

from virtfreeze.segment_stamps import segment_count, segment_reader

MODULE = "virtfreeze.segment_view"
INO_BASE = 4096  # segment i is inode INO_BASE + i; the directory is inode 1
NAME_WIDTH = 6  # at least 000000 ... 999999; all of a disk's names are as wide: `cat *` restores in order


def segment_name(i: int, count: int) -> str:
    """Segment i's file name among `count`: zero-padded to one width for the whole disk."""
    return f"{i:0{max(NAME_WIDTH, len(str(max(count - 1, 0))))}d}"


def argv_for(source: str, mountpoint: str, stamps: str, counters: str, ready_fd: int) -> list[str]:
    """The command line of the process serving `source` at `mountpoint`."""
    return [sys.executable, "-m", MODULE, "--source", source, "--mountpoint", mountpoint, "--stamps", stamps,
            "--counters", counters, "--ready-fd", str(ready_fd)]


def mountpoint_of(argv: list[str]) -> str | None:
    """The directory a segment view process serves, from its argv (None: not a segment view)."""
    from virtfreeze import device_view

    return device_view.mountpoint_of(argv, MODULE)


def read_stamps(path: str, size: int) -> tuple[int, list[int]]:
    """(segment size, one stamp in ns per segment) from a stamps file made for a source of `size` bytes."""
    with open(path) as fh:
        data = json.load(fh)
    segment_size, stamps = data.get("segment_size"), data.get("stamps")
    if not isinstance(segment_size, int) or segment_size < 512 or segment_size & (segment_size - 1):
        raise ValueError(f"{path}: segment_size must be a power of two of at least 512, not {segment_size!r}")
    if not isinstance(stamps, list) or not all(isinstance(t, int) and t > 0 for t in stamps):
        raise ValueError(f"{path}: stamps must be a list of positive integers (ns)")
    if len(stamps) != segment_count(size, segment_size):
        raise ValueError(f"{path}: {len(stamps)} stamps for {segment_count(size, segment_size)} segments")
    return segment_size, stamps


def _operations(source: str, stamps_file: str, counters: str, ready_fd: int):
    from virtfreeze._vendor import mfusepy

    class SegmentDir(mfusepy.Operations):
        """One directory of segment files."""

        use_ns = True

        def __init__(self) -> None:
            self.reader = segment_reader(source)  # as the hashes were read: O_DIRECT but from a guest view
            self.size = self.reader.size
            self.segment_size, self.stamps = read_stamps(stamps_file, self.size)
            self.index = {"/" + segment_name(i, len(self.stamps)): i for i in range(len(self.stamps))}
            self.newest = max(self.stamps, default=1)
            self.served = 0

        def init(self, path):
            os.write(ready_fd, b"ready\n")  # the kernel sent INIT: the mount is in place
            os.close(ready_fd)

        def destroy(self, path):
            from virtfreeze.journal import write_atomic

            write_atomic(Path(counters), json.dumps({"bytes_read": self.served}).encode())

        def _length(self, i: int) -> int:
            return min(self.segment_size, self.size - i * self.segment_size)

        def getattr(self, path, fh=None):
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o500, "st_nlink": 2, "st_ino": 1, "st_uid": 0, "st_gid": 0,
                        "st_atime": self.newest, "st_mtime": self.newest, "st_ctime": self.newest}
            i = self.index.get(path)
            if i is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            n, t = self._length(i), self.stamps[i]
            return {"st_mode": stat.S_IFREG | 0o400, "st_nlink": 1, "st_ino": INO_BASE + i, "st_uid": 0,
                    "st_gid": 0, "st_size": n, "st_blocks": (n + 511) // 512, "st_blksize": 1 << 20,
                    "st_atime": t, "st_mtime": t, "st_ctime": t}

        def readdir(self, path, fh):
            if path != "/":
                raise mfusepy.FuseOSError(errno.ENOTDIR)
            here = {"st_mode": stat.S_IFDIR, "st_ino": 1}
            return [(".", here, 0), ("..", here, 0),
                    *((name[1:], {"st_mode": stat.S_IFREG, "st_ino": INO_BASE + i}, 0)
                      for name, i in self.index.items())]

        def open(self, path, flags):
            if path not in self.index:
                raise mfusepy.FuseOSError(errno.ENOENT)
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise mfusepy.FuseOSError(errno.EROFS)
            return 0

        def read(self, path, size, offset, fh):
            i = self.index[path]
            size = max(0, min(size, self._length(i) - offset))
            data = self.reader.pread(size, i * self.segment_size + offset)
            self.served += len(data)
            return data

    return SegmentDir()


def main(args: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="a raw image file or a block device")
    ap.add_argument("--mountpoint", required=True, help="an existing empty directory")
    ap.add_argument("--stamps", required=True, help='JSON: {"segment_size": N, "stamps": [ns, ...]}')
    ap.add_argument("--counters", required=True, help="written at unmount: bytes served")
    ap.add_argument("--ready-fd", type=int, required=True, help="written to and closed once mounted")
    opts = ap.parse_args(args)
    from virtfreeze._vendor import mfusepy

    try:
        ops = _operations(opts.source, opts.stamps, opts.counters, opts.ready_fd)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None  # on stderr, where start_daemon reads it
    # use_ino: the inodes above reach the tools; kernel_cache and long timeouts: nothing changes while
    # it is mounted; allow_other + default_permissions: the kernel applies the modes (0400/0500, root).
    mfusepy.FUSE(ops, opts.mountpoint, foreground=True, ro=True, use_ino=True, allow_other=True,
                 default_permissions=True, kernel_cache=True, attr_timeout=86400, entry_timeout=86400,
                 fsname="virtfreeze-segments")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
