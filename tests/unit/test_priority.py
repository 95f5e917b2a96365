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
    with priority.archiving(priority.Priority(nice=0, ionice="none", cpu_weight=None)):
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


def test_whole_disk_names_the_block_device_of_a_path_and_none_for_tmpfs(tmp_path):
    dev = os.stat("/").st_dev
    if Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/partition").exists():
        import pytest

        pytest.skip("the root file system is on a partition here; the host test covers partitions")
    assert priority.whole_disk("/") == f"{os.major(dev)}:{os.minor(dev)}"
    assert priority.whole_disk("/no/such/dir/repo.borg") == priority.whole_disk("/")  # its nearest parent
    assert priority.whole_disk("/proc/self") is None  # no block device under it
    assert priority.whole_disk("/dev/shm/x") is None  # tmpfs


def test_a_write_limit_group_v2_and_v1(tmp_path, monkeypatch):
    monkeypatch.setattr(priority, "_write_groups", {})
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.subtree_control").write_text("cpu io memory\n")
    group = v2 / f"virtfreeze-archive-write-{200 << 20}"
    assert priority.write_limit_group(200 << 20, frozenset({"254:0"}), root=v2) == ("v2", group)
    assert (group / "io.max").read_text() == f"254:0 wbps={200 << 20}\n"

    monkeypatch.setattr(priority, "_write_groups", {})
    v1 = tmp_path / "v1"
    (v1 / "blkio").mkdir(parents=True)
    (v1 / "cgroup.subtree_control").write_text("\n")
    (v1 / "blkio" / "blkio.throttle.write_bps_device").write_text("")
    group = v1 / "blkio" / "virtfreeze-archive-write-1048576"
    assert priority.write_limit_group(1 << 20, frozenset({"8:0"}), root=v1) == ("v1", group)
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
    assert procs == [v2 / "virtfreeze-archive-write-1048576" / "cgroup.procs"]
    assert thread_tasks is None  # v2 cannot move one thread: the in-process copy is not limited there
    assert (v2 / "virtfreeze-archive-write-1048576" / "cpu.weight").read_text() == "10\n"


def test_write_bps_on_images_in_tmpfs_limits_nothing_and_says_so(caplog):
    import logging

    prio = priority.Priority(nice=0, ionice="none", cpu_weight=None, write_bps=1 << 20)
    with caplog.at_level(logging.INFO, logger="virtfreeze.priority"), \
            priority.archiving(prio, ["/dev/shm/web1.qcow2"], "web1"):
        assert priority.child_cgroups() == []
    assert "images are on no single block device" in caplog.text
