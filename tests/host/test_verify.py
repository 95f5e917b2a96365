"""`virtfreeze verify` with real guests and real borg/restic: a good archive runs as a throwaway domain
beside the original and leaves nothing; a bad one fails with one line and leaves nothing; so does a
verify killed half-way, after the next command."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time

import libvirt

from tests.host.conftest import VIRTFREEZE
from tests.host.helpers import sha256
from tests.host.test_restore import back_up, setup
from tests.rig.acks import max_gap
from tests.rig.guest import DiskSpec


def verify_domains(conn, original: str) -> list[str]:
    """The verify domains of this test's guest (other tests verify theirs meanwhile)."""
    return [d.name() for d in conn.listAllDomains(0) if d.name().startswith(f"verify-{original}-")]


def assert_nothing_left(vf, conn, original: str) -> None:
    assert not verify_domains(conn, original), verify_domains(conn, original)
    left = list((vf.state / "verify").rglob("*")) if (vf.state / "verify").exists() else []
    assert not left, left
    assert not list((vf.state / "restores").glob("*")) if (vf.state / "restores").exists() else True


def test_a_good_archive_with_memory_verifies_beside_the_running_original(guest_factory, vf, tmp_path, libvirt_conn):
    g = guest_factory([DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw", writes=False)])
    env = setup(vf, tmp_path, g)
    back_up(vf, env, g, "--memory", "--target", "borg")
    quiet, inodes = sha256(g.disks["vdb"]), {p: os.stat(p).st_ino for p in g.disks.values()}
    t0 = time.monotonic()
    out = vf("--json", "verify", g.name, "--target", "borg", "--seconds", "5", env=env)
    t1 = time.monotonic()
    [r] = json.loads(out.stdout)["verified"]
    assert r["ok"] and r["how"] == "resumed from memory" and r["verify_domain"].startswith(f"verify-{g.name}-"), r
    assert any(c.startswith("ran 5s") for c in r["checks"]) and r["restore_seconds"] < r["seconds"]
    # The original kept running and writing throughout, on its own files.
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    acks = g.watcher.snapshot()
    assert sum(t0 < a.t < t1 for a in acks) > 10
    assert max_gap(acks, t0, t1) < 5.0  # no stall of the original (a usual gap is tens of milliseconds)
    assert sha256(g.disks["vdb"]) == quiet and {p: os.stat(p).st_ino for p in g.disks.values()} == inodes
    assert_nothing_left(vf, libvirt_conn, g.name)


def test_an_archive_without_memory_from_restic_cold_boots(guest_factory, vf, tmp_path, libvirt_conn):
    g = guest_factory([DiskSpec("vda", "qcow2")])
    env = setup(vf, tmp_path, g)
    back_up(vf, env, g, "--no-memory", "--target", "restic")
    out = vf("verify", g.name, "--target", "restic", "--seconds", "3", env=env)
    assert out.stdout.startswith(f"verified {g.name} from restic:") and "cold boot" in out.stdout, out.stdout
    assert "network: interfaces removed" in out.stdout
    assert_nothing_left(vf, libvirt_conn, g.name)


def test_a_bad_archive_fails_with_one_line_and_leaves_nothing(guest_factory, vf, tmp_path, libvirt_conn):
    g = guest_factory([DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw")], boot_check=True)
    env = setup(vf, tmp_path, g)
    back_up(vf, env, g, "--no-memory", "--target", "dir")
    [archive] = [p for p in (tmp_path / "dir-target").iterdir() if not p.name.startswith(".")]

    # A check command that says no.
    out = vf("verify", g.name, "--target", "dir", "--seconds", "1", "--check-command",
             "sh -c 'echo \"no answer from $VIRTFREEZE_VERIFY_DOMAIN\" >&2; exit 1'", env=env, expect=1)
    assert out.stdout.startswith(f"FAILED {g.name}") and "--check-command exited 1: no answer from verify-" in out.stdout
    assert_nothing_left(vf, libvirt_conn, g.name)

    # A disk that holds garbage where the guest's own boot check looks (its checksums made to match,
    # as when the source disk itself was damaged): the guest powers off, the verify fails.
    image = archive / "disks" / "vdb.raw"
    with open(image, "r+b") as fh:
        fh.write(b"\xde\xad" * 256)
    sums = archive / "SHA256SUMS"
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    sums.write_text("".join(f"{digest}  disks/vdb.raw\n" if line.endswith("  disks/vdb.raw") else f"{line}\n"
                            for line in sums.read_text().splitlines()))
    out = vf("--json", "verify", g.name, "--target", "dir", "--seconds", "30", env=env, expect=1)
    [r] = json.loads(out.stdout)["verified"]
    assert not r["ok"] and re.search(r"it (shut down|stopped|crashed) within 30s of starting \(cold boot\)", r["error"]), r
    assert_nothing_left(vf, libvirt_conn, g.name)
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING  # the original, untouched


def test_a_verify_killed_half_way_leaves_nothing_after_the_next_command(guest_factory, vf, tmp_path, libvirt_conn):
    g = guest_factory([DiskSpec("vda", "qcow2")])
    env = setup(vf, tmp_path, g)
    back_up(vf, env, g, "--memory", "--target", "dir")
    proc = subprocess.Popen([*VIRTFREEZE, "--config", str(vf.config_path), "verify", g.name, "--target", "dir"],
                            env=dict(env, VIRTFREEZE_FAILPOINT="verify-running:stop"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.waitid(os.P_PID, proc.pid, os.WSTOPPED)  # its throwaway domain runs: kill it there
    [name] = verify_domains(libvirt_conn, g.name)
    assert libvirt_conn.lookupByName(name).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    vf("status", g.name, env=env)  # the next command, whatever it is (here: of this domain only)
    assert_nothing_left(vf, libvirt_conn, g.name)
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_backup_verify_proves_each_new_archive(guest_factory, vf, tmp_path, libvirt_conn):
    g = guest_factory([DiskSpec("vda", "qcow2")])
    env = setup(vf, tmp_path, g)
    g.watcher.wait_acks(10)
    out = json.loads(vf("--json", "backup", "--memory", "--target", "dir", "--target", "borg", "--verify",
                        "--verify-seconds", "2", g.name, env=env).stdout)
    assert out["backups"][0]["ok"]
    verified = {v["source"].split(":")[0]: v for v in out["verified"]}
    assert set(verified) == {"dir", "borg"} and all(v["ok"] for v in verified.values()), out["verified"]
    assert all(v["how"] == "resumed from memory" for v in verified.values())
    assert_nothing_left(vf, libvirt_conn, g.name)


def test_a_guest_with_an_agent_must_answer_its_ping(libvirt_conn, vf, tmp_path):
    from tests.rig.guest import create_agent_guest

    g = create_agent_guest(libvirt_conn, tmp_path / "agent")
    try:
        env = setup(vf, tmp_path, g)
        back_up(vf, env, g, "--memory", "--target", "dir")
        [r] = json.loads(vf("--json", "verify", g.name, "--target", "dir", "--seconds", "2", env=env).stdout)["verified"]
        assert r["ok"] and "guest agent answered a ping" in r["checks"], r
        assert_nothing_left(vf, libvirt_conn, g.name)
    finally:
        g.remove()
