"""file_removal: a large file shrunk in steps before it is unlinked, only while nobody else has it open."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from virtfreeze import file_removal

MiB = 1 << 20


@pytest.fixture
def truncations(monkeypatch):
    """The sizes os.ftruncate is asked for, in order (the real call is made)."""
    seen = []
    real = os.ftruncate

    def recorded(fd, size):
        seen.append(size)
        real(fd, size)

    monkeypatch.setattr(os, "ftruncate", recorded)
    return seen


def big(path, mib=40):
    with open(path, "wb") as f:
        f.truncate(mib * MiB)
    return path


def test_a_file_only_we_hold_is_shrunk_from_its_end_then_unlinked(tmp_path, truncations):
    path = big(tmp_path / "overlay.qcow2")
    file_removal.remove(path, step=16 * MiB)
    assert truncations == [24 * MiB, 8 * MiB] and not path.exists()


def test_a_file_another_process_holds_open_is_only_unlinked(tmp_path, truncations):
    path = big(tmp_path / "memory.save")
    with open(path, "rb") as held:
        reader = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=held)
    try:
        file_removal.remove(path, step=16 * MiB)
        assert truncations == [] and not path.exists()
        with open(f"/proc/{reader.pid}/fd/0", "rb") as still:  # what the reader has is whole
            assert os.fstat(still.fileno()).st_size == 40 * MiB
    finally:
        reader.kill()
        reader.wait()


def test_a_file_with_another_name_is_only_unlinked(tmp_path, truncations):
    path = big(tmp_path / "overlay.qcow2")
    os.link(path, tmp_path / "kept")
    file_removal.remove(path, step=16 * MiB)
    assert truncations == [] and not path.exists() and (tmp_path / "kept").stat().st_size == 40 * MiB


def test_somebody_opening_the_file_meanwhile_stops_the_shrinking(tmp_path, monkeypatch):
    path = big(tmp_path / "overlay.qcow2")
    seen = []
    real = os.ftruncate

    def then_opened_elsewhere(fd, size):
        seen.append(size)
        real(fd, size)
        if len(seen) == 1:  # another process opens it: it waits for the lease, which is broken
            opener = subprocess.run([sys.executable, "-c", f"""
import errno, os
try:
    os.open({str(path)!r}, os.O_RDONLY | os.O_NONBLOCK)
except OSError as e:
    assert e.errno == errno.EWOULDBLOCK, e
"""], capture_output=True, text=True)
            assert opener.returncode == 0, opener.stderr

    monkeypatch.setattr(os, "ftruncate", then_opened_elsewhere)
    file_removal.remove(path, step=4 * MiB)
    assert seen == [36 * MiB] and not path.exists()  # one step, then only the unlink


def test_a_symlink_is_removed_not_what_it_points_at(tmp_path, truncations):
    target = big(tmp_path / "target")
    (tmp_path / "link").symlink_to(target)
    file_removal.remove(tmp_path / "link")
    assert truncations == [] and not (tmp_path / "link").exists() and target.stat().st_size == 40 * MiB


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError):
        file_removal.remove(tmp_path / "gone")


def test_a_tree_goes_whole_its_large_files_in_steps(tmp_path, truncations):
    scratch = tmp_path / "verify-web1"
    (scratch / "disks").mkdir(parents=True)
    big(scratch / "disks" / "vda.qcow2", mib=12)
    (scratch / "domain.xml").write_text("<domain/>")
    outside = big(tmp_path / "outside", mib=12)
    (scratch / "link-out").symlink_to(outside)  # a link is removed, never what it points at
    file_removal.remove_tree(scratch, step=4 * MiB)
    assert truncations == [8 * MiB, 4 * MiB] and not scratch.exists() and outside.stat().st_size == 12 * MiB


def test_remove_any_takes_a_tree_a_file_a_link_or_nothing(tmp_path, truncations):
    tree = tmp_path / "staging"
    (tree / "disks").mkdir(parents=True)
    big(tree / "disks" / "vda.raw", mib=8)
    single = big(tmp_path / "vdb.raw", mib=8)
    (tmp_path / "to-tree").symlink_to(tmp_path / "kept", target_is_directory=True)
    (tmp_path / "kept").mkdir()
    for path in (tree, single, tmp_path / "to-tree", tmp_path / "gone"):
        file_removal.remove_any(path, step=4 * MiB)
    assert truncations == [4 * MiB, 4 * MiB]  # each 8 MiB file once, in steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # a link's directory stays
