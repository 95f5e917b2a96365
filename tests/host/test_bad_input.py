"""Bad input and faults: one clear line naming the domain or path, a distinct
exit code, nothing left half-frozen, and every acknowledged write kept."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time


from tests.host.conftest import VIRTFREEZE
from tests.host.helpers import assert_all_acked_present, assert_back_on_base, overlays_left
from tests.rig.guest import SOCKET_DIR, DiskSpec


def one_error_line(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("virtfreeze: error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    return errors[0]


def assert_nothing_frozen(g, vf) -> None:
    assert not vf.journal(g.uuid).exists()
    assert_back_on_base(g, vf)


def test_unknown_domain_and_empty_glob_exit_2(guest_factory, vf):
    line = one_error_line(vf("freeze", "no-such-domain-xyz", expect=2).stderr)
    assert "'no-such-domain-xyz'" in line and "virsh list --all" in line
    line = one_error_line(vf("freeze", "no-such-*-glob", expect=2).stderr)
    assert "'no-such-*-glob'" in line
    assert one_error_line(vf("freeze", expect=2).stderr)  # nothing selected at all
    line = one_error_line(vf("thaw", "no-such-domain-xyz", expect=2).stderr)
    assert "no-such-domain-xyz" in line


def test_bad_config_names_the_key(vf):
    vf.write_config(overlay_dirctory="/tmp")
    line = one_error_line(vf("freeze", "--all", expect=2).stderr)
    assert "'overlay_dirctory'" in line and str(vf.config_path) in line
    vf.config.pop("overlay_dirctory")
    vf.write_config(domains={"web": {"exclude_disk": ["vdb"]}})
    line = one_error_line(vf("status", expect=2).stderr)
    assert "'exclude_disk'" in line and "domains.web" in line


def test_domain_with_network_disk(guest_factory, vf, tmp_path):
    image = tmp_path / "nbd.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    sock = SOCKET_DIR / f"nbd-{os.getpid()}-{time.monotonic_ns()}.sock"
    pidfile = sock.with_suffix(".pid")
    # --fork: the parent exits once the server listens, so no waiting on the socket is needed.
    subprocess.run(["qemu-nbd", "--fork", "--persistent", "--pid-file", str(pidfile), "-k", str(sock),
                    "-f", "qcow2", str(image)], check=True, timeout=60)
    try:
        g = guest_factory([DiskSpec("vda"), DiskSpec("vdb", nbd_socket=sock, writes=False)])
        out = vf("--json", "freeze", g.name)
        frozen = json.loads(out.stdout)["frozen"][0]
        assert list(frozen["disks"]) == ["vda"]
        assert "network disks are not supported" in frozen["skipped"]["vdb"]
        assert f"domain '{g.name}' disk vdb: left out" in out.stderr
        g.watcher.wait_acks(20)
        vf("thaw", g.name)
        assert_back_on_base(g, vf)
        assert_all_acked_present(g)
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)


def test_overlay_directory_missing(guest_factory, vf, tmp_path):
    g = guest_factory([DiskSpec("vda")])
    missing = tmp_path / "no-such-dir"
    vf.write_config(overlay_directory=str(missing))
    line = one_error_line(vf("freeze", g.name, expect=2).stderr)
    assert str(missing) in line and g.name in line and "overlay_directory" in line
    assert_nothing_frozen(g, vf)
    assert_all_acked_present(g)


def test_overlay_directory_full(guest_factory, vf, tmp_path):
    g = guest_factory([DiskSpec("vda"), DiskSpec("vdb", "raw")])
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(full)], check=True)
    try:
        vf.write_config(overlay_directory=str(full))
        line = one_error_line(vf("freeze", g.name, expect=1).stderr)
        assert g.name in line
        assert_nothing_frozen(g, vf)
        assert overlays_left(full) == []
    finally:
        subprocess.run(["umount", str(full)], check=True)
    g.watcher.wait_acks(10)
    assert_all_acked_present(g)


def test_memory_directory_too_small_for_the_image(guest_factory, vf, tmp_path):
    """A memory image that does not fit (a tmpfs too small): the freeze fails naming the domain, the guest
    runs on its own disks, nothing is left in the memory directory."""
    g = guest_factory([DiskSpec("vda"), DiskSpec("vdb", "raw")])
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        vf.write_config(memory_directory=str(small / "memory"))
        line = one_error_line(vf("freeze", "--memory", g.name, expect=1).stderr)
        assert g.name in line and "No space left on device" in line and "set memory_directory elsewhere" in line
        assert_nothing_frozen(g, vf)
        assert list((small / "memory").iterdir()) == []  # neither the image nor its directory
    finally:
        subprocess.run(["umount", str(small)], check=True)
    g.watcher.wait_acks(10)
    assert_all_acked_present(g)


def test_domain_held_by_another_run(guest_factory, vf):
    g = guest_factory([DiskSpec("vda")])
    vf.write_config(lock_wait=0.5)
    lock = f"/run/virtfreeze/locks/{g.uuid}.lock"
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        line = one_error_line(vf("freeze", g.name, expect=4).stderr)
        assert g.name in line and "another virtfreeze run" in line and "waited 0.5s" in line
        assert_nothing_frozen(g, vf)
    vf("freeze", g.name)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        one_error_line(vf("thaw", g.name, expect=4).stderr)
    # A run that holds it for a moment only (e.g. a bare thaw of another schedule) is waited for.
    vf.write_config(lock_wait=60)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        waiting = subprocess.Popen([*VIRTFREEZE, "--config", str(vf.config_path), "thaw", g.name],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=vf.env())
        for line in waiting.stderr:  # it says when it starts waiting
            if "waiting up to 60s" in line:
                break
    assert waiting.wait(timeout=120) == 0  # the lock was let go: it went on
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_name_with_spaces_quotes_and_shell_metacharacters(guest_factory, vf, tmp_path):
    name = "vf t \"q\" 'x' dömäin $(touch PWNED); `touch PWNED2` &|<>*"
    g = guest_factory([DiskSpec("vda")], name=name)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = vf.env()
    for args in (["freeze", name], ["status", name], ["thaw", name]):
        proc = subprocess.run([*VIRTFREEZE, "--config", str(vf.config_path), *args],
                              capture_output=True, text=True, env=env, cwd=cwd)
        assert proc.returncode in (0, 3), proc.stderr
        if args[0] == "freeze":
            assert (vf.export / name / "disks" / "vda.qcow2").exists()
            assert name in (vf.export / "paths.txt").read_text()
    assert list(cwd.iterdir()) == [], "a shell ran something"
    assert not any(p.name.startswith("PWNED") for p in tmp_path.rglob("PWNED*"))
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_user_libvirt_refuses(guest_factory, vf, tmp_path):
    g = guest_factory([DiskSpec("vda")])
    nobody = shutil.which("setpriv")
    assert nobody, "setpriv (util-linux) is needed"
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           *VIRTFREEZE, "--connect", "qemu:///system", "freeze", g.name],
                          capture_output=True, text=True, env=vf.env())
    assert proc.returncode == 5, proc.stderr
    line = one_error_line(proc.stderr)
    assert "qemu:///system" in line and "run as root" in line
    assert_nothing_frozen(g, vf)


def test_one_domain_failing_leaves_the_others_whole(guest_factory, vf):
    good = guest_factory([DiskSpec("vda")])
    bad = guest_factory([DiskSpec("vda")])
    vf.write_config(domains={bad.name: {"quiesce": "require"}})
    out = vf("--json", "freeze", good.name, bad.name, expect=2)
    result = json.loads(out.stdout)
    assert [r["name"] for r in result["frozen"]] == [good.name]
    assert [e["domain"] for e in result["errors"]] == [bad.name]
    assert "guest agent" in result["errors"][0]["message"]
    assert_nothing_frozen(bad, vf)
    good.watcher.wait_acks(20)
    vf("thaw", good.name)
    for g in (good, bad):
        assert_back_on_base(g, vf)
        assert_all_acked_present(g)
