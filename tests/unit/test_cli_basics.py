"""The CLI answers --version and --help, and rejects what it does not know with exit 2."""

import subprocess
import sys

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
