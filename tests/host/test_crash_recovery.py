"""SIGKILL of freeze and thaw at each step, then `thaw`: nothing lost, nothing left."""

from __future__ import annotations

import json
import signal

import pytest

from tests.host.helpers import assert_all_acked_present, assert_back_on_base, disk_sources
from tests.rig.guest import DiskSpec

DISKS = [DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw")]


@pytest.mark.parametrize("point", ["freeze-before-snapshot", "freeze-after-snapshot", "freeze-after-export"])
def test_freeze_killed_then_thaw_recovers(guest_factory, vf, point):
    g = guest_factory(DISKS)
    g.watcher.wait_acks(20)
    killed = vf("freeze", g.name, expect=-signal.SIGKILL, env=vf.env(VIRTFREEZE_FAILPOINT=point))
    assert killed.returncode == -signal.SIGKILL
    assert vf.journal(g.uuid).exists(), "the journal is written before the step that died"
    if point != "freeze-before-snapshot":
        assert vf("status", g.name, expect=3).returncode == 3
    g.watcher.wait_acks(30)
    vf("thaw", g.name)
    assert_back_on_base(g, vf)
    vf("status", g.name)
    assert_all_acked_present(g)


@pytest.mark.parametrize("point", ["thaw-commit-started", "thaw-after-merge", "thaw-before-cleanup"])
def test_thaw_killed_then_thaw_recovers(guest_factory, vf, point):
    g = guest_factory(DISKS)
    vf("freeze", g.name)
    g.watcher.wait_acks(40)
    vf("thaw", g.name, expect=-signal.SIGKILL, env=vf.env(VIRTFREEZE_FAILPOINT=point))
    g.watcher.wait_acks(30)
    out = vf("thaw", g.name)
    if point == "thaw-commit-started":
        assert "resuming the commit of an earlier run" in out.stderr
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_offline_thaw_killed_after_commit_then_thaw_recovers(guest_factory, vf):
    g = guest_factory(DISKS)
    vf("freeze", g.name)
    g.watcher.wait_acks(40)
    g.dom.destroy()
    vf("thaw", g.name, expect=-signal.SIGKILL, env=vf.env(VIRTFREEZE_FAILPOINT="thaw-offline-committed"))
    vf("thaw", g.name)
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_lost_journal_overlays_found_by_name(guest_factory, vf):
    g = guest_factory(DISKS)
    vf("freeze", g.name)
    g.watcher.wait_acks(30)
    vf.journal(g.uuid).unlink()
    status = json.loads(vf("--json", "status", expect=3).stdout)["frozen"]
    assert [r["domain"] for r in status if r["uuid"] == g.uuid] == [g.name]
    out = vf("thaw", g.name)
    assert "no journal" in out.stderr
    assert all(not s.endswith(".virtfreeze.qcow2") for s in disk_sources(g.dom).values())
    assert_back_on_base(g)
    assert_all_acked_present(g)


def test_lost_journal_with_guest_shut_down(guest_factory, vf):
    g = guest_factory(DISKS)
    vf("freeze", g.name)
    g.watcher.wait_acks(30)
    g.dom.destroy()
    vf.journal(g.uuid).unlink()
    vf("thaw", g.name)
    assert_back_on_base(g)
    assert_all_acked_present(g)
