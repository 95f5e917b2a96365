"""`virtfreeze backup` to borg, restic and directory targets at once, and plugins
from a third-party distribution."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.host.conftest import VIRTFREEZE
from tests.host.helpers import (
    assert_all_acked_present, assert_archive_holds_disks, assert_back_on_base, blkio_written, install_plugin,
    on_a_terminal,
)
from tests.rig.guest import DiskSpec

from virtfreeze import priority
from virtfreeze.export_view import image_size, is_block_device
from virtfreeze.model import DomainRef
from virtfreeze.plugins import get_plugin_manager
from virtfreeze.targets import load_targets


def targets_config(tmp_path: Path) -> dict:
    (tmp_path / "dir-target").mkdir()
    (tmp_path / "restic.pass").write_text("test-password\n")
    subprocess.run(["borg", "init", "-e", "repokey", str(tmp_path / "repo.borg")], check=True,
                   env=dict(os.environ, BORG_PASSPHRASE="borg-secret"), capture_output=True)
    subprocess.run(["restic", "-q", "init"], check=True, capture_output=True,
                   env=dict(os.environ, RESTIC_REPOSITORY=str(tmp_path / "repo.restic"), RESTIC_PASSWORD="test-password"))
    return {
        "borg": {"type": "borg", "repository": str(tmp_path / "repo.borg"), "compression": "lz4",
                 "passphrase_env": "TEST_BORG_PASSPHRASE"},
        "restic": {"type": "restic", "repository": str(tmp_path / "repo.restic"),
                   "password_file": str(tmp_path / "restic.pass")},
        "dir": {"type": "directory", "path": str(tmp_path / "dir-target")},
    }


def test_backup_two_domains_to_three_targets(guest_factory, vf, tmp_path):
    # One on block devices (a raw and a qcow2 LV stand-in) and a qcow2 file, one on a qcow2 and a raw file.
    guests = [guest_factory([DiskSpec("vda", "raw", size_mib=32, block=True), DiskSpec("vdb", "qcow2"),
                             DiskSpec("vdc", "qcow2", block=True)]),
              guest_factory([DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw")])]
    # The archive's writes to the images' disk limited (so fast a limit that it does not slow the test).
    write_bps = 4 << 30
    vf.write_config(targets=targets_config(tmp_path), archive_priority={"write_bps": write_bps})
    [images_disk] = priority.disks_under(tmp_path)

    def written() -> int:  # through the limit onto the images' disk, by every group of this rate
        return sum(blkio_written(g, images_disk)
                   for g in Path("/sys/fs/cgroup/blkio").glob(f"virtfreeze-archive-write-{write_bps}-*"))

    written_before = written()
    env = dict(vf.env(TEST_BORG_PASSPHRASE="borg-secret"))
    env.pop("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD")  # the targets are entry-point plugins
    for g in guests:
        g.watcher.wait_acks(30)
    t_before = time.monotonic()
    out = vf("--json", "backup", "--jobs", "2", *[g.name for g in guests], env=env)
    # borg's, restic's and the directory copy's writes went through the limit: at least the copy's own blocks
    copied = sum(os.lstat(Path(root) / f).st_blocks * 512
                 for root, _dirs, files in os.walk(tmp_path / "dir-target") for f in files)
    assert written() - written_before >= copied > 0
    assert "borg-secret" not in out.stdout + out.stderr
    results = {r["name"]: r for r in json.loads(out.stdout)["backups"]}
    assert set(results) == {g.name for g in guests}
    for g in guests:
        r = results[g.name]
        assert r["ok"] and {a["target"] for a in r["archives"]} == {"borg", "restic", "dir"}
        assert all(a["verified"] for a in r["archives"]), r["archives"]
        data = sum(image_size(p) for p in g.disks.values() if is_block_device(p))
        assert all(a["bytes"] >= data for a in r["archives"]), (data, r["archives"])
        assert r["strategy"] == "live"
        g.watcher.wait_acks(20, after=time.monotonic())
        assert_back_on_base(g, vf)

    os.environ["TEST_BORG_PASSPHRASE"] = "borg-secret"
    try:
        pm = get_plugin_manager()
        targets = load_targets(vf.config["targets"], pm)
        for g in guests:
            ref = DomainRef(g.name, g.uuid)
            for t in targets.values():
                archives = t.list_archives(ref)
                assert len(archives) == 1, (t.name, archives)
                dest = tmp_path / f"extract-{t.name}-{g.name}"
                t.extract(archives[0], dest)
                assert json.loads((dest / "manifest.json").read_text())["domain"] == g.name
                assert_archive_holds_disks(g, dest, t_before)
    finally:
        del os.environ["TEST_BORG_PASSPHRASE"]
    for g in guests:
        assert_all_acked_present(g)


def test_archive_failure_still_thaws(guest_factory, vf, tmp_path):
    g = guest_factory([DiskSpec("vda")])
    vf.write_config(targets={
        "gone": {"type": "directory", "path": str(tmp_path / "does-not-exist")},
        "nopass": {"type": "borg", "repository": str(tmp_path / "repo.borg"),
                   "passphrase_file": str(tmp_path / "absent.pass")},
    })
    env = vf.env()
    env.pop("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD")
    out = vf("backup", g.name, expect=1, env=env)
    assert "does-not-exist" in out.stdout + out.stderr
    assert str(tmp_path / "absent.pass") in out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


PLUGIN = '''
import os

from virtfreeze.hookspecs import hookimpl


def _mark(line):
    with open(os.environ["THIRD_PARTY_MARKER"], "a") as fh:
        fh.write(line + "\\n")


@hookimpl
def virtfreeze_skip_domain(domain, state, config):
    return "the example plugin skips it" if domain.name.endswith("-skipme") else None


@hookimpl
def virtfreeze_before_freeze(domain, state, config):
    _mark(f"before_freeze {domain.name} {state}")


@hookimpl
def virtfreeze_after_thaw(domain, strategy, overlay_bytes):
    _mark(f"after_thaw {domain.name} {strategy} {overlay_bytes}")


@hookimpl
def virtfreeze_domain_failed(domain, phase, error):
    _mark(f"failed {domain.name} {phase} {error.exit_code}")
'''


def test_third_party_plugin_from_its_own_distribution(guest_factory, vf, tmp_path):
    site = install_plugin(tmp_path, "vf-example", "example", PLUGIN)
    env = vf.env(PYTHONPATH=str(site), THIRD_PARTY_MARKER=str(tmp_path / "marker"))
    env.pop("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD")
    listed = json.loads(vf("--json", "plugins", env=env).stdout)["plugins"]
    mine = [p for p in listed if p["name"] == "example"]
    assert mine and "vf-example 1.0" in mine[0]["source"]
    assert mine[0]["hooks"] == ["virtfreeze_after_thaw", "virtfreeze_before_freeze", "virtfreeze_domain_failed",
                                "virtfreeze_skip_domain"]
    assert "example" not in [p["name"] for p in json.loads(vf("--json", "plugins").stdout)["plugins"]]  # autoload off
    blocked = dict(env, VIRTFREEZE_BLOCK_PLUGINS="example")
    assert "example" not in [p["name"] for p in json.loads(vf("--json", "plugins", env=blocked).stdout)["plugins"]]

    g = guest_factory([DiskSpec("vda")])
    skipped = guest_factory([DiskSpec("vda")], name=f"{g.name}-skipme")
    marker = tmp_path / "marker"
    out = json.loads(vf("--json", "freeze", g.name, skipped.name, env=env).stdout)
    assert [r["name"] for r in out["frozen"]] == [g.name]
    assert out["skipped"] == {skipped.name: "the example plugin skips it"}
    vf("thaw", g.name, env=env)
    lines = marker.read_text().splitlines()
    assert lines[0] == f"before_freeze {g.name} running"
    name, strategy, size = lines[1].split()[1:]
    assert (name, strategy) == (g.name, "live") and int(size) > 0
    # A failure reaches the plugin with its phase and exit code.
    vf.write_config(domains={g.name: {"quiesce": "require"}})  # the test guest has no agent channel
    vf("freeze", g.name, env=env, expect=2)
    assert marker.read_text().splitlines()[-1] == f"failed {g.name} freeze 2"
    for guest in (g, skipped):
        assert_back_on_base(guest, vf)
        assert_all_acked_present(guest)


def test_sigterm_during_backup_finishes_the_domain_in_progress(guest_factory, vf, tmp_path):
    """As systemd stopping the unit: the frozen domain is archived and thawed, the next is not started."""
    first, second = sorted((guest_factory([DiskSpec("vda")]) for _ in range(2)), key=lambda g: g.name)
    (tmp_path / "dir-target").mkdir()
    vf.write_config(targets={"dir": {"type": "directory", "path": str(tmp_path / "dir-target")}})
    env = vf.env(VIRTFREEZE_FAILPOINT="freeze-after-export:stop")
    env.pop("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD")
    proc = subprocess.Popen([*VIRTFREEZE, "--config", str(vf.config_path), "--json", "backup", "--jobs", "1",
                             first.name, second.name], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)  # it stops itself once the first domain is frozen
    assert os.WIFSTOPPED(status), "backup ended before the failpoint"
    os.kill(proc.pid, signal.SIGTERM)  # pending until it runs again
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "SIGTERM: finishing the domains in progress" in err and "Traceback" not in err
    result = json.loads(out)
    assert [(b["name"], b["ok"]) for b in result["backups"]] == [(first.name, True)]
    assert [e["domain"] for e in result["errors"]] == [second.name]
    assert "not started" in result["errors"][0]["message"]
    assert not vf.journal(second.uuid).exists()
    for g in (first, second):
        assert_back_on_base(g, vf)
        assert_all_acked_present(g)


METADATA_ONLY_TARGET = '''
"""A broken target: it archives the definition and the manifest, but no disk."""
import os
import shutil
from pathlib import Path

from virtfreeze.hookspecs import hookimpl
from virtfreeze.targets import ArchiveResult, StorageTarget, archive_name


class MetadataOnly(StorageTarget):
    type = "metaonly"
    schema = {"type": "object", "additionalProperties": False, "required": ["path"],
              "properties": {"path": {"type": "string", "description": "Where.", "example": "/srv"}}}

    def archive(self, domain, export_dir, manifest):
        name = archive_name(domain.name)
        dest = Path(self.settings["path"]) / name
        dest.mkdir()
        for f in ("domain.xml", "manifest.json"):
            shutil.copyfile(Path(export_dir) / f, dest / f)
        os.mknod(dest / "vda.raw")  # an empty file where the disk should be, as a tool storing a device node would
        return ArchiveResult(self.name, name, 1, 0.0)

    def contents(self, archive):
        root = Path(self.settings["path"]) / archive
        return {p.name: p.stat().st_size for p in root.iterdir()}


@hookimpl
def virtfreeze_register_targets(register):
    register(MetadataOnly)


@hookimpl
def virtfreeze_domain_failed(domain, phase, error):
    with open(os.environ["THIRD_PARTY_MARKER"], "a") as fh:
        fh.write(f"failed {domain.name} {phase} {error.exit_code}\\n")
'''


def test_archive_without_the_disk_data_fails_the_domain(guest_factory, vf, tmp_path):
    site = install_plugin(tmp_path, "vf-metaonly", "metaonly", METADATA_ONLY_TARGET)
    g = guest_factory([DiskSpec("vda", "raw", size_mib=32, block=True)])
    (tmp_path / "meta").mkdir()
    (tmp_path / "dir").mkdir()
    vf.write_config(targets={"broken": {"type": "metaonly", "path": str(tmp_path / "meta")},
                             "good": {"type": "directory", "path": str(tmp_path / "dir")}})
    env = vf.env(PYTHONPATH=str(site), THIRD_PARTY_MARKER=str(tmp_path / "marker"))
    env.pop("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD")
    out = vf("--json", "backup", g.name, env=env, expect=1)
    assert "Traceback" not in out.stderr
    result = json.loads(out.stdout)["backups"][0]
    assert not result["ok"]
    assert [a["target"] for a in result["archives"]] == ["broken", "good"]
    assert result["archives"][1]["verified"] and result["archives"][1]["bytes"] >= 32 << 20
    [error] = result["errors"]
    assert error.startswith("broken: ") and "lacks data" in error and "disks/vda.raw is missing" in error, error
    assert f"domain {g.name!r} disk vda" in out.stderr
    assert (tmp_path / "marker").read_text().splitlines() == [f"failed {g.name} archive 1"]
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_progress_on_a_terminal_one_line_per_domain(guest_factory, vf, tmp_path):
    """`backup --jobs 2` under a pseudo-terminal: each progress line names one domain, never two."""
    guests = [guest_factory([DiskSpec("vda")]) for _ in range(2)]
    names = sorted(g.name for g in guests)
    (tmp_path / "dir").mkdir()
    vf.write_config(targets={"dir": {"type": "directory", "path": str(tmp_path / "dir")}})
    env = vf.env(TERM="xterm-256color", COLUMNS="100", LINES="30")
    env.pop("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD")
    code, text = on_a_terminal([*VIRTFREEZE, "--config", str(vf.config_path), "backup", "--jobs", "2", *names], env,
                               timeout=60)
    assert code == 0, text
    fragments = [f.strip() for f in re.split(r"[\r\n]", ANSI.sub("\n", text)) if f.strip()]
    progress = [f for f in fragments if re.search(r"\b(freezing|archiving to|merging)\b", f)]
    assert {n for n in names if any(f.startswith(n) for f in progress)} == set(names), fragments
    for f in progress:
        assert sum(n in f for n in names) == 1, f"a progress line mixes domains: {f!r}"
        assert re.fullmatch(r"vft-\w+ +(freezing|archiving to dir(: [0-9.]+ (B|[KMGT]iB) of [0-9.]+ (B|[KMGT]iB)"
                            r"(, [0-9.]+ (B|[KMGT]iB)/s)?)?|merging \(live\): vda|disk vda: committing \d+%)", f), f
    # Without a terminal nothing is drawn: no control sequence, no progress line.
    out = vf("backup", *names, env=dict(env, TERM="xterm-256color"))
    assert "\x1b[" not in out.stderr + out.stdout and "archiving to dir" not in out.stderr
    for g in guests:
        assert_back_on_base(g, vf)
        assert_all_acked_present(g)


def _borg_create_of(repo: Path) -> list[str] | None:
    """The argv of a running `borg ... create` into `repo`, if any."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, UnicodeDecodeError):
            continue
        if "create" in argv and any(a.startswith(f"{repo}::") for a in argv) and any("borg" in a for a in argv[:4]):
            return argv
    return None


