"""contrib/ansible: the virtfreeze role applied to this host (connection local) as two inventory hosts, every
path in tmp_path, so the host's /etc is not touched:

- kvm1 installs with pipx (a wheel built here, into a tmp PIPX_HOME and PIPX_BIN_DIR, on Debian's libraries),
  has a borg and a restic target with secrets, and borgmatic 2.x hooks as a managed block;
- kvm2 is `none` (the venv's virtfreeze), has include, a directory target, metrics and notify (its URL a
  secret), and borgmatic 1.7 hooks merged into a config that has hooks of its own.

A second run changes nothing; the config passes `virtfreeze config check`, the secrets are 0600 files, the
units pass `systemd-analyze verify` and start the installed program at this host's splay, both borgmatic
configs pass borgmatic's own validation, and ansible-lint (production profile) passes on the role."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "contrib" / "ansible"
VENV_BIN = Path(sys.executable).parent
VIRTFREEZE_BIN = str(VENV_BIN / "virtfreeze")
BORGMATIC = {"2.x": [str(VENV_BIN / "borgmatic"), "config", "validate", "-c"],
             "1.7": ["/usr/bin/validate-borgmatic-config", "-c"]}
DEBIAN_PYTHON = "/usr/bin/python3"
UNITS = ["virtfreeze-backup.service", "virtfreeze-backup.timer", "virtfreeze-thaw-leftovers.service",
         "virtfreeze-verify.service", "virtfreeze-verify.timer"]
SPLAY = 90
SECRETS = {"borg": "borg passphrase 8f3a", "restic": "restic password 41c2",
           "url": "ntfys://token-77e1@ntfy.example.org/vm-backups"}
SYSTEMD_RUNS = Path("/run/systemd/system").exists()


def ansible_env(tmp_path: Path) -> dict:
    """ansible-playbook and ansible-lint isolated from the host's and the user's Ansible settings."""
    cfg = tmp_path / "ansible.cfg"
    cfg.write_text("[defaults]\n")
    env = dict(os.environ, ANSIBLE_CONFIG=str(cfg), ANSIBLE_HOME=str(tmp_path / "ansible-home"),
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"), ANSIBLE_REMOTE_TEMP=str(tmp_path / "ansible-tmp"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_STDOUT_CALLBACK="default")
    for name in ("VIRTUAL_ENV", "VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD", "VIRTFREEZE_FAILPOINT", "ANSIBLE_BECOME"):
        env.pop(name, None)
    return env


def build_wheel(tmp_path: Path) -> Path:
    """The wheel as an operator builds it on the controller (Debian's python3-build and python3-hatchling)."""
    subprocess.run([DEBIAN_PYTHON, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
                    "--outdir", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("virtfreeze-*.whl")
    return wheel


def host_vars(tmp_path: Path, name: str, **extra) -> dict:
    d = tmp_path / name
    return {
        "ansible_connection": "local", "ansible_python_interpreter": DEBIAN_PYTHON,
        "ansible_become": False,  # root already, and no sudo here
        "virtfreeze_config_dir": str(d / "etc"), "virtfreeze_unit_dir": str(d / "units"),
        "virtfreeze_cache_dir": str(d / "cache"),
        # The packages are there (scripts/prepare-host.sh); the role checks them, without apt-get update.
        "virtfreeze_apt_update_cache": False,
        # The plugins' Debian packages (python3-prometheus-client, apprise) are not on the test host, and a test
        # installs none: metrics and notify are on for kvm2, whose virtfreeze (the venv's) has them from PyPI.
        "virtfreeze_metrics_packages": [], "virtfreeze_notify_packages": [],
        "virtfreeze_splay_minutes": SPLAY,
        "virtfreeze_borgmatic_local_path": str(d / "borg-behind-guests"),
        # Where systemd runs, the units in tmp_path must not be enabled.
        **({"virtfreeze_systemd_enable": False} if SYSTEMD_RUNS else {}),
        **extra,
    }


def write_inventory(tmp_path: Path, wheel: Path) -> dict:
    export = str(tmp_path / "export")
    (tmp_path / "kvm1").mkdir()
    (tmp_path / "kvm1" / "borgmatic.yaml").write_text(yaml.safe_dump({
        "source_directories": [export], "repositories": [{"path": str(tmp_path / "vms.borg"), "label": "vms"}],
        "keep_daily": 7}))
    (tmp_path / "kvm2").mkdir()
    (tmp_path / "kvm2" / "borgmatic.yaml").write_text(
        "# the operator's own config, with hooks of its own\n"
        f"location:\n    source_directories: [{export}]\n    repositories: [{tmp_path / 'vms.borg'}]\n"
        "retention:\n    keep_daily: 7\n"
        "hooks:\n    before_backup: [echo starting]\n    after_backup: [echo done]\n")
    hosts = {
        "kvm1": host_vars(
            tmp_path, "kvm1", virtfreeze_install="pipx", virtfreeze_pipx_source=str(wheel),
            virtfreeze_pipx_home=str(tmp_path / "kvm1" / "pipx"),
            virtfreeze_pipx_bin_dir=str(tmp_path / "kvm1" / "bin"),
            virtfreeze_targets={
                "nightly": {"type": "borg", "repository": str(tmp_path / "vms.borg"), "compression": "zstd,3",
                            "passphrase": SECRETS["borg"]},
                "offsite": {"type": "restic", "repository": str(tmp_path / "vms.restic"),
                            "password": SECRETS["restic"]}},
            virtfreeze_exclude=["scratch-*"],
            virtfreeze_config_extra={"export_directory": export, "state_directory": str(tmp_path / "state")},
            virtfreeze_borgmatic_config=str(tmp_path / "kvm1" / "borgmatic.yaml"), virtfreeze_borgmatic_style="2.x",
            virtfreeze_verify_timer=True),
        "kvm2": host_vars(
            tmp_path, "kvm2", virtfreeze_install="none", virtfreeze_bin=VIRTFREEZE_BIN,
            virtfreeze_targets={"plain": {"type": "directory", "path": str(tmp_path / "kvm2" / "backup")}},
            virtfreeze_include=["web-*", "db1"],
            # The venv's virtfreeze has the plugins' libraries (prometheus_client, apprise) from PyPI.
            virtfreeze_metrics_textfile=str(tmp_path / "kvm2" / "node-exporter" / "virtfreeze.prom"),
            virtfreeze_notify_urls=[SECRETS["url"]], virtfreeze_notify_on_success=True,
            virtfreeze_config_extra={"export_directory": export},
            virtfreeze_borgmatic_config=str(tmp_path / "kvm2" / "borgmatic.yaml"), virtfreeze_borgmatic_style="1.7",
            virtfreeze_borgmatic_method="merge"),
        # The other two ways round, on hosts with nothing else: borgmatic 2.x merged into a config with
        # commands of its own, and 1.7 as a managed block.
        "kvm3": borgmatic_only(tmp_path, "kvm3", "2.x", "merge", {
            "source_directories": [export], "repositories": [{"path": str(tmp_path / "vms.borg")}],
            "commands": [{"before": "repository", "run": ["echo starting"]}]}),
        "kvm4": borgmatic_only(tmp_path, "kvm4", "1.7", "block", {
            "location": {"source_directories": [export], "repositories": [str(tmp_path / "vms.borg")]}}),
    }
    write_inventory_file(tmp_path, hosts)
    return hosts


def borgmatic_only(tmp_path: Path, name: str, style: str, method: str, borgmatic: dict) -> dict:
    (tmp_path / name).mkdir()
    (tmp_path / name / "borgmatic.yaml").write_text(yaml.safe_dump(borgmatic, sort_keys=False))
    return host_vars(tmp_path, name, virtfreeze_install="none", virtfreeze_bin=VIRTFREEZE_BIN,
                     virtfreeze_manage_packages=False,
                     virtfreeze_borgmatic_config=str(tmp_path / name / "borgmatic.yaml"),
                     virtfreeze_borgmatic_style=style, virtfreeze_borgmatic_method=method)


def write_inventory_file(tmp_path: Path, hosts: dict) -> None:
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump({"kvm_hosts": {"hosts": hosts}}))


def run_playbook(tmp_path: Path, expect_ok: bool = True) -> tuple[str, dict[str, dict[str, int]]]:
    """Run contrib/ansible/playbook.yml on the inventory; its output and each host's PLAY RECAP counts."""
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(tmp_path / "inventory.yml"),
                           str(ANSIBLE / "playbook.yml")], capture_output=True, text=True, cwd=tmp_path,
                          env=ansible_env(tmp_path), timeout=300)
    assert (proc.returncode == 0) == expect_ok, proc.stdout + proc.stderr
    recap = proc.stdout.split("PLAY RECAP", 1)[1]
    counts = {m[1]: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m[2])}
              for m in re.finditer(r"^(\S+)\s+:\s+(.*)$", recap, re.M)}
    return proc.stdout + proc.stderr, counts


