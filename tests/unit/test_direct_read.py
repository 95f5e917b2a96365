"""direct_read: O_DIRECT reads in aligned 1 MiB blocks give exactly the bytes a plain read gives."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest

from virtfreeze.direct_read import BLOCK, DirectReader

SIZE = 3 * BLOCK + 5 * 512  # not a whole number of blocks: the last read is short


@pytest.fixture
def image():
    """A file on a disk file system, where O_DIRECT works."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        path = Path(d) / "base.raw"
        path.write_bytes(os.urandom(SIZE))
        yield path


def test_direct_reads_match_plain_reads_anywhere(image):
    data = image.read_bytes()
    reader = DirectReader(str(image))
    try:
        assert reader.direct and reader.size == SIZE
        rng = random.Random(7)
        cases = [(0, 128 << 10), (BLOCK - 100, 200), (BLOCK, BLOCK), (SIZE - 1000, 128 << 10), (SIZE, 10),
                 (SIZE + 4096, 10), (0, SIZE + BLOCK)]
        cases += [(rng.randrange(SIZE), rng.randrange(1, 3 * BLOCK)) for _ in range(200)]
        for offset, size in cases:
            assert reader.pread(size, offset) == data[offset:offset + size], (offset, size)
        buf = bytearray(BLOCK + 7)
        assert reader.readinto(buf, BLOCK - 3) == BLOCK + 7 and bytes(buf) == data[BLOCK - 3:2 * BLOCK + 4]
    finally:
        reader.close()


def test_a_file_system_refusing_o_direct_is_read_through_the_page_cache(image, monkeypatch):
    data = image.read_bytes()
    real_open = os.open

    def refusing(path, flags, *a):  # as tmpfs before Linux 6.6 and some FUSE file systems answer
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", refusing)
    reader = DirectReader(str(image))
    assert not reader.direct
    assert reader.pread(BLOCK, 1000) == data[1000:1000 + BLOCK] and reader.pread(10, SIZE - 5) == data[-5:]
    reader.close()
    monkeypatch.undo()
    asked = DirectReader(str(image), direct=False)
    assert not asked.direct and asked.pread(4, 0) == data[:4]
    asked.close()
