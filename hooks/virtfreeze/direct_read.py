"""Reading a frozen base with O_DIRECT, in whole aligned 1 MiB blocks, for the views that serve it.

A backup reads each disk once, cold. Through the page cache the disk's
read-ahead (8 MiB on this test host) queues large reads ahead of the running
guests' writes, and a writing guest stalls: reading 512 MiB with `cat` took
its largest stall from 14–15 ms to 36–50 ms; `dd iflag=direct bs=1M`, at the
same speed, to 20 ms. The device and segment views therefore read their
source with O_DIRECT in 1 MiB blocks (the last block read serves the next
FUSE requests, which come in 128 KiB pieces), and through the page cache
only where the file system refuses O_DIRECT.
"""

from __future__ import annotations

import mmap
import os
import threading

BLOCK = 1 << 20  # a multiple of every logical block size, and as large as a read that did not stall


def _open_direct(path: str) -> int | None:
    """`path` opened read-only with O_DIRECT, or None where its file system refuses that (EINVAL:
    tmpfs before Linux 6.6, some FUSE file systems)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None


def direct_io_allowed(path: str) -> bool:
    """Whether `path` opens with O_DIRECT (for a program told to use it, e.g. qemu-storage-daemon)."""
    fd = _open_direct(path)
    if fd is None:
        return False
    os.close(fd)
    return True


class DirectReader:
    """`readinto`/`pread` of a file or block device, O_DIRECT where it can be (and `direct` asks)."""

    def __init__(self, path: str, direct: bool = True) -> None:
        fd = _open_direct(path) if direct else None
        self.direct = fd is not None
        self.fd = fd if fd is not None else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self._block = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants its buffer
        self._start, self._length = -1, 0  # the block held: its offset, and the bytes read into it
        self._lock = threading.Lock()  # FUSE may call from several threads

    def readinto(self, into, offset: int) -> int:
        """Fill `into` (a writable buffer) from `offset`; returns the bytes read (fewer only at the end)."""
        view = memoryview(into).cast("B")
        wanted = max(0, min(len(view), self.size - offset))
        if not self.direct:
            return os.preadv(self.fd, [view[:wanted]], offset) if wanted else 0
        done = 0
        with self._lock:
            while done < wanted:
                pos = offset + done
                start = pos - pos % BLOCK
                if start != self._start:
                    self._start, self._length = -1, 0  # held nothing, should the read below fail
                    self._length = os.preadv(self.fd, [self._block], start)
                    self._start = start
                skip = pos - start
                if self._length <= skip:
                    break  # the source ended early (it shrank)
                n = min(self._length - skip, wanted - done)
                view[done:done + n] = self._block[skip:skip + n]
                done += n
        return done

    def pread(self, size: int, offset: int) -> bytes:
        buf = bytearray(max(0, min(size, self.size - offset)))
        return bytes(buf[:self.readinto(buf, offset)])

    def close(self) -> None:
        os.close(self.fd)
        self._block.close()
