"""The contrib recipes, end to end with the real tools: borgmatic 2.x and 1.7
around borg, and the restic wrapper. After each run the archive holds every
write acknowledged before the freeze, the live disks every write at all, and
no VM is left on an overlay, also when the backup tool failed mid-archive."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest
import yaml

from tests.host.helpers import assert_all_acked_present, assert_archive_holds_disks, assert_back_on_base
from tests.rig.guest import SOCKET_DIR, DiskSpec
from tests.rig.guest_image import cache_dir

# A block device (an LVM volume's stand-in) and a qcow2 file: both must reach every archive as data.
DISKS = [DiskSpec("vda", "raw", size_mib=32, block=True), DiskSpec("vdb", "qcow2")]
CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
BORGMATIC = {"2.x": str(Path(sys.executable).parent / "borgmatic"), "1.7": "/usr/bin/borgmatic"}
VIRTFREEZE_BIN = str(Path(sys.executable).parent / "virtfreeze")
ENV = {"BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes", "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}


def retarget(cmd: str, vf, name: str, paths: dict[str, str] | None = None) -> str:
    """The contrib command for this test: its config, this test's domain instead of --all, and this
    test's directories for the recipe's (`paths`: recipe path -> test path)."""
    for recipe_path, test_path in (paths or {}).items():
        cmd = cmd.replace(recipe_path, test_path)
    if not cmd.startswith("virtfreeze "):
        return cmd  # a shell command of the recipe (borgmatic runs them with a shell)
    args = cmd.split()[1:]
    if args[0] == "verify":
        args += ["--seconds", "2"]
    args = [name if a == "--all" else a for a in args]
    if args == ["thaw"]:
        args.append(name)
    return " ".join(shlex.quote(a) for a in [VIRTFREEZE_BIN, "--config", str(vf.config_path), *args])


def borgmatic_config(version: str, vf, name: str, repo: Path, tmp_path: Path) -> Path:
    # The verify step's throwaway domain has its serial socket beside the guest's.
    vf.write_config(restore_directories=sorted({*vf.config.get("restore_directories", []), str(SOCKET_DIR),
                                                str(cache_dir())}))
    cfg = yaml.safe_load((CONTRIB / "borgmatic" / f"borgmatic-{version}.yaml").read_text())
    if version == "2.x":
        cfg["source_directories"] = [str(vf.export)]
        cfg["repositories"] = [{"path": str(repo), "label": "vms"}]
        paths = {"/var/backups/vms.borg": str(repo), "/var/tmp/vms-verify": str(tmp_path / "vms-verify"),
                 "/run/virtfreeze/export": str(vf.export)}
        for hook in cfg["commands"]:
            hook["run"] = [retarget(c, vf, name, paths) for c in hook["run"]]
        cfg["user_runtime_directory"] = str(tmp_path / "borgmatic-run")
        cfg["borgmatic_source_directory"] = str(tmp_path / "borgmatic-src")
    else:
        cfg["location"]["source_directories"] = [str(vf.export)]
        cfg["location"]["repositories"] = [str(repo)]
        cfg["location"]["borgmatic_source_directory"] = str(tmp_path / "borgmatic-src")
        cfg["hooks"] = {k: [retarget(c, vf, name) for c in v] for k, v in cfg["hooks"].items()}
    # The recipe's local_path: borg through contrib's borg-behind-guests, with this test's virtfreeze and config.
    behind = tmp_path / "borg-behind-guests"
    behind.write_text(f"#!/bin/sh\nVIRTFREEZE={shlex.quote(VIRTFREEZE_BIN)} "
                      f"VIRTFREEZE_CONFIG={shlex.quote(str(vf.config_path))} "
                      f"exec {shlex.quote(str(CONTRIB / 'borgmatic' / 'borg-behind-guests'))} \"$@\"\n")
    behind.chmod(0o755)
    section = cfg if version == "2.x" else cfg["location"]
    assert section["local_path"] == "/usr/local/sbin/borg-behind-guests"
    section["local_path"] = str(behind)
    path = tmp_path / f"borgmatic-{version}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def borgmatic(version: str, config: Path, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([BORGMATIC[version], "-c", str(config), *args], capture_output=True, text=True,
                          env=dict(os.environ, **ENV))
    if expect_ok:
        assert proc.returncode == 0, f"borgmatic {args}: {proc.stdout}\n{proc.stderr}"
    return proc


def init_repo(version: str, config: Path) -> None:
    if version == "2.x":
        borgmatic(version, config, "repo-create", "--encryption", "none")
    else:
        borgmatic(version, config, "init", "--encryption", "none")


def extract_latest(repo: Path, dest: Path) -> Path:
    env = dict(os.environ, **ENV)
    last = subprocess.run(["borg", "list", "--short", "--last", "1", str(repo)], check=True, capture_output=True,
                          text=True, env=env).stdout.split()[-1]
    dest.mkdir()
    subprocess.run(["borg", "extract", f"{repo}::{last}"], check=True, cwd=dest, env=env)
    return dest


def check_archive(g, extracted: Path, t_before: float) -> None:
    """The archived images are whole, sound and hold every write acknowledged before the freeze."""
    export = next(p for p in extracted.rglob("manifest.json") if g.name in str(p)).parent
    assert_archive_holds_disks(g, export, t_before)


@pytest.mark.parametrize("version", ["2.x", "1.7"])
def test_borgmatic_create_freezes_and_thaws(guest_factory, vf, tmp_path, version):
    g = guest_factory(DISKS)
    repo = tmp_path / "repo.borg"
    config = borgmatic_config(version, vf, g.name, repo, tmp_path)
    init_repo(version, config)
    g.watcher.wait_acks(30)
    t_before = time.monotonic()
    out = borgmatic(version, config, "create")
    g.watcher.wait_acks(30, after=time.monotonic())
    assert_back_on_base(g, vf)
    if version == "2.x":  # its recipe's verify step ran: the archive restored and ran, and nothing is left
        assert f"verified {g.name} from " in out.stdout + out.stderr, out.stdout + out.stderr
        assert not (tmp_path / "vms-verify").exists()
        assert not [d for d in libvirt.open("qemu:///system").listAllDomains(0)
                    if d.name().startswith(f"verify-{g.name}-")]
    check_archive(g, extract_latest(repo, tmp_path / "extracted"), t_before)
    assert_all_acked_present(g)
    del out


@pytest.mark.parametrize("version", ["2.x", "1.7"])
def test_borg_failing_mid_archive_still_thaws(guest_factory, vf, tmp_path, version):
    g = guest_factory([DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw", size_mib=32)], start=False)
    with open(g.disks["vdb"], "r+b") as fh:  # incompressible data that cannot fit in the repository
        fh.seek(8 << 20)
        fh.write(os.urandom(24 << 20))
    g.start()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], check=True)
    try:
        repo = small / "repo.borg"
        config = borgmatic_config(version, vf, g.name, repo, tmp_path)
        init_repo(version, config)
        g.watcher.wait_acks(30)
        proc = borgmatic(version, config, "create", expect_ok=False)
        assert proc.returncode != 0, "borg should have run out of space"
        assert "No space left" in proc.stdout + proc.stderr or "space" in (proc.stdout + proc.stderr).lower()
    finally:
        subprocess.run(["umount", str(small)], check=True)
    g.watcher.wait_acks(30, after=time.monotonic())
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


@pytest.mark.parametrize("restic_ok", [True, False], ids=["restic-ok", "restic-fails"])
def test_restic_wrapper(guest_factory, vf, tmp_path, restic_ok):
    g = guest_factory(DISKS)
    repo = tmp_path / "repo.restic"
    env = dict(os.environ, RESTIC_REPOSITORY=str(repo), RESTIC_PASSWORD="test", VIRTFREEZE=VIRTFREEZE_BIN,
               VIRTFREEZE_CONFIG=str(vf.config_path), VIRTFREEZE_EXPORT=str(vf.export),
               VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD="1")
    subprocess.run(["restic", "-q", "init"], check=True, env=env, capture_output=True)
    if not restic_ok:
        env["RESTIC"] = "false"
    g.watcher.wait_acks(30)
    t_before = time.monotonic()
    proc = subprocess.run([str(CONTRIB / "restic" / "restic-backup-vms"), g.name], capture_output=True, text=True,
                          env=env)
    assert (proc.returncode == 0) == restic_ok, proc.stderr
    g.watcher.wait_acks(30, after=time.monotonic())
    assert_back_on_base(g, vf)
    if restic_ok:
        snaps = json.loads(subprocess.run(["restic", "snapshots", "--json"], check=True, env=env,
                                          capture_output=True, text=True).stdout)
        assert snaps and "virtfreeze" in snaps[-1]["tags"]
        dest = tmp_path / "restored"
        subprocess.run(["restic", "-q", "restore", "latest", "--target", str(dest)], check=True, env=env)
        check_archive(g, dest, t_before)
    assert_all_acked_present(g)
