"""libvirtd restarted in the middle of a thaw: the thaw reconnects and finishes."""

from __future__ import annotations

import os
import select
import signal
import subprocess

import libvirt
import pytest

from tests.conftest import URI
from tests.host.conftest import VIRTFREEZE
from tests.host.helpers import assert_all_acked_present, assert_back_on_base
from tests.rig.guest import DiskSpec


def restart_libvirtd() -> None:
    if os.path.isdir("/run/systemd/system"):
        subprocess.run(["systemctl", "restart", "libvirtd"], check=True)
    else:
        pid = int(subprocess.check_output(["pgrep", "-x", "libvirtd"]).split()[0])
        pidfd = os.pidfd_open(pid)
        os.kill(pid, signal.SIGTERM)
        ready, _, _ = select.select([pidfd], [], [], 60)  # readable when the process has exited
        os.close(pidfd)
        assert ready, "libvirtd did not exit on SIGTERM"
        # The parent returns once the daemon listens (libvirt's remote_daemon.c: "ready to accept
        # net connections"); a connection made before its drivers are up waits until it serves.
        subprocess.run(["libvirtd", "-d"], check=True, timeout=60)
    libvirt.open(URI).close()


@pytest.mark.exclusive
def test_libvirtd_restarted_during_thaw(guest_factory, vf):
    g = guest_factory([DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw")])
    vf("freeze", g.name)
    g.watcher.wait_acks(60)
    thaw = subprocess.Popen([*VIRTFREEZE, "--config", str(vf.config_path), "thaw", g.name],
                            env=vf.env(VIRTFREEZE_FAILPOINT="thaw-commit-started:stop"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status = os.waitpid(thaw.pid, os.WUNTRACED)  # stops itself right after starting the commit
    assert os.WIFSTOPPED(status), "thaw ended before the failpoint"
    restart_libvirtd()
    os.kill(thaw.pid, signal.SIGCONT)
    out, err = thaw.communicate(timeout=300)
    assert thaw.returncode == 0, err
    assert "reconnected to libvirt" in err

    g.conn = libvirt.open(URI)  # the test's own connection died with the old daemon
    g.watcher.wait_acks(30)
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)