def splay_of(host: str) -> int:
    return int(hashlib.sha1(host.encode()).hexdigest()[:8], 16) % SPLAY


def at(hhmm: str, plus: int) -> str:
    h, m = map(int, hhmm.split(":"))
    t = (h * 60 + m + plus) % 1440
    return f"*-*-* {t // 60:02d}:{t % 60:02d}:00"


def unit_lines(path: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in path.read_text().splitlines() if line.startswith(f"{key}=")]


def config_check(config: Path, program: str = VIRTFREEZE_BIN) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD", "VIRTUAL_ENV")}
    proc = subprocess.run([program, "--config", str(config), "config", "check"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    return yaml.safe_load(proc.stdout)


def test_role_installs_configures_and_second_run_changes_nothing(tmp_path):
    hosts = write_inventory(tmp_path, build_wheel(tmp_path))
    out1, first = run_playbook(tmp_path)
    assert set(first) == set(hosts) and all(c["changed"] > 0 and c["failed"] == 0 for c in first.values()), first
    out2, second = run_playbook(tmp_path)
    assert all(c["changed"] == 0 and c["failed"] == 0 for c in second.values()), (second, out2)
    for secret in SECRETS.values():  # no_log on every task that handles one
        assert secret not in out1 + out2

    # The program each install method put in place, and the one the units and hooks start.
    pipx_program = tmp_path / "kvm1" / "bin" / "virtfreeze"
    programs = {"kvm1": str(pipx_program), "kvm2": VIRTFREEZE_BIN}
    assert (tmp_path / "kvm1" / "pipx" / "venvs" / "virtfreeze" / "pyvenv.cfg").read_text().count(
        "include-system-site-packages = true") == 1

    # The configuration: valid, secrets by reference only, in 0600 root files.
    etc1, etc2 = tmp_path / "kvm1" / "etc", tmp_path / "kvm2" / "etc"
    understood = config_check(etc1 / "config.yaml")
    assert understood["targets"]["nightly"] == {"type": "borg", "repository": str(tmp_path / "vms.borg"),
                                                "compression": "zstd,3", "passphrase_file": str(etc1 / "nightly.pass")}
    assert understood["targets"]["offsite"]["password_file"] == str(etc1 / "offsite.pass")
    assert understood["exclude"] == ["scratch-*"] and understood["metrics"] is None and understood["notify"] is None
    assert config_check(etc1 / "config.yaml", str(pipx_program)) == understood  # the installed program agrees
    understood2 = config_check(etc2 / "config.yaml")
    assert understood2["include"] == ["web-*", "db1"] and understood2["targets"]["plain"]["type"] == "directory"
    assert understood2["metrics"] == {"textfile": hosts["kvm2"]["virtfreeze_metrics_textfile"]}
    assert understood2["notify"] == {"urls_file": str(etc2 / "notify.urls"), "on_success": True}
    assert (tmp_path / "kvm2" / "node-exporter").is_dir()
    for etc in (etc1, etc2):
        rendered = (etc / "config.yaml").read_text()
        assert not [secret for secret in SECRETS.values() if secret in rendered], rendered
    for path, content in ((etc1 / "nightly.pass", SECRETS["borg"]), (etc1 / "offsite.pass", SECRETS["restic"]),
                          (etc2 / "notify.urls", SECRETS["url"])):
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0 and st.st_gid == 0, path
        assert path.read_text() == content + "\n"
    assert not (etc1 / "notify.urls").exists() and not list(etc2.glob("*.pass"))

    # The units: valid for systemd, starting the installed program with the rendered config, at each host's splay.
    for host, selection in (("kvm1", " --all"), ("kvm2", "")):
        units = tmp_path / host / "units"
        assert sorted(p.name for p in units.iterdir()) == sorted(UNITS)
        proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *(str(units / u) for u in UNITS)],
                              capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
        cli = f"{programs[host]} --config {tmp_path / host / 'etc' / 'config.yaml'}"
        assert unit_lines(units / "virtfreeze-backup.service", "ExecStart") == [f"{cli} backup{selection}"]
        assert unit_lines(units / "virtfreeze-thaw-leftovers.service", "ExecStart") == [f"{cli} thaw"]
        assert unit_lines(units / "virtfreeze-verify.service", "ExecStart") == [f"{cli} verify"]
        assert unit_lines(units / "virtfreeze-backup.timer", "OnCalendar") == [at("02:00", splay_of(host))]
        assert unit_lines(units / "virtfreeze-verify.timer", "OnCalendar") == [at("05:30", splay_of(host))]
    assert splay_of("kvm1") != splay_of("kvm2")
    if not SYSTEMD_RUNS:
        assert out1.count("systemd is not running on this host") == len(hosts), out1
    assert not (tmp_path / "kvm1" / "units" / "timers.target.wants").exists()

    # borgmatic 2.x: a managed block with commands:, the operator's settings untouched.
    bm1 = tmp_path / "kvm1" / "borgmatic.yaml"
    cfg = yaml.safe_load(bm1.read_text())
    cli1 = f"{pipx_program} --config {etc1 / 'config.yaml'}"
    assert cfg["commands"] == [
        {"before": "action", "when": ["create"], "run": [f"{cli1} freeze --all"]},
        {"after": "action", "when": ["create"], "states": ["finish", "fail"], "run": [f"{cli1} thaw"]}]
    assert cfg["keep_daily"] == 7 and bm1.read_text().count("# BEGIN virtfreeze hooks") == 1
    # borg through behind-guests: borgmatic's local_path, a script running the installed virtfreeze.
    behind1 = tmp_path / "kvm1" / "borg-behind-guests"
    assert cfg["local_path"] == str(behind1) and stat.S_IMODE(behind1.stat().st_mode) == 0o755
    assert behind1.read_text().splitlines()[-1] == f'exec {cli1} behind-guests -- borg "$@"'
    # borgmatic 1.7: merged into the operator's hooks (freeze last before the backup, thaw first after it).
    bm2 = tmp_path / "kvm2" / "borgmatic.yaml"
    cli2 = f"{VIRTFREEZE_BIN} --config {etc2 / 'config.yaml'}"
    hooks = yaml.safe_load(bm2.read_text())["hooks"]
    assert hooks == {"before_backup": ["echo starting", f"{cli2} freeze"],
                     "after_backup": [f"{cli2} thaw", "echo done"], "on_error": [f"{cli2} thaw"]}
    assert yaml.safe_load(bm2.read_text())["location"]["local_path"] == str(tmp_path / "kvm2" / "borg-behind-guests")
    # borgmatic 2.x merged after the operator's own commands; 1.7 as a block, beside the operator's location.
    cli_none = {h: f"{VIRTFREEZE_BIN} --config {tmp_path / h / 'etc' / 'config.yaml'}" for h in ("kvm3", "kvm4")}
    bm3 = tmp_path / "kvm3" / "borgmatic.yaml"
    assert yaml.safe_load(bm3.read_text())["commands"] == [
        {"before": "repository", "run": ["echo starting"]},
        {"before": "action", "when": ["create"], "run": [f"{cli_none['kvm3']} freeze --all"]},
        {"after": "action", "when": ["create"], "states": ["finish", "fail"], "run": [f"{cli_none['kvm3']} thaw"]}]
    assert yaml.safe_load(bm3.read_text())["local_path"] == str(tmp_path / "kvm3" / "borg-behind-guests")
    bm4 = tmp_path / "kvm4" / "borgmatic.yaml"
    cfg = yaml.safe_load(bm4.read_text())
    # 1.7 as a block: local_path belongs under location:, which a block cannot add to; the play says what to add.
    assert "local_path" not in cfg["location"]
    assert f"add `local_path: {tmp_path / 'kvm4' / 'borg-behind-guests'}` under `location:`" in out1, out1
    assert cfg["hooks"] == {"before_backup": [f"{cli_none['kvm4']} freeze --all"],
                            "after_backup": [f"{cli_none['kvm4']} thaw"], "on_error": [f"{cli_none['kvm4']} thaw"]}
    assert cfg["location"]["source_directories"] == [str(tmp_path / "export")]
    for style, path in (("2.x", bm1), ("1.7", bm2), ("2.x", bm3), ("1.7", bm4)):
        proc = subprocess.run([*BORGMATIC[style], str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, (style, path, proc.stdout, proc.stderr)


def test_borgmatic_block_refuses_a_config_with_its_own_hooks(tmp_path):
    """A second `hooks:` appended to a borgmatic 1.7 config would replace the operator's: the role stops and says
    what to do, and the file is left as it was."""
    original = "location:\n    source_directories: [/run/virtfreeze/export]\n    repositories: [/srv/vms.borg]\n" \
               "hooks:\n    before_backup: [echo starting]\n"
    (tmp_path / "kvm5").mkdir()
    (tmp_path / "kvm5" / "borgmatic.yaml").write_text(original)
    write_inventory_file(tmp_path, {"kvm5": host_vars(
        tmp_path, "kvm5", virtfreeze_install="none", virtfreeze_bin=VIRTFREEZE_BIN, virtfreeze_manage_packages=False,
        virtfreeze_borgmatic_config=str(tmp_path / "kvm5" / "borgmatic.yaml"), virtfreeze_borgmatic_style="1.7")})
    out, counts = run_playbook(tmp_path, expect_ok=False)
    assert counts["kvm5"]["failed"] == 1, out
    assert "already has its own `hooks:`" in out and "virtfreeze_borgmatic_method: merge" in out, out
    assert (tmp_path / "kvm5" / "borgmatic.yaml").read_text() == original


def test_ansible_lint_passes_on_the_role_and_the_example_inventory_parses(tmp_path):
    proc = subprocess.run([str(VENV_BIN / "ansible-lint"), "--offline", "--profile", "production", "playbook.yml",
                           "roles/virtfreeze"], capture_output=True, text=True, cwd=ANSIBLE,
                          env=ansible_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Passed" in proc.stdout + proc.stderr and "production" in proc.stdout + proc.stderr
    proc = subprocess.run([str(VENV_BIN / "ansible-inventory"), "-i", str(ANSIBLE / "inventory.ini"), "--list"],
                          capture_output=True, text=True, env=ansible_env(tmp_path), timeout=120)
    assert proc.returncode == 0 and "WARNING" not in proc.stderr, proc.stderr
    inventory = json.loads(proc.stdout)
    assert len(inventory["kvm_hosts"]["hosts"]) == 4
    assert inventory["_meta"]["hostvars"]["kvm03.example.org"]["virtfreeze_include"] == ["web-*", "db1"]
