"""libvirtd restarted in the middle of a thaw: the thaw reconnects and finishes."""

from __future__ import annotations

import os
import signal
import subprocess

import libvirt
import pytest

from tests.conftest import URI
from tests.host.conftest import VIRTFREEZE
from tests.host.helpers import assert_all_acked_present, assert_back_on_base, restart_libvirtd
from tests.rig.guest import DiskSpec


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
