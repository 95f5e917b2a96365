"""On this host the archive tools of `backup` really run in a low-weight cgroup, niced."""

from virtfreeze import priority, runner


def test_archive_commands_join_the_low_weight_cgroup():
    with priority.archiving(priority.Priority()):  # the default: nice 19, ionice idle, cpu weight 10
        groups = runner.run(["cat", "/proc/self/cgroup"]).stdout
        ioprio = runner.run(["sh", "-c", "ionice -p $$"]).stdout  # the I/O class of the command itself
    assert "virtfreeze-archive-10" in groups, groups
    assert ioprio.strip() == "idle", ioprio
