"""The archive's priority: commands run inside `archiving` get nice/ionice and join a low-weight cgroup."""

import os
import threading

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
