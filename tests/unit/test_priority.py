"""The archive's priority: commands run inside `archiving` get nice/ionice and join a low-weight cgroup."""

import os
import threading
from pathlib import Path

from virtfreeze import priority, runner


def test_commands_inside_archiving_run_niced_and_outside_do_not():
    prio = priority.Priority(nice=19, ionice="idle", cpu_weight=None)
    assert priority.command_prefix() == []
    with priority.archiving(prio):
        assert priority.command_prefix() == ["ionice", "-c", "3", "nice", "-n", "19"]
        stat = runner.run(["cat", "/proc/self/stat"]).stdout
        assert int(stat[stat.rindex(")") + 2:].split()[16]) == 19  # field 19: nice
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 19  # this thread's own work too
    assert priority.command_prefix() == []
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0
    stat = runner.run(["cat", "/proc/self/stat"]).stdout
    assert int(stat[stat.rindex(")") + 2:].split()[16]) == 0


def test_normal_priority_changes_nothing():
    with priority.archiving(priority.Priority(nice=0, ionice="none", cpu_weight=None, writeback_interval=None)):
        assert priority.command_prefix() == []


def test_a_cgroup_with_a_small_weight_v2_and_v1(tmp_path, monkeypatch):
    monkeypatch.setattr(priority, "_cgroups", {})
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.subtree_control").write_text("cpu io memory\n")
    procs = priority.cgroup_procs(10, root=v2)
    assert procs == v2 / "virtfreeze-archive-10" / "cgroup.procs"
    assert (v2 / "virtfreeze-archive-10" / "cpu.weight").read_text() == "10\n"

    monkeypatch.setattr(priority, "_cgroups", {})
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cgroup.subtree_control").write_text("\n")
    (v1 / "cpu" / "cpu.shares").write_text("1024\n")
    assert priority.cgroup_procs(10, root=v1) == v1 / "cpu" / "virtfreeze-archive-10" / "cgroup.procs"
    assert (v1 / "cpu" / "virtfreeze-archive-10" / "cpu.shares").read_text() == "102\n"


def test_a_missing_program_is_named_not_ionice(tmp_path):
    import pytest

    from virtfreeze.errors import VirtfreezeError

    with priority.archiving(priority.Priority()), pytest.raises(VirtfreezeError, match="cannot run no-such-borg"):
        runner.run(["no-such-borg", "create"], what="borg create")


def test_disks_under_a_missing_path_is_its_parents_and_none_for_tmpfs():
    """(The disk of a real file system, a partition's and a block device's: tests/host/test_archive_priority.)"""
    assert priority.disks_under("/no/such/dir/repo.borg") == priority.disks_under("/")  # its nearest parent
    assert priority.disks_under("/proc/self") == set()  # no block device under it
    assert priority.disks_under("/dev/shm/x") == set()  # tmpfs


def test_a_write_limit_group_v2_and_v1(tmp_path, monkeypatch):
    monkeypatch.setattr(priority, "_write_groups", {})
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.subtree_control").write_text("cpu io memory\n")
    kind, group = priority.write_limit_group(200 << 20, frozenset({"254:0"}), root=v2)
    assert kind == "v2" and group.parent == v2 and group.name.startswith(f"virtfreeze-archive-write-{200 << 20}-")
    other = priority.write_limit_group(200 << 20, frozenset({"254:0", "8:0"}), root=v2)[1]
    assert other != group  # other disks, another group: a group's disks never widen
    assert (group / "io.max").read_text() == f"254:0 wbps={200 << 20}\n"

    monkeypatch.setattr(priority, "_write_groups", {})
    v1 = tmp_path / "v1"
    (v1 / "blkio").mkdir(parents=True)
    (v1 / "cgroup.subtree_control").write_text("\n")
    (v1 / "blkio" / "blkio.throttle.write_bps_device").write_text("")
    kind, group = priority.write_limit_group(1 << 20, frozenset({"8:0"}), root=v1)
    assert kind == "v1" and group.parent == v1 / "blkio"
    assert (group / "blkio.throttle.write_bps_device").read_text() == "8:0 1048576\n"

    monkeypatch.setattr(priority, "_write_groups", {})
    none = tmp_path / "none"
    none.mkdir()
    (none / "cgroup.subtree_control").write_text("cpu\n")
    assert priority.write_limit_group(1 << 20, frozenset({"8:0"}), root=none) is None


def test_on_v2_the_commands_join_one_group_with_both_the_weight_and_the_limit(tmp_path, monkeypatch):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.subtree_control").write_text("cpu io\n")
    monkeypatch.setattr(priority, "_write_groups", {})
    procs, thread_tasks = priority._archive_cgroups(priority.Priority(write_bps=1 << 20), frozenset({"8:0"}),
                                                    priority.log, root=v2)
    [group] = v2.glob("virtfreeze-archive-write-1048576-*")
    assert procs == [group / "cgroup.procs"]
    assert thread_tasks is None  # v2 cannot move one thread: the in-process copy is not limited there
    assert (group / "cpu.weight").read_text() == "10\n"


def test_write_bps_on_images_in_tmpfs_limits_nothing_and_says_so(caplog):
    import logging

    prio = priority.Priority(nice=0, ionice="none", cpu_weight=None, write_bps=1 << 20)
    with caplog.at_level(logging.INFO, logger="virtfreeze.priority"), \
            priority.archiving(prio, ["/dev/shm/web1.qcow2"], "web1"):
        assert priority.child_cgroups() == []
    assert "images are on no block device" in caplog.text


def test_the_disks_beneath_an_lv_are_its_physical_disks(tmp_path):
    """sysfs as the kernel lays it out: dm-0 (an LV) over sda2 and sdb (a PV each); sda2 a partition."""
    devices, class_block = tmp_path / "devices", tmp_path / "class" / "block"
    class_block.mkdir(parents=True)
    for node, dev in [("sda", "8:0"), ("sda/sda2", "8:2"), ("sdb", "8:16"), ("dm-0", "253:0")]:
        (devices / node).mkdir(parents=True)
        (devices / node / "dev").write_text(f"{dev}\n")
        (class_block / Path(node).name).symlink_to(devices / node)
    (devices / "sda/sda2/partition").write_text("2\n")
    (devices / "dm-0/slaves").mkdir()
    for slave in ("sda2", "sdb"):
        (devices / "dm-0/slaves" / slave).symlink_to(class_block / slave)
    assert priority._disks_beneath(devices / "dm-0", class_block) == {"8:0", "8:16"}
    assert priority._disks_beneath(devices / "sda/sda2", class_block) == {"8:0"}
    assert priority._disks_beneath(devices / "sdb", class_block) == {"8:16"}
