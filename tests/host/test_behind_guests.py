"""`virtfreeze behind-guests -- CMD` (hook mode): CMD runs as `backup` runs its tools, behind the frozen guests."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from tests.host.helpers import assert_all_acked_present, assert_back_on_base
from tests.host.conftest import VIRTFREEZE

# Writes 64 MiB beside the frozen guest's images without syncing, then waits (at most 30 s) for the
# pages to leave the page cache, which only a writeback started for it does (the kernel keeps dirty
# pages 30 s): exit 0 when they did, 9 when not. Prints its nice value and I/O class first.
WRITER = textwrap.dedent("""
    import os, subprocess, sys, threading, time
    path = sys.argv[1]
    print(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[16], flush=True)
    print(subprocess.run(["ionice", "-p", str(os.getpid())], capture_output=True, text=True).stdout.strip(),
          flush=True)
    with open(path, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
        f.flush()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            res = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", path],
                                 capture_output=True, text=True, check=True).stdout
            if int(res) <= 1 << 20:
                sys.exit(0)
            threading.Event().wait(0.05)  # polling: the page cache gives no event to wait for
    sys.exit(9)
""")


def test_a_hook_mode_tool_runs_behind_the_frozen_guests_and_keeps_its_exit_code(guest_factory, vf, tmp_path):
    g = guest_factory()
    vf("freeze", g.name)
    try:
        beside = next(iter(g.disks.values())).parent / "repo-segment"  # the repository on the images' disk
        proc = vf("behind-guests", "--", sys.executable, "-c", WRITER, str(beside), expect=None)
        assert proc.returncode == 0, proc.stdout + proc.stderr  # written back while it ran
        nice, ioclass = proc.stdout.split("\n")[:2]
        assert (nice, ioclass) == ("19", "idle"), proc.stdout
        assert vf("behind-guests", "--", "sh", "-c", "exit 3", expect=None).returncode == 3
        (vf.state / "journal" / "damaged.json").write_text("{")  # a record it cannot read: said, not fatal
        damaged = vf("behind-guests", "--", "true")
        assert "damaged.json" in damaged.stderr and "not spared" in damaged.stderr, damaged.stderr
        (vf.state / "journal" / "damaged.json").unlink()
    finally:
        vf("thaw", g.name)
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_sigterm_to_behind_guests_reaches_the_tool(vf):
    """systemd stops a unit with SIGTERM to its main process: the tool gets it and its exit code comes back."""
    tool = ("import signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); "
            "print('ready', flush=True); signal.pause()")
    proc = subprocess.Popen([*VIRTFREEZE, "--config", str(vf.config_path), "behind-guests", "--",
                             sys.executable, "-c", tool], stdout=subprocess.PIPE, text=True, env=vf.env())
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 7
