"""A freeze belongs to the run (process session) that made it: overlapping runs share one freeze,
the merge waits for the last live holder, and a run that died holds nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.host.helpers import assert_all_acked_present, assert_archive_holds_disks, assert_back_on_base, disk_sources
from tests.host.test_contrib import (
    BORGMATIC, CONTRIB, ENV, VIRTFREEZE_BIN, borgmatic_config, extract_latest, init_repo,
)
from tests.host.conftest import VF
from tests.rig.guest import DiskSpec

from virtfreeze.export_view import mounts_under

DISKS = [DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw")]


class Gate:
    """Two FIFOs: the held process says "here" on one and waits for "go" on the other."""

    def __init__(self, directory: Path):
        self.here, self.go = directory / "here.fifo", directory / "go.fifo"
        os.mkfifo(self.here)
        os.mkfifo(self.go)
        self.arrived = threading.Event()
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        with open(self.here) as fh:  # blocks until the held process opens it to write
            if fh.readline():
                self.arrived.set()

    def wait(self, timeout: float) -> None:
        assert self.arrived.wait(timeout), "the held process never arrived"

    def release(self) -> None:
        with open(self.go, "w") as fh:  # it waits reading this FIFO
            fh.write("go\n")


def on_overlay(g) -> bool:
    return any(s.endswith(".virtfreeze.qcow2") for s in disk_sources(g.dom).values())


def test_overlapping_borgmatic_and_restic_runs_share_one_freeze(guest_factory, vf, tmp_path):
    g = guest_factory(DISKS)
    gate = Gate(tmp_path)
    # Run A, borgmatic 2.x from contrib, whose borg create waits at the gate: a long archive window.
    held_borg = tmp_path / "borg-held"
    # (borgmatic first runs `borg create --dry-run --list` to find special files: that one passes)
    held_borg.write_text('#!/bin/sh\ncase " $* " in\n  *" --dry-run "*) ;;\n'
                         f'  *" create "*) echo here > {gate.here}; read go < {gate.go} ;;\nesac\nexec borg "$@"\n')
    held_borg.chmod(0o755)
    repo = tmp_path / "repo.borg"
    config = borgmatic_config("2.x", vf, g.name, repo, tmp_path)
    init_repo("2.x", config)
    cfg = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump(dict(cfg, local_path=str(held_borg))))
    g.watcher.wait_acks(20)
    t_before_a = time.monotonic()
    run_a = subprocess.Popen([BORGMATIC["2.x"], "-c", str(config), "create"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, **ENV), start_new_session=True)
    try:
        gate.wait(120)
        manifest_a = json.loads((vf.export / g.name / "manifest.json").read_text())
        g.watcher.wait_acks(20)
        # Run B, the restic wrapper, in its own session, from start to end while A archives.
        restic_env = dict(os.environ, RESTIC_REPOSITORY=str(tmp_path / "repo.restic"), RESTIC_PASSWORD="test",
                          VIRTFREEZE=VIRTFREEZE_BIN, VIRTFREEZE_CONFIG=str(vf.config_path),
                          VIRTFREEZE_EXPORT=str(vf.export), VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD="1")
        subprocess.run(["restic", "-q", "init"], check=True, env=restic_env, capture_output=True)
        run_b = subprocess.run([str(CONTRIB / "restic" / "restic-backup-vms"), g.name], capture_output=True,
                               text=True, env=restic_env, start_new_session=True)
        assert run_b.returncode == 0, run_b.stderr
        assert "shared with" in run_b.stdout and f"left frozen {g.name}" in run_b.stdout, run_b.stdout
        # B's thaw left the domain to A: still frozen, its view still there for A's borg.
        assert on_overlay(g) and (vf.export / g.name / "disks" / "vda.qcow2").exists()
        status = json.loads(vf("--json", "status", g.name, expect=3).stdout)["frozen"][0]
        assert [h["sid"] for h in status["holders"]] == [run_a.pid] and status["holders"][0]["alive"]
        g.watcher.wait_acks(20)
    finally:
        gate.release()
        out, err = run_a.communicate(timeout=300)
    assert run_a.returncode == 0, err
    g.watcher.wait_acks(20, after=time.monotonic())
    assert_back_on_base(g, vf)  # merged by A's thaw, the last holder's
    # Both archives are of the one freeze and hold every record acknowledged before it.
    assert_archive_holds_disks(g, extract_latest(repo, tmp_path / "from-borg") / str(vf.export).lstrip("/") / g.name,
                               t_before_a)
    dest = tmp_path / "from-restic"
    subprocess.run(["restic", "-q", "restore", "latest", "--target", str(dest)], check=True, env=restic_env)
    export_b = dest / str(vf.export).lstrip("/") / g.name
    assert json.loads((export_b / "manifest.json").read_text())["frozen_at"] == manifest_a["frozen_at"]
    assert_archive_holds_disks(g, export_b, t_before_a)
    assert_all_acked_present(g)


def hold(vf_run, gate: Gate, *names: str) -> subprocess.Popen:
    """A run of its own (a new session) that freezes `names` with `vf_run`'s config and waits at `gate`."""
    proc = subprocess.Popen(
        ["sh", "-c", f'c=$1; shift; "$0" --config "$c" freeze "$@" && echo here > {gate.here} && read go < {gate.go}',
         VIRTFREEZE_BIN, str(vf_run.config_path), *names],
        env=vf_run.env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        gate.wait(120)
    except BaseException:
        kill(proc)
        raise
    return proc


def kill(run: subprocess.Popen) -> None:
    """The run dies without a thaw of its own."""
    if run.poll() is None:
        os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=60)


