"""base_writeback: the base's writeback is started over and over while a commit copies, and stops with it."""

from __future__ import annotations

import os
import threading

from virtfreeze import base_writeback


def test_writeback_is_started_while_inside_and_never_after(tmp_path, monkeypatch):
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(1 << 20))  # dirty pages of the base, as a commit leaves them
    calls, twice = [], threading.Event()
    real = os.posix_fadvise

    def recording(fd, offset, length, advice):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))
        if len(calls) >= 2:
            twice.set()
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", recording)
    with base_writeback.written_back("vm", "vda", str(base), interval=0.001):
        assert twice.wait(10), "no writeback started while the commit copies"
    done = len(calls)
    assert set(calls) == {(str(base), 0, 0, os.POSIX_FADV_DONTNEED)}
    with base_writeback.written_back("vm", "vda", str(base), interval=60):
        pass  # leaving ends the thread at once, without waiting for its interval
    assert len(calls) == done
    assert base.read_bytes() and not [t for t in threading.enumerate() if t.name.startswith("writeback:vm")]


def test_a_base_that_cannot_be_opened_is_left_alone(tmp_path, caplog):
    caplog.set_level("DEBUG", logger="virtfreeze.base_writeback")
    with base_writeback.written_back("vm", "vdb", str(tmp_path / "gone.qcow2"), interval=0.001):
        pass
    [record] = caplog.records
    assert "no writeback" in record.getMessage() and (record.domain, record.disk) == ("vm", "vdb")
