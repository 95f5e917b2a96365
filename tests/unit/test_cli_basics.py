"""The CLI answers --version and --help, and rejects what it does not know with exit 2."""

import logging
import subprocess
import sys

import pytest
from click.testing import CliRunner

from virtfreeze import __version__
from virtfreeze.cli import cli


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_help_lists_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_unknown_command_and_option_exit_2():
    runner = CliRunner()
    bad_cmd = runner.invoke(cli, ["nosuchcommand"])
    assert bad_cmd.exit_code == 2
    assert "No such command" in bad_cmd.output
    bad_opt = runner.invoke(cli, ["--nosuchoption"])
    assert bad_opt.exit_code == 2
    assert "No such option" in bad_opt.output


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "virtfreeze", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


def test_a_bug_is_one_line_and_a_mutating_command_says_what_may_be_left(monkeypatch):
    from virtfreeze import config

    def broken(path):
        raise RuntimeError("boom")

    monkeypatch.setattr(config, "load", broken)
    runner = CliRunner()
    for args, code in ((["status"], 1), (["freeze", "--all"], 3), (["thaw"], 3)):
        result = runner.invoke(cli, args)
        assert result.exit_code == code, (args, result.output)
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and "internal error RuntimeError: boom" in lines[0]
        assert "Traceback" not in result.output
        assert ("virtfreeze status" in lines[0]) == (code == 3)


def test_for_each_reports_a_bug_per_domain_and_goes_on():
    from virtfreeze.cli import _for_each
    from virtfreeze.errors import EXIT_ON_OVERLAY
    from virtfreeze.libvirt_boundary import DomainInfo

    doms = [DomainInfo(n, f"u-{n}", "running", True) for n in ("a", "b", "c")]

    def fn(d):
        if d.name == "b":
            raise KeyError("x")
        return d.name

    results, failures = _for_each(doms, fn, 2)
    assert results == ["a", "c"]
    (item, err), = failures
    assert item.name == "b" and err.exit_code == EXIT_ON_OVERLAY and "'b'" in str(err)


def _invoke_after(tmp_path, *args):
    """Run the CLI against libvirt's built-in test driver (no daemon) with a throwaway config."""
    import json
    import logging

    config = tmp_path / "config.yaml"
    (tmp_path / "dir-target").mkdir(exist_ok=True)
    config.write_text(json.dumps({
        "state_directory": str(tmp_path / "state"), "export_directory": str(tmp_path / "export"),
        "exclude": ["*"],  # --all selects nothing: no domain is touched
        "targets": {"d": {"type": "directory", "path": str(tmp_path / "dir-target")}}}))
    logging.getLogger("virtfreeze").setLevel(logging.NOTSET)
    result = CliRunner().invoke(cli, ["--connect", "test:///default", "--config", str(config), *args])
    return result, logging.getLogger("virtfreeze").level


COMMANDS = [["status"], ["thaw"], ["freeze", "--all"], ["backup", "--all"], ["plugins"], ["config", "check"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_json_after_the_command_means_json(tmp_path, command):
    import json

    result, _level = _invoke_after(tmp_path, *command, "--json")
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout), dict)
    before, _level = _invoke_after(tmp_path, "--json", *command)
    assert json.loads(before.stdout).keys() == json.loads(result.stdout).keys()


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("flag,level", [("-v", logging.DEBUG), ("-q", logging.WARNING), (None, logging.INFO)])
def test_verbose_and_quiet_after_the_command(tmp_path, command, flag, level):
    result, seen = _invoke_after(tmp_path, *command, *([flag] if flag else []))
    assert result.exit_code == 0, result.output
    assert seen == level


def test_behind_guests_needs_a_command_and_leaves_its_options_to_it(tmp_path):
    assert CliRunner().invoke(cli, ["behind-guests"]).exit_code == 2  # no command: a usage error
    config = tmp_path / "config.yaml"
    config.write_text(f"state_directory: {tmp_path}/state\narchive_priority: {{nice: 0, ionice: none, "
                      "cpu_weight: null, writeback_interval: null}\n")
    out = subprocess.run([sys.executable, "-m", "virtfreeze", "--config", str(config), "behind-guests",
                          "sh", "-c", 'echo "$@"; exit 4', "sh", "-h", "--json"], capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (4, "-h --json\n")  # its options and its exit code are its own

    def behind(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "virtfreeze", "--config", str(config), "behind-guests", "--",
                               *command], capture_output=True, text=True)

    assert behind("sh", "-c", "kill -KILL $$").returncode == 128 + 9  # ended by a signal
    (tmp_path / "not-executable").write_text("true\n")
    for command, code in ((["no-such-borg", "create"], 127), ([str(tmp_path / "not-executable")], 126)):
        out = behind(*command)
        assert out.returncode == code, out.stderr  # as env(1): never 1, a borg warning to borgmatic
        assert out.stderr.startswith(f"virtfreeze: error: {command[0]}: cannot run {command[0]}: ")
        assert len(out.stderr.splitlines()) == 1
