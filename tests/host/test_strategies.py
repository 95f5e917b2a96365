"""thaw --strategy live|iterative|offline with a writing guest, and kill -9 in each phase."""

from __future__ import annotations

import json
import signal
import time

import libvirt
import pytest

from tests.host.helpers import assert_all_acked_present, assert_back_on_base
from tests.rig.guest import DiskSpec

DISKS = [DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw")]


def assert_resumed(g, before: dict[str, int]) -> None:
    """The guest runs again and continues its write sequence (restored, not rebooted)."""
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    t = time.monotonic()
    g.watcher.wait_acks(20, after=t)
    after = [a for a in g.watcher.snapshot() if a.t > t]
    for disk, last in before.items():
        seqs = [a.seq for a in after if a.disk == disk]
        assert seqs and min(seqs) > last // 2 and max(seqs) > last, \
            f"{disk}: sequence restarted ({min(seqs)}..{max(seqs)} after {last})"


# (strategy, iterative_final_step, whether QEMU is restarted: save/restore makes a new process)
STRATEGIES = {
    "live": ("live", "auto", False),
    "iterative": ("iterative", "auto", False),  # last overlay merged with the vCPUs paused
    "iterative-save": ("iterative", "save", True),  # last overlay merged with the guest saved
    "offline": ("offline", "auto", True),
}


@pytest.mark.parametrize("case", list(STRATEGIES))
def test_strategy_keeps_every_write_and_the_guest_running(guest_factory, vf, case):
    strategy, final_step, restarts = STRATEGIES[case]
    vf.write_config(iterative_threshold=0, iterative_final_step=final_step)
    g = guest_factory(DISKS)
    vf("freeze", g.name)
    g.watcher.wait_acks(200)
    status = json.loads(vf("--json", "status", g.name, expect=3).stdout)["frozen"][0]
    assert status["strategy"] == "live" and "auto" in status["strategy_reason"]
    before = g.watcher.last_seq()
    qemu = g.dom.ID()
    result = json.loads(vf("--json", "thaw", "--strategy", strategy, g.name).stdout)["thawed"][0]
    assert result["strategy"] == strategy
    if strategy == "live":
        assert result["stopped_seconds"] == 0 and result["offline_bytes"] == 0
    else:
        assert result["stopped_seconds"] > 0 and result["offline_bytes"] > 0
    if strategy == "iterative":
        assert result["rounds"] >= 1
    assert (g.dom.ID() != qemu) == restarts, "save/restore starts a new QEMU; a pause keeps it"
    assert_resumed(g, before)
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_offline_keeps_a_paused_guest_paused_and_config_picks_the_strategy(guest_factory, vf):
    g = guest_factory(DISKS)
    vf.write_config(domains={g.name: {"strategy": "offline"}})
    vf("freeze", g.name)
    g.watcher.wait_acks(50)
    assert "domain setting says offline" in vf("status", g.name, expect=3).stdout
    g.dom.suspend()
    result = json.loads(vf("--json", "thaw", g.name).stdout)["thawed"][0]
    assert result["strategy"] == "offline"
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    before = g.watcher.last_seq()
    g.dom.resume()
    assert_resumed(g, before)
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


@pytest.mark.parametrize("strategy,final_step,point", [
    ("offline", "auto", "offline-saved"),
    ("offline", "auto", "thaw-offline-committed"),
    ("offline", "auto", "offline-before-restore"),
    ("iterative", "auto", "iterative-snapshot"),
    ("iterative", "auto", "iterative-commit-started"),
    ("iterative", "auto", "iterative-paused"),  # the guest is left paused: the next thaw resumes it
    ("iterative", "save", "offline-saved"),
])
def test_killed_in_a_phase_then_thaw_recovers(guest_factory, vf, strategy, final_step, point):
    vf.write_config(iterative_threshold=0, iterative_final_step=final_step)
    g = guest_factory(DISKS)
    vf("freeze", g.name)
    g.watcher.wait_acks(100)
    before = g.watcher.last_seq()
    vf("thaw", "--strategy", strategy, g.name, expect=-signal.SIGKILL,
       env=vf.env(VIRTFREEZE_FAILPOINT=point))
    assert vf.journal(g.uuid).exists()
    if point == "iterative-paused":
        assert g.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    vf("thaw", "--strategy", strategy, g.name)
    assert_resumed(g, before)
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)
