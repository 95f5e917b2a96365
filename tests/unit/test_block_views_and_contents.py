"""Device views' daemon argv, and the check that an archive holds every frozen file's data."""

import os
import signal
import sys

import pytest

from virtfreeze import device_view, runner
from virtfreeze.errors import VirtfreezeError
from virtfreeze.targets import describe_shortfall, short_of_data


def test_device_view_argv_round_trips_awkward_paths():
    for mountpoint in ["/run/x/we b,1/disks/vda.raw", '/run/x/"q"/disks/vdb.qcow2', "/run/--mountpoint/x"]:
        argv = device_view.argv_for("/dev/vg0/web,1", mountpoint, 7)
        assert argv[1:3] == ["-m", "virtfreeze.device_view"]
        assert device_view.mountpoint_of(argv) == mountpoint
        assert argv[argv.index("--ready-fd") + 1] == "7"


def test_mountpoint_of_ignores_other_programs():
    argv = device_view.argv_for("/dev/loop0", "/run/x/d/disks/vda.raw", 3)
    assert device_view.mountpoint_of(["qemu-system-x86_64", *argv[3:]]) is None
    assert device_view.mountpoint_of([]) is None
    assert device_view.mountpoint_of(argv[:-4] + ["--mountpoint"]) is None


def test_short_of_data():
    sizes = {"disks/vda.raw": 256 << 20, "disks/vdb.qcow2": 1000, "memory.save": 5}
    assert short_of_data(sizes, {**sizes, "domain.xml": 10}) == []
    short = short_of_data(sizes, {"disks/vda.raw": 0, "disks/vdb.qcow2": 999})
    assert short == [("disks/vda.raw", 256 << 20, 0), ("disks/vdb.qcow2", 1000, 999), ("memory.save", 5, None)]
    words = [describe_shortfall(*s) for s in short]
    assert "device node" in words[0] and "999 of 1000" in words[1] and "missing" in words[2]


def test_runner_error_names_command_exit_code_and_stderr():
    with pytest.raises(VirtfreezeError) as e:
        runner.run(["sh", "-c", "echo one >&2; echo two >&2; exit 7"], what="the thing", domain="web1", disk="vda")
    text = str(e.value)
    assert "domain 'web1' disk vda" in text and "the thing failed (exit 7): one | two" in text


def test_runner_never_puts_stdout_in_an_error():
    with pytest.raises(VirtfreezeError) as e:
        runner.run(["sh", "-c", "echo secret-passphrase; exit 1"], what="passphrase_command")
    assert "secret" not in str(e.value)


def test_runner_missing_program():
    with pytest.raises(VirtfreezeError) as e:
        runner.run(["/nonexistent/prog"], install_hint="install prog")
    assert "cannot run /nonexistent/prog" in str(e.value) and "install prog" in str(e.value)


def test_runner_children_start_with_no_blocked_signal():
    """Worker threads block SIGTERM; borg and the device views must still get it."""
    import threading

    from virtfreeze.signals import signals_to_main_thread

    seen = {}

    def worker():
        signals_to_main_thread()
        seen["status"] = runner.run(["grep", "^SigBlk", "/proc/self/status"]).stdout

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["status"].split() == ["SigBlk:", "0000000000000000"]


def _helper(code: str):
    return lambda fd: [sys.executable, "-c", code, str(fd)]


def test_start_daemon_returns_once_the_helper_is_ready():
    pid = runner.start_daemon(_helper(
        "import os, signal, sys; os.write(int(sys.argv[1]), b'ready'); os.close(int(sys.argv[1])); signal.pause()"),
        what="helper")
    try:
        assert os.getsid(pid) == pid, "the helper runs in its own session"
    finally:
        os.kill(pid, signal.SIGKILL)


def test_start_daemon_reports_a_helper_that_dies():
    with pytest.raises(VirtfreezeError) as e:
        runner.start_daemon(_helper("import sys; print('no fuse here', file=sys.stderr); sys.exit(3)"),
                            what="device view", path="/dev/x")
    assert "device view did not start: no fuse here" in str(e.value) and "/dev/x" in str(e.value)


def test_start_daemon_kills_a_helper_that_never_answers():
    with pytest.raises(VirtfreezeError) as e:
        runner.start_daemon(_helper("import signal; signal.pause()"), what="helper", timeout=0.2)  # never ready
    assert "no answer within 0.2s" in str(e.value)
