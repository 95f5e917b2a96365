"""On this host the archive tools of `backup` really run in a low-weight cgroup, niced, their writes limited."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.host.helpers import blkio_written
from tests.rig.guest import attach_loop

from virtfreeze import priority, runner


def test_archive_commands_join_the_low_weight_cgroup():
    with priority.archiving(priority.Priority()):  # the default: nice 19, ionice idle, cpu weight 10
        groups = runner.run(["cat", "/proc/self/cgroup"]).stdout
        ioprio = runner.run(["sh", "-c", "ionice -p $$"]).stdout  # the I/O class of the command itself
    assert "virtfreeze-archive-10" in groups, groups
    assert ioprio.strip() == "idle", ioprio


def test_write_bps_puts_the_archives_writes_to_the_images_disk_under_a_limit(tmp_path):
    """The commands (and the thread, for an in-process copy) write through a blkio cgroup limiting the disk
    that holds the images; the thread is back in its own group afterwards."""
    image = tmp_path / "web1.qcow2"
    image.write_bytes(b"")
    [disk] = priority.disks_under(image)  # the test's scratch directory is on one disk
    before = priority.blkio_group(Path("/proc/thread-self/cgroup").read_text())
    prio = priority.Priority(nice=0, ionice="none", cpu_weight=None, write_bps=200 << 20)
    with priority.archiving(prio, [str(image)], "web1"):
        inside = runner.run(["cat", "/proc/self/cgroup"]).stdout
        group = priority.blkio_group(inside)
        counted = blkio_written(group, disk)
        runner.run(["dd", "if=/dev/zero", f"of={tmp_path / 'repo'}", "bs=1M", "count=8", "oflag=direct"])
        after_command = blkio_written(group, disk)
        with open(tmp_path / "copy", "wb") as f:  # the thread's own writes (the directory target's copy)
            f.write(os.urandom(4 << 20))
            os.fsync(f.fileno())
        assert priority.blkio_group(Path("/proc/thread-self/cgroup").read_text()) == group  # the thread too
    assert group.name.startswith(f"virtfreeze-archive-write-{200 << 20}-"), inside
    assert f"{disk} {200 << 20}" in (group / "blkio.throttle.write_bps_device").read_text()
    assert after_command - counted >= 8 << 20  # the command's writes went through the group's throttle
    assert blkio_written(group, disk) - after_command >= 4 << 20  # and the thread's own
    assert priority.blkio_group(Path("/proc/thread-self/cgroup").read_text()) == before


def _scratch_disk(tmp_path: Path) -> tuple[str, str]:
    """A 64 MiB loop device over a file in `tmp_path`: (device path, "MAJOR:MINOR")."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    loop = attach_loop(image)
    rdev = os.stat(loop).st_rdev
    return loop, f"{os.major(rdev)}:{os.minor(rdev)}"


def _mounted_disks(device: str, mnt: Path) -> frozenset[str]:
    """disks_under of a file system made on `device`, asked while it is mounted at `mnt`."""
    subprocess.run(["mkfs.ext4", "-q", device], check=True)
    mnt.mkdir()
    subprocess.run(["mount", device, str(mnt)], check=True)
    try:
        return priority.disks_under(mnt / "repo.borg")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disks_under_a_partition_and_a_block_device_are_the_whole_disk(tmp_path):
    """A write limit applies to whole disks: a file system on a partition is limited on the disk it is part
    of; a block-device image on its own disk. (This host's kernel has no device-mapper: the unit tests
    cover an LV's slaves.)"""
    loop, disk = _scratch_disk(tmp_path)
    try:
        assert priority.disks_under(loop) == {disk}  # a block-device image: its own disk
        # BLKPG, not a partition table: this test host's kernel parses none (no CONFIG_MSDOS_PARTITION)
        subprocess.run(["addpart", loop, "1", "2048", str((64 << 20) // 512 - 2048)], check=True)
        try:
            part = os.stat(f"{loop}p1").st_rdev
            assert Path(f"/sys/dev/block/{os.major(part)}:{os.minor(part)}/partition").exists()
            assert _mounted_disks(f"{loop}p1", tmp_path / "on-partition") == {disk}
        finally:
            subprocess.run(["delpart", loop, "1"], check=True)  # a BLKPG partition outlives its loop device
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


WRITER = """
import os, sys
d = sys.argv[1]
with open(os.path.join(d, "segment"), "wb") as kept, open(os.path.join(d, "temp"), "wb") as temp:
    os.unlink(os.path.join(d, "temp"))
    for f in (kept, temp):
        for _ in range(64):
            f.write(os.urandom(1 << 20))
        f.flush()
    print(f"/proc/{os.getpid()}/fd/{temp.fileno()}", flush=True)
    open(sys.argv[2]).read()  # until the test has looked
"""


def _resident(path: str) -> int:
    """Bytes of `path` in the host's page cache."""
    return int(subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", path],
                              check=True, capture_output=True, text=True).stdout)


@pytest.mark.parametrize("write_bps", [None, 1 << 30], ids=["unlimited", "write_bps"])
def test_what_an_archive_command_writes_to_the_images_disk_goes_to_disk_while_it_runs(tmp_path, write_bps):
    """A command inside `archiving` writes 64 MiB and holds the file open without syncing it: the writeback
    thread sends it to disk and its pages leave the page cache (the kernel alone would keep them dirty for
    30 s); a file it unlinked stays in memory, untouched. With write_bps, that writeback goes through the
    limit (the thread joins the group)."""
    image = tmp_path / "web1.qcow2"
    image.write_bytes(b"")
    segment, fifo = tmp_path / "segment", tmp_path / "fifo"
    os.mkfifo(fifo)
    [disk] = priority.disks_under(image)
    group = priority.write_limit_group(write_bps, frozenset({disk}))[1] if write_bps else None
    written_before = blkio_written(group, disk) if group else 0
    seen: dict[str, int] = {}

    def on_line(temp_link: str) -> None:  # the writer has written both files and waits on the fifo
        deadline = time.monotonic() + 30
        while _resident(str(segment)) > 1 << 20:
            if time.monotonic() > deadline:
                raise AssertionError(f"{segment} still has {_resident(str(segment))} bytes in the page cache")
            threading.Event().wait(0.05)  # polling the page cache: no event says when writeback is done
        seen["unlinked"] = _resident(temp_link)
        seen["limited"] = blkio_written(group, disk) - written_before if group else 0
        with open(fifo, "w"):  # the writer may end
            pass

    prio = priority.Priority(nice=0, ionice="none", cpu_weight=None, write_bps=write_bps)
    with priority.archiving(prio, [str(image)], "web1"):
        runner.run([sys.executable, "-c", WRITER, str(tmp_path), str(fifo)], on_line=on_line)
    assert seen["unlinked"] == 64 << 20  # never written back, never dropped
    assert segment.stat().st_size == 64 << 20
    if write_bps:
        assert seen["limited"] >= 64 << 20, seen  # written back by the thread, inside the limit's group
