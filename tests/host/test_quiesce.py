"""Quiesce with a real QEMU guest agent: a quiesced freeze archives a clean filesystem, a
crash-consistent one needs journal recovery, and an agent that hangs in its fsfreeze is bounded."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from tests.host.helpers import assert_all_acked_present, assert_back_on_base


@pytest.fixture
def agent_guest(libvirt_conn, tmp_path):
    from tests.rig.guest import create_agent_guest

    made = []

    def make(hook: str = "none"):
        g = create_agent_guest(libvirt_conn, tmp_path / f"agent{len(made)}", hook=hook)
        made.append(g)
        return g

    yield make
    for g in made:
        g.remove()


def e2fsck(image) -> subprocess.CompletedProcess:
    """A read-only full check of an archived filesystem image."""
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)


@pytest.mark.parametrize("quiesce", ["require", "off"])
def test_quiesced_archive_is_clean_and_a_crash_consistent_one_needs_recovery(agent_guest, vf, tmp_path, quiesce):
    g = agent_guest()
    g.watcher.wait_acks(20)
    t_before = time.monotonic()
    out = json.loads(vf("--json", "freeze", "--quiesce", quiesce, g.name).stdout)["frozen"][0]
    assert out["consistency"] == ("quiesced" if quiesce == "require" else "crash")
    archive = tmp_path / "archived.raw"
    shutil.copyfile(vf.export / g.name / "disks" / "vda.raw", archive)  # what a backup tool reads
    g.watcher.wait_acks(20)  # it goes on writing: the filesystem was thawed after the snapshot
    vf("thaw", g.name)
    check = e2fsck(archive)
    if quiesce == "require":
        assert check.returncode == 0 and "recovery" not in check.stdout + check.stderr, check.stdout + check.stderr
    else:
        assert "journal recovery" in check.stdout + check.stderr, check.stdout + check.stderr
    report = g.check("vda", image=archive, until=t_before)
    assert report.checked > 0 and report.ok, report
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_an_agent_that_hangs_in_its_fsfreeze_is_bounded(agent_guest, vf):
    g = agent_guest(hook="block")  # its fsfreeze hook never returns
    vf.write_config(quiesce_timeout=5)
    g.watcher.wait_acks(20)
    out = vf("--json", "freeze", "--quiesce", "require", g.name, expect=1, timeout=120)
    assert "agent" in out.stderr and g.name in out.stderr
    assert not vf.journal(g.uuid).exists()
    g.watcher.wait_acks(20, after=time.monotonic())  # not frozen forever: it goes on writing
    out = vf("--json", "freeze", g.name, timeout=120)  # auto: falls back to crash-consistent, saying why
    assert json.loads(out.stdout)["frozen"][0]["consistency"] == "crash"
    assert "quiesce failed" in out.stderr
    g.watcher.wait_acks(20, after=time.monotonic())
    vf("thaw", g.name)
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)
