"""Which files the archive's writeback thread sends to disk, and how runner.run's commands are followed."""

import os
import subprocess
import sys
import textwrap
import threading

from virtfreeze import archive_writeback, priority, runner

CHILD = textwrap.dedent("""
    import os, sys
    d = sys.argv[1]
    written = open(os.path.join(d, "segment"), "wb")         # being written: sent to disk
    written.write(b"x" * 65536)
    read = open(os.path.join(d, "index"), "w"); read.close()
    read = open(os.path.join(d, "index"), "rb")              # only read: not listed
    temp = open(os.path.join(d, "temp-pack"), "wb")          # written, then unlinked: never needs the disk
    os.unlink(os.path.join(d, "temp-pack"))
    null = open(os.devnull, "wb")                            # a device: never opened by the thread
    print("ready", flush=True)
    sys.stdin.read()
""")


def test_the_files_a_process_writes_and_which_of_them_are_written_back(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        found = {os.readlink(link).removesuffix(" (deleted)"): (link, mount_id)
                 for link, mount_id in archive_writeback.files_written_by(child.pid)}
        segment, temp = str(tmp_path / "segment"), str(tmp_path / "temp-pack")
        assert {segment, temp, os.devnull} <= set(found), found  # open for writing (its stdout too)
        assert str(tmp_path / "index") not in found  # only read
        devices = archive_writeback.mount_devices(child.pid)
        assert devices[found[segment][1]] == (tmp_path / "segment").stat().st_dev  # its mount's device
        assert archive_writeback.start_writeback(found[segment][0])
        assert not archive_writeback.start_writeback(found[temp][0])  # unlinked
        assert not archive_writeback.start_writeback(found[os.devnull][0])  # not a regular file
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
    assert priority._current.commands is None  # outside archiving nothing follows a command


def _writeback_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("writeback:")]


def test_the_thread_runs_inside_archiving_for_images_on_a_disk_unless_switched_off(tmp_path):
    image = tmp_path / "web1.qcow2"
    image.write_bytes(b"")
    on_a_disk = bool(priority.disks_under(image))  # the unit tests' scratch directory: a disk, or a tmpfs
    with priority.archiving(priority.Priority(nice=0, ionice="none", cpu_weight=None), [str(image)], "web1"):
        assert _writeback_threads() == (["writeback:web1"] if on_a_disk else [])
    assert _writeback_threads() == []
    off = priority.Priority(nice=0, ionice="none", cpu_weight=None, writeback_interval=None)
    assert off.normal
    with priority.archiving(off, [str(image)], "web1"):
        assert _writeback_threads() == []
    assert priority.Priority.from_config({"writeback_interval": 0.1}).writeback_interval == 0.1
    assert priority.Priority().writeback_interval == archive_writeback.INTERVAL