@pytest.mark.exclusive  # a bare `thaw` looks at every frozen domain on the host
def test_a_bare_thaw_leaves_a_live_holder_alone_and_merges_a_dead_ones(guest_factory, vf, tmp_path):
    g, g2 = guest_factory(DISKS), guest_factory([DiskSpec("vda")])
    holder = hold(vf, Gate(tmp_path), g.name, g2.name)
    try:
        out = vf("thaw")  # another run's bare thaw, as an after-hook would run it
        assert f"left frozen {g.name}: still held by run of session {holder.pid}" in out.stdout, out.stdout
        assert on_overlay(g) and on_overlay(g2) and vf.journal(g.uuid).exists()
        rows = {r["domain"]: r for r in json.loads(vf("status", "--json", expect=3).stdout)["frozen"]}
        assert [(h["sid"], h["alive"]) for h in rows[g.name]["holders"]] == [(holder.pid, True)]
        vf("thaw", "--force", g2.name)  # the documented way to merge anyway
        assert_back_on_base(g2, vf)
        kill(holder)  # the holding run dies (no thaw of its own)
        rows = {r["domain"]: r for r in json.loads(vf("status", "--json", expect=3).stdout)["frozen"]}
        assert [(h["sid"], h["alive"]) for h in rows[g.name]["holders"]] == [(holder.pid, False)]
        g.watcher.wait_acks(20)
        out = vf("thaw")
        assert f"thawed {g.name} (live" in out.stdout, out.stdout
    finally:
        kill(holder)
    for guest in (g, g2):
        assert_back_on_base(guest, vf)
        assert_all_acked_present(guest)


def test_two_configs_leave_each_others_live_freezes_alone_and_take_over_dead_ones(guest_factory, vf, tmp_path):
    """Two configs (two state directories, so two journals) on one host: neither's thaw nor freeze
    merges a freeze the other's live run holds (that would change the base under its archive); a
    freeze whose run died is taken over whole: its record, export view and merge."""
    g = guest_factory(DISKS)
    (tmp_path / "b").mkdir()
    (tmp_path / "gate-b").mkdir()
    b = VF(tmp_path / "b")  # its own state and export directories
    index_entry = Path("/run/virtfreeze/journals") / g.uuid
    run_a = hold(vf, Gate(tmp_path), g.name)
    run_b = None
    try:
        # A's live run holds it: B leaves it alone.
        out = b("thaw", g.name)
        assert f"left frozen {g.name}: still held by run of session {run_a.pid}" in out.stdout, out.stdout
        assert f"with state_directory {vf.state}" in out.stdout, out.stdout
        line = b("freeze", g.name, expect=4).stderr.strip().splitlines()[-1]
        assert f"domain '{g.name}'" in line and f"state_directory {vf.state}" in line, line
        rows = json.loads(b("status", "--json", g.name, expect=3).stdout)["frozen"]
        assert rows[0]["journal_elsewhere"] == str(vf.state)
        assert [(h["sid"], h["alive"]) for h in rows[0]["holders"]] == [(run_a.pid, True)]
        assert on_overlay(g), "another config's run merged a live freeze"

        # A's run dies. B's next run takes the freeze over (merges it, removes A's view and record), then
        # freezes anew; now A leaves B's live freeze alone, even though A's config froze it first.
        kill(run_a)
        g.watcher.wait_acks(20)
        run_b = hold(b, Gate(tmp_path / "gate-b"), g.name)
        assert not vf.journal(g.uuid).exists() and not (vf.export / g.name).exists()
        assert mounts_under(vf.export) == [] and (b.export / g.name / "manifest.json").exists()
        assert index_entry.read_text() == str(b.journal(g.uuid))
        out = vf("thaw", g.name)
        assert f"left frozen {g.name}: still held by run of session {run_b.pid}" in out.stdout, out.stdout
        assert f"with state_directory {b.state}" in out.stdout, out.stdout
        vf("freeze", g.name, expect=4)
        assert on_overlay(g)

        # --force merges anyway, and takes the whole freeze: B's view and record go too.
        g.watcher.wait_acks(20)
        out = vf("thaw", "--force", g.name)
        assert f"thawed {g.name} (live" in out.stdout, out.stdout
        assert not b.journal(g.uuid).exists() and mounts_under(b.export) == [] and not (b.export / g.name).exists()
        assert not index_entry.exists()
    finally:
        kill(run_a)
        if run_b is not None:
            kill(run_b)
        b.undo_views()  # the vf fixture undoes A's
    assert b("thaw", g.name).stdout == f"{g.name}: nothing frozen\n"
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)
