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


@pytest.mark.parametrize("strategy", ["live", "iterative", "offline"])
def test_strategy_keeps_every_write_and_the_guest_running(guest_factory, vf, strategy):
    vf.write_config(iterative_threshold=0)
    g = guest_factory(DISKS)
    vf("freeze", g.name)
    g.watcher.wait_acks(200)
    status = json.loads(vf("--json", "status", g.name, expect=3).stdout)["frozen"][0]
    assert status["strategy"] == "live" and "auto" in status["strategy_reason"]
    before = g.watcher.last_seq()
    result = json.loads(vf("--json", "thaw", "--strategy", strategy, g.name).stdout)["thawed"][0]
    assert result["strategy"] == strategy
    if strategy == "live":
        assert result["stopped_seconds"] == 0 and result["offline_bytes"] == 0
    else:
        assert result["stopped_seconds"] > 0 and result["offline_bytes"] > 0
    if strategy == "iterative":
        assert result["rounds"] >= 1
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


@pytest.mark.parametrize("strategy,point", [
    ("offline", "offline-saved"),
    ("offline", "thaw-offline-committed"),
    ("offline", "offline-before-restore"),
    ("iterative", "iterative-snapshot"),
    ("iterative", "iterative-commit-started"),
    ("iterative", "offline-saved"),
])
def test_killed_in_a_phase_then_thaw_recovers(guest_factory, vf, strategy, point):
    vf.write_config(iterative_threshold=0)
    g = guest_factory(DISKS)
    vf("freeze", g.name)
    g.watcher.wait_acks(100)
    before = g.watcher.last_seq()
    vf("thaw", "--strategy", strategy, g.name, expect=-signal.SIGKILL,
       env=vf.env(VIRTFREEZE_FAILPOINT=point))
    assert vf.journal(g.uuid).exists()
    vf("thaw", "--strategy", strategy, g.name)
    assert_resumed(g, before)
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)
