"""The segment view (issue 13's layout) with the real borg and restic: a second archive of an unchanged disk
reads nothing through the view, a third one reads exactly the segments whose stamps moved, and every archive
restores byte-identical to its source."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from virtfreeze import runner, segment_view
from virtfreeze.export_view import unmount

SEGMENT = 1 << 20
SEGMENTS = 16


class View:
    """An export directory with manifest.json and one disk as a segment view over `source`."""

    def __init__(self, tmp: Path, source: Path):
        self.root = tmp / "export" / "web"
        self.segments = self.root / "disks" / "vda.segments"
        self.segments.mkdir(parents=True)
        self.source, self.stamps_file, self.counters = source, tmp / "stamps.json", tmp / "counters.json"
        self.stamps = [time.time_ns() - 60 * 10**9] * SEGMENTS

    def mount(self) -> int:
        self.stamps_file.write_text(json.dumps({"segment_size": SEGMENT, "stamps": self.stamps}))
        (self.root / "manifest.json").write_text(json.dumps({"run": time.time_ns()}))  # newer than every stamp
        return runner.start_daemon(lambda fd: segment_view.argv_for(str(self.source), str(self.segments),
                                                                    str(self.stamps_file), str(self.counters), fd),
                                   what="segment view")

    def archive(self, tool: list[str], **kw) -> int:
        """Mount, run the tool, unmount; the bytes it read through the view."""
        pid = self.mount()
        try:
            subprocess.run(tool, check=True, capture_output=True, text=True, **kw)
        finally:
            unmount(self.segments)
            os.waitpid(pid, 0)  # it writes its counters at unmount, then exits
        return json.loads(self.counters.read_text())["bytes_read"]

    def change(self, *segments: int) -> bytes:
        """New data in these segments of the source, new stamps for them (still older than the manifest)."""
        with open(self.source, "r+b") as fh:
            for i in segments:
                fh.seek(i * SEGMENT + 4096)
                fh.write(os.urandom(8192))
        stamp = time.time_ns() - 10**9
        for i in segments:
            self.stamps[i] = stamp
        return self.source.read_bytes()


def _joined(directory: Path) -> bytes:
    names = sorted(os.listdir(directory))
    assert names == [segment_view.segment_name(i, SEGMENTS) for i in range(SEGMENTS)]
    return b"".join((directory / n).read_bytes() for n in names)


@pytest.fixture
def view(tmp_path):
    source = tmp_path / "vda.raw"
    source.write_bytes(os.urandom(SEGMENT * SEGMENTS))
    return View(tmp_path, source)


def test_borg_reads_only_the_segments_that_changed(view, tmp_path):
    env = dict(os.environ, BORG_CACHE_DIR=str(tmp_path / "borg-cache"), BORG_BASE_DIR=str(tmp_path / "borg-base"),
               BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")
    repo = tmp_path / "repo.borg"
    subprocess.run(["borg", "init", "-e", "none", str(repo)], check=True, capture_output=True, env=env)

    def create(name: str) -> int:
        return view.archive(["borg", "create", f"{repo}::{name}", "."], cwd=view.root, env=env)

    assert create("one") == SEGMENT * SEGMENTS  # the first run reads everything
    assert create("two") == 0  # nothing changed: nothing read
    want = view.change(3, 9)
    assert create("three") == 2 * SEGMENT  # exactly the two segments whose stamps moved
    out = tmp_path / "restored"
    out.mkdir()
    subprocess.run(["borg", "extract", f"{repo}::three"], cwd=out, check=True, capture_output=True, env=env)
    assert _joined(out / "disks" / "vda.segments") == want


def test_restic_reads_only_the_segments_that_changed(view, tmp_path):
    env = dict(os.environ, RESTIC_REPOSITORY=str(tmp_path / "repo.restic"), RESTIC_PASSWORD="x",
               RESTIC_CACHE_DIR=str(tmp_path / "restic-cache"))
    subprocess.run(["restic", "init"], check=True, capture_output=True, env=env)

    def backup() -> int:
        return view.archive(["restic", "backup", "--host", "h", str(view.root)], env=env)

    assert backup() == SEGMENT * SEGMENTS
    assert backup() == 0
    want = view.change(0, SEGMENTS - 1)
    assert backup() == 2 * SEGMENT
    out = tmp_path / "restored"
    subprocess.run(["restic", "restore", "latest", "--target", str(out)], check=True, capture_output=True, env=env)
    assert _joined(out / str(view.segments).lstrip("/")) == want


def test_a_stamps_file_that_does_not_fit_the_source_is_refused(view):
    view.stamps = view.stamps[:-1]
    with pytest.raises(Exception, match="15 stamps for 16 segments"):
        view.mount()
    assert not os.listdir(view.segments)
