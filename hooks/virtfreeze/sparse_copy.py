"""Copy an image sparsely: data regions only (SEEK_DATA), and all-zero chunks become holes."""

from __future__ import annotations

import errno
import hashlib
import os
from typing import Callable

from virtfreeze import runner

CHUNK = 1 << 20
_ZERO = bytes(CHUNK)


def _data_regions(fd: int, size: int):
    """(start, end) of the regions that may hold data; the whole file where SEEK_DATA is not supported."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            yield pos, size  # e.g. a FUSE file without lseek support
            return
        yield start, min(end, size)
        pos = end


def _copy_regions(src_fd: int, dst_fd: int, offset: int, *, what: str,
                  on_bytes: Callable[[int], None] | None, digest: "hashlib._Hash | None") -> tuple[int, int]:
    """Copy src's data to dst at `offset`, all-zero chunks left out; (bytes read, src's size)."""
    size = os.fstat(src_fd).st_size
    done = 0
    for start, end in _data_regions(src_fd, size) if digest is None else [(0, size)]:
        pos = start
        while pos < end:
            runner.check_cancelled(what)
            chunk = os.pread(src_fd, min(CHUNK, end - pos), pos)
            if not chunk:
                break
            if digest is not None:
                digest.update(chunk)
            if chunk != _ZERO[: len(chunk)]:
                written = 0
                while written < len(chunk):  # a short write is not an error: write the rest
                    written += os.pwrite(dst_fd, chunk[written:], offset + pos + written)
            pos += len(chunk)
            done += len(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return done, size


def copy_fd(src_fd: int, dst_fd: int, *, what: str, on_bytes: Callable[[int], None] | None = None,
            digest: "hashlib._Hash | None" = None) -> int:
    """Copy src to dst (an empty file), leaving holes for holes and zeros; fsync; return bytes read.

    With `digest`, every byte of the source (holes as zeros) goes into it, in order.
    """
    done, size = _copy_regions(src_fd, dst_fd, 0, what=what, on_bytes=on_bytes, digest=digest)
    os.ftruncate(dst_fd, size)
    os.fsync(dst_fd)
    return done


def copy_files_at(sources, dst_fd: int, *, what: str, on_bytes: Callable[[int], None] | None = None) -> int:
    """Concatenate the files `sources` (in order, none followed if a symlink) into dst (an empty
    file), sparsely as `copy_fd`; fsync; return dst's size (the sum of theirs)."""
    offset = 0
    for src in sources:
        src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            offset += _copy_regions(src_fd, dst_fd, offset, what=what, on_bytes=on_bytes, digest=None)[1]
        finally:
            os.close(src_fd)
    os.ftruncate(dst_fd, offset)
    os.fsync(dst_fd)
    return offset


def copy_file(src, dst_fd: int, *, what: str, on_bytes: Callable[[int], None] | None = None,
              digest: "hashlib._Hash | None" = None) -> int:
    """`copy_fd` from the file `src`, which is never followed if it is a symlink (O_NOFOLLOW)."""
    src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return copy_fd(src_fd, dst_fd, what=what, on_bytes=on_bytes, digest=digest)
    finally:
        os.close(src_fd)
