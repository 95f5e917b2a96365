"""On this host the archive tools of `backup` really run in a low-weight cgroup, niced, their writes limited."""

import os
import subprocess
from pathlib import Path

from tests.host.helpers import blkio_written
from tests.rig.guest import attach_loop

from virtfreeze import priority, runner


def test_archive_commands_join_the_low_weight_cgroup():
    with priority.archiving(priority.Priority()):  # the default: nice 19, ionice idle, cpu weight 10
        groups = runner.run(["cat", "/proc/self/cgroup"]).stdout
        ioprio = runner.run(["sh", "-c", "ionice -p $$"]).stdout  # the I/O class of the command itself
    assert "virtfreeze-archive-10" in groups, groups
    assert ioprio.strip() == "idle", ioprio


def _blkio_path(text: str) -> str:
    return next(line.split(":", 2)[2] for line in text.splitlines() if "blkio" in line.split(":")[1].split(","))


def test_write_bps_puts_the_archives_writes_to_the_images_disk_under_a_limit(tmp_path):
    """The commands (and the thread, for an in-process copy) write through a blkio cgroup limiting the disk
    that holds the images; the thread is back in its own group afterwards."""
    image = tmp_path / "web1.qcow2"
    image.write_bytes(b"")
    disk = priority.whole_disk(image)
    assert disk is not None, "the test's scratch directory is on no block device"
    before = _blkio_path(Path("/proc/thread-self/cgroup").read_text())
    prio = priority.Priority(nice=0, ionice="none", cpu_weight=None, write_bps=200 << 20)
    with priority.archiving(prio, [str(image)], "web1"):
        inside = runner.run(["cat", "/proc/self/cgroup"]).stdout
        group = Path("/sys/fs/cgroup/blkio") / _blkio_path(inside).lstrip("/")
        counted = blkio_written(group, disk)
        runner.run(["dd", "if=/dev/zero", f"of={tmp_path / 'repo'}", "bs=1M", "count=8", "oflag=direct"])
        assert _blkio_path(Path("/proc/thread-self/cgroup").read_text()) == _blkio_path(inside)  # the thread too
    assert _blkio_path(inside).endswith(f"virtfreeze-archive-write-{200 << 20}"), inside
    assert f"{disk} {200 << 20}" in (group / "blkio.throttle.write_bps_device").read_text()
    assert blkio_written(group, disk) - counted >= 8 << 20  # the command's writes went through the group's throttle
    assert _blkio_path(Path("/proc/thread-self/cgroup").read_text()) == before


def test_whole_disk_of_a_file_system_on_a_partition_is_its_disk(tmp_path):
    """A write limit applies to whole disks: a repository on a partition is limited on the disk it is part of."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    loop = attach_loop(image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        # BLKPG, not a partition table: this test host's kernel parses none (no CONFIG_MSDOS_PARTITION)
        subprocess.run(["addpart", loop, "1", "2048", str((64 << 20) // 512 - 2048)], check=True)
        try:
            subprocess.run(["mkfs.ext4", "-q", f"{loop}p1"], check=True)
            subprocess.run(["mount", f"{loop}p1", str(mnt)], check=True)
            try:
                rdev, part = os.stat(loop).st_rdev, os.stat(mnt).st_dev
                assert Path(f"/sys/dev/block/{os.major(part)}:{os.minor(part)}/partition").exists()
                assert priority.whole_disk(mnt / "repo.borg") == f"{os.major(rdev)}:{os.minor(rdev)}"
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
        finally:
            subprocess.run(["delpart", loop, "1"], check=True)  # a BLKPG partition outlives its loop device
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
