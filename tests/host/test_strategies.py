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


MERGE_PLUGIN = '''
"""A third party's merge, written from virtfreeze.merge_api and hookspecs alone: a live
commit that pauses the guest while it pivots, and notes its own mark in the journal."""
import os

from virtfreeze.hookspecs import hookimpl
from virtfreeze.merge_api import PAUSED, RUNNING
from virtfreeze.model import MergeResult


def _say(line):
    with open(os.environ["MERGE_MARKER"], "a") as fh:
        fh.write(line + "\\n")


@hookimpl(tryfirst=True)
def virtfreeze_merge(merge):
    if merge.strategy != "live" or merge.state() != RUNNING:
        return None
    merge.note(plugin_marks={"careful": "paused"})
    for disk in merge.disks:
        with merge.watch_jobs() as jobs:
            merge.start_commit(disk)
            jobs.wait([disk], "ready")
            merge.pause()
            merge.pivot(disk)
            merge.resume()
        _say(f"merged {merge.domain.name} {disk.target} now on {merge.live_source(disk) == disk.base}")
    if os.environ.get("MERGE_CRASH"):
        merge.pause()
        os.kill(os.getpid(), 9)  # as a crash: the guest stays paused, the mark says so
    return MergeResult("careful-live")


@hookimpl
def virtfreeze_merge_recover(merge):
    if merge.record.plugin_marks.get("careful") == "paused":
        if merge.state() == PAUSED:
            merge.resume()
            _say(f"resumed {merge.domain.name}")
        merge.note(plugin_marks={})
'''


def test_a_third_party_merge_plugin_from_its_own_distribution(guest_factory, vf, tmp_path):
    from tests.host.helpers import install_plugin

    site = install_plugin(tmp_path, "vf-careful-merge", "careful", MERGE_PLUGIN)
    marker = tmp_path / "marker"
    env = vf.env(PYTHONPATH=str(site), MERGE_MARKER=str(marker))
    env.pop("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD")
    g = guest_factory(DISKS)
    vf("freeze", g.name, env=env)
    g.watcher.wait_acks(20)
    out = json.loads(vf("--json", "thaw", g.name, env=env).stdout)
    assert out["thawed"][0]["strategy"] == "careful-live"
    assert marker.read_text().splitlines() == [f"merged {g.name} vda now on True", f"merged {g.name} vdb now on True"]
    assert_back_on_base(g, vf)
    # Killed with the guest paused: the next thaw's recover hook (the plugin's own) resumes it.
    vf("freeze", g.name, env=env)
    vf("thaw", g.name, env=dict(env, MERGE_CRASH="1"), expect=-signal.SIGKILL)
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    assert json.loads(vf.journal(g.uuid).read_text())["plugin_marks"] == {"careful": "paused"}
    vf("thaw", g.name, env=env)
    assert marker.read_text().splitlines()[-1] == f"resumed {g.name}"
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    g.watcher.wait_acks(20, after=time.monotonic())
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def _thaw_held_to(guest_factory, vf, **config):
    """A guest dirtying a new 64 KiB cluster with every write (~9 MiB/s), frozen, then thawed under
    `config` (a commit bandwidth it out-writes); returns (guest, its --json thaw result, the process)."""
    g = guest_factory([DiskSpec("vda", "qcow2", size_mib=64)], stride=128)
    vf.write_config(**config)
    vf("freeze", g.name)
    g.watcher.wait_acks(30)
    out = vf("--json", "thaw", g.name)
    return g, json.loads(out.stdout)["thawed"][0], out


def test_live_commit_held_to_a_bandwidth_the_guest_outwrites_is_lifted_not_paused(guest_factory, vf):
    """A commit held to 1 MiB/s against a guest that dirties ~9 MiB/s never catches up; after twice the
    time its overlay needs at that rate (at least 10 s) the limit is lifted and it pivots with the guest
    running, well before live_converge_timeout would pause it."""
    g, thawed, out = _thaw_held_to(guest_factory, vf, commit_bandwidth=1 << 20, live_converge_timeout=300)
    assert thawed["strategy"] == "live" and thawed["stopped_seconds"] == 0 and not thawed["note"], thawed
    assert f"domain {g.name!r} disk vda: the commit, held to 1 MiB/s, has not caught up" in out.stderr
    assert "lifting the limit" in out.stderr
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    g.watcher.wait_acks(20, after=time.monotonic())
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_auto_live_commit_that_cannot_converge_pauses_the_guest_briefly(guest_factory, vf):
    """Strategy auto: a commit held to 512 KiB/s against a guest that dirties a new 64 KiB cluster with
    every write never becomes ready; after live_converge_timeout the rest is merged with the guest paused."""
    g, thawed, out = _thaw_held_to(guest_factory, vf, commit_bandwidth=512 << 10, live_converge_timeout=3)
    assert thawed["strategy"] == "live" and "did not converge" in (thawed["note"] or ""), thawed
    assert thawed["stopped_seconds"] > 0
    assert "did not catch up with the guest's writes in 3s" in out.stderr
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    g.watcher.wait_acks(20, after=time.monotonic())
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)
