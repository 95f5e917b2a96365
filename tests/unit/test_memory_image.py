"""Where a --memory freeze writes the guest's RAM: a fresh 0700 directory of ours, never one someone planted."""

import os
import stat

import pytest

from virtfreeze import memory_freeze
from virtfreeze.errors import VirtfreezeError

UUID = "7d9f5d6e-0000-4000-8000-000000000001"


def test_a_fresh_private_directory_per_domain(tmp_path):
    base = tmp_path / "shm" / "virtfreeze"
    leftover = base / UUID / "memory.save"
    leftover.parent.mkdir(parents=True, mode=0o700)
    leftover.write_bytes(b"an earlier run's image")
    os.chmod(base, 0o700)
    image = memory_freeze.image_file(base, UUID, "web1")
    assert image == base / UUID / "memory.save" and not image.exists()  # the leftover is gone
    assert stat.S_IMODE(os.stat(image.parent).st_mode) == 0o700
    new = memory_freeze.image_file(tmp_path / "made" / "here", UUID, "web1")
    assert stat.S_IMODE(os.stat(new.parent.parent).st_mode) == 0o700  # memory_directory made 0700 too


@pytest.mark.parametrize("planted", ["writable by others", "someone else's", "a symlink to someone else's"])
def test_a_directory_others_can_write_or_own_is_refused(tmp_path, planted):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    base = tmp_path / "virtfreeze"
    if planted == "writable by others":
        base.mkdir()
        os.chmod(base, 0o777)
    elif planted == "someone else's":
        base.mkdir(mode=0o700)
        os.chown(base, 65534, 65534)
    else:
        os.chown(theirs, 65534, 65534)
        base.symlink_to(theirs)
    with pytest.raises(VirtfreezeError, match="not a directory of ours") as e:
        memory_freeze.image_file(base, UUID, "web1")
    assert e.value.domain == "web1" and e.value.path == str(base)
    assert not (base / UUID).exists()  # nothing written into it


def test_an_unmakeable_directory_is_an_error_not_a_traceback(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(VirtfreezeError, match="cannot make the memory image directory"):
        memory_freeze.image_file(tmp_path / "file" / "below", UUID, "web1")


def test_removing_an_image_removes_its_directory_only_when_empty(tmp_path):
    image = tmp_path / UUID / "memory.save"
    image.parent.mkdir()
    image.write_bytes(b"ram")
    memory_freeze.remove_image(image, UUID)
    assert not image.parent.exists()
    other = tmp_path / UUID / "not ours"
    other.parent.mkdir()
    other.write_text("")
    memory_freeze.remove_image(other.parent / "memory.save", UUID)  # no image: nothing but the empty check
    assert other.exists()
    stranger = tmp_path / "swtpm" / "memory.save"  # a directory not named by the UUID: never removed
    stranger.parent.mkdir()
    memory_freeze.remove_image(stranger, UUID)
    assert stranger.parent.exists()
