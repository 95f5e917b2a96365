"""Which files the archive's writeback thread sends to disk, and how runner.run's commands are followed."""

import os
import subprocess
import sys
import textwrap

from virtfreeze import archive_writeback, priority, runner

CHILD = textwrap.dedent("""
    import os, sys
    d = sys.argv[1]
    written = open(os.path.join(d, "segment"), "wb")         # being written: sent to disk
    read = open(os.path.join(d, "index"), "w"); read.close()
    read = open(os.path.join(d, "index"), "rb")              # only read: left alone
    temp = open(os.path.join(d, "temp-pack"), "wb")          # written, then unlinked: never needs the disk
    os.unlink(os.path.join(d, "temp-pack"))
    print("ready", flush=True)
    sys.stdin.read()
""")


def test_files_written_by_a_process_are_its_linked_files_open_for_writing(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        found = archive_writeback.files_written_by(child.pid)
        names = {os.readlink(link) for link, _dev in found}
        assert names == {str(tmp_path / "segment")}, names
        assert {dev for _link, dev in found} == {(tmp_path / "segment").stat().st_dev}
    finally:
        child.communicate("")
    assert archive_writeback.files_written_by(child.pid) == []  # gone: nothing, no error


def test_commands_run_inside_archiving_are_followed_while_they_run():
    seen = []
    prio = priority.Priority(nice=0, ionice="none", cpu_weight=None)
    with priority.archiving(prio):
        commands = priority._current.commands
        runner.run(["echo", "hi"], on_line=lambda line: seen.append(commands.pids()))
        assert commands.pids() == []  # no longer once it has ended
    assert len(seen) == 1 and len(seen[0]) == 1
    runner.run(["echo", "outside"])  # outside archiving nothing follows it


def test_normal_means_no_writeback_thread_either():
    assert not priority.Priority(nice=0, ionice="none", cpu_weight=None).normal
    assert priority.Priority(nice=0, ionice="none", cpu_weight=None, writeback_interval=None).normal
    assert priority.Priority.from_config({"writeback_interval": 0.1}).writeback_interval == 0.1
    assert priority.Priority().writeback_interval == archive_writeback.INTERVAL
