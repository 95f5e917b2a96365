"""Installing on a KVM host with pipx: a wheel built with Debian's own tools, run on Debian's own
python3-libvirt, pluggy, jsonschema, click, PyYAML and rich (nothing compiled), through `check`,
`config check` and a freeze and thaw of a writing guest."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

from tests.host.helpers import assert_all_acked_present, assert_back_on_base
from tests.rig.guest import DiskSpec

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = "/usr/bin/python3"


def program_runner(program: str, vf, env: dict):
    """Run an installed virtfreeze with this test's config; it must work, and never print a traceback."""

    def installed(*args: str, expect=(0,)) -> subprocess.CompletedProcess:
        proc = subprocess.run([program, "--config", str(vf.config_path), *args], capture_output=True, text=True,
                              env=env)
        assert proc.returncode in expect and "Traceback" not in proc.stderr, (args, proc.stdout, proc.stderr)
        return proc

    return installed


def freeze_and_thaw(installed, g, vf) -> None:
    """A freeze and thaw of a writing guest through the installed program; nothing lost, nothing left."""
    g.watcher.wait_acks(20)
    installed("freeze", g.name)
    g.watcher.wait_acks(20)
    installed("thaw", g.name)
    g.watcher.wait_acks(20)
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)


def test_pipx_install_with_debians_libraries(guest_factory, vf, tmp_path):
    # The wheel, as an operator would build it on the host (Debian's python3-build and python3-hatchling;
    # hatchling's `editables` is only needed for editable installs, and Debian does not ship it).
    subprocess.run([DEBIAN_PYTHON, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
                    "--outdir", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("virtfreeze-*.whl")
    env = dict(os.environ, PIPX_HOME=str(tmp_path / "pipx"), PIPX_BIN_DIR=str(tmp_path / "bin"))
    env.pop("VIRTUAL_ENV", None)
    subprocess.run(["pipx", "install", "--system-site-packages", str(wheel)], check=True, capture_output=True, env=env)
    program = str(tmp_path / "bin" / "virtfreeze")
    python = str(tmp_path / "pipx" / "venvs" / "virtfreeze" / "bin" / "python")

    # Debian's libraries, not copies from PyPI: nothing was compiled.
    probe = ("import importlib.metadata as m, json, libvirt, pluggy, jsonschema, click, yaml, rich\n"
             "print(json.dumps({'libvirt': libvirt.__file__, 'pluggy': pluggy.__file__, 'jsonschema': jsonschema.__file__,"
             " 'click': click.__file__, 'rich': rich.__file__, 'versions': {n: m.version(n) for n in"
             " ('pluggy', 'jsonschema', 'click', 'rich')}}))")
    found = json.loads(subprocess.run([python, "-c", probe], check=True, capture_output=True, text=True).stdout)
    for lib in ("libvirt", "pluggy", "jsonschema", "click", "rich"):
        assert found[lib].startswith("/usr/lib/python3/dist-packages/"), found
    assert found["versions"]["pluggy"].startswith("1.0.") and found["versions"]["jsonschema"].startswith("4.10.")

    installed = program_runner(program, vf, {k: v for k, v in env.items() if k != "VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD"})

    vf.write_config(targets={"nightly": {"type": "borg", "repository": str(tmp_path / "repo.borg")}})
    understood = yaml.safe_load(installed("config", "check").stdout)
    assert understood["targets"]["nightly"]["type"] == "borg"
    plugins = installed("plugins").stdout
    assert all(f"{t} (entry point of virtfreeze" in plugins for t in ("borg", "restic", "directory"))

    g = guest_factory([DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw")])
    findings = json.loads(installed("--json", "check", "--all", expect=(0, 1)).stdout)["findings"]
    assert any(f["scope"] == "host" and f["topic"] == "libvirt" and f["level"] == "ok" for f in findings)
    assert any(f["scope"] == g.name and f["topic"] == "disk vda" and f["level"] == "ok" for f in findings)

    freeze_and_thaw(installed, g, vf)


def test_debian_package_builds_clean_installs_and_freezes_and_thaws(guest_factory, vf, tmp_path):
    """`make deb` (lintian with no errors), `apt-get install` of the package, a freeze and thaw of a writing
    guest through /usr/bin/virtfreeze, then the package removed again."""
    subprocess.run(["make", "-C", str(ROOT), "deb"], check=True, capture_output=True)
    [deb] = (ROOT / "build" / "deb").glob("virtfreeze_*_all.deb")
    lintian = subprocess.run(["lintian", "--fail-on", "error", str(deb)], capture_output=True, text=True,
                             env=dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin"))
    assert lintian.returncode == 0 and "\nE: " not in "\n" + lintian.stdout, lintian.stdout
    contents = subprocess.run(["dpkg-deb", "-c", str(deb)], check=True, capture_output=True, text=True).stdout
    for path in ("./usr/bin/virtfreeze", "./usr/share/man/man1/virtfreeze.1.gz",
                 "./lib/systemd/system/virtfreeze-backup.timer", "./usr/share/doc/virtfreeze/examples/virtfreeze.yaml",
                 "/dist-packages/virtfreeze_borg/__init__.py"):
        assert path in contents, path
    apt_env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", str(deb)], check=True,
                   capture_output=True, env=apt_env)
    try:
        unit = Path("/lib/systemd/system/virtfreeze-backup.service").read_text()
        assert "ExecStart=/usr/bin/virtfreeze backup" in unit
        assert not Path("/etc/systemd/system/timers.target.wants/virtfreeze-backup.timer").exists()  # not enabled

        installed = program_runner("/usr/bin/virtfreeze", vf, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        assert "borg (entry point of virtfreeze" in installed("plugins").stdout
        g = guest_factory([DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw", size_mib=16, block=True)])
        freeze_and_thaw(installed, g, vf)
    finally:
        subprocess.run(["apt-get", "purge", "-y", "-q", "virtfreeze"], check=True, capture_output=True, env=apt_env)
    assert not Path("/usr/bin/virtfreeze").exists()