def test_a_borg_archive_waits_its_turn_for_the_repository(guest_factory, vf, tmp_path):
    """Another borg holds the repository (another domain's archive with --jobs 2, a prune): borg create waits
    for it (`lock_wait`, not borg's 1 s) and the backup succeeds once it is free."""
    g = guest_factory()
    repo, fifo = tmp_path / "repo.borg", tmp_path / "release"
    env = dict(vf.env(), BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")
    env.pop("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD")  # the targets are entry-point plugins
    subprocess.run(["borg", "init", "-e", "none", str(repo)], check=True, env=env, capture_output=True)
    vf.write_config(targets={"borg": {"type": "borg", "repository": str(repo), "lock_wait": 600}})
    os.mkfifo(fifo)
    holder = subprocess.Popen(["borg", "with-lock", str(repo), "sh", "-c", f"echo held; cat {fifo}"],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "held\n"
        backup = subprocess.Popen([*VIRTFREEZE, "--config", str(vf.config_path), "--json", "backup", g.name],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 60
        while (waiting := _borg_create_of(repo)) is None and backup.poll() is None and time.monotonic() < deadline:
            threading.Event().wait(0.05)  # polling /proc: nothing tells when borg has started
        assert waiting is not None, backup.communicate()
        assert waiting[waiting.index("--lock-wait") + 1] == "600", waiting
    finally:
        with open(fifo, "w"):  # the holder lets go
            pass
        holder.wait(timeout=60)
    out, err = backup.communicate(timeout=300)
    assert backup.returncode == 0, err
    [result] = json.loads(out)["backups"]
    assert result["ok"] and result["archives"][0]["verified"], result
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)
