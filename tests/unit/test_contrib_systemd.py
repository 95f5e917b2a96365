"""The contrib systemd units: valid for systemd, and their commands valid for virtfreeze."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from virtfreeze.cli import cli

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
INSTALLED = "/usr/local/bin/virtfreeze"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(UNITS / name)
    return parser


def test_systemd_analyze_verifies_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (Debian package systemd) is needed to check contrib/systemd"
    program = str(Path(sys.executable).parent / "virtfreeze")
    for src in UNITS.iterdir():
        (tmp_path / src.name).write_text(src.read_text().replace(INSTALLED, program))
    units = sorted(str(p) for p in tmp_path.iterdir())
    assert len(units) == 5
    proc = subprocess.run([analyze, "verify", "--man=no", *units], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


@pytest.mark.parametrize("name", ["virtfreeze-backup.service", "virtfreeze-thaw-leftovers.service",
                                  "virtfreeze-verify.service"])
def test_exec_start_is_a_valid_virtfreeze_command(name):
    argv = shlex.split(unit(name)["Service"]["ExecStart"])
    assert argv[0] == INSTALLED
    ctx = cli.make_context("virtfreeze", argv[1:])
    with warnings.catch_warnings():  # click 8.2 deprecates protected_args; 9 folds it into args
        warnings.simplefilter("ignore", DeprecationWarning)
        cmd_name, cmd, rest = cli.resolve_command(ctx, [*getattr(ctx, "protected_args", []), *ctx.args])
    cmd.make_context(cmd_name, rest, parent=ctx)  # raises on an unknown option or argument


def test_timer_starts_the_backup_and_catches_up():
    timer = unit("virtfreeze-backup.timer")
    assert timer["Timer"]["Unit"] == "virtfreeze-backup.service"
    assert timer["Timer"]["Persistent"] == "true"
    verify = unit("virtfreeze-verify.timer")
    assert verify["Timer"]["Unit"] == "virtfreeze-verify.service" and verify["Timer"]["Persistent"] == "true"
    assert "virtfreeze-backup.service" in unit("virtfreeze-verify.service")["Unit"]["After"]
    assert unit("virtfreeze-thaw-leftovers.service")["Service"]["ExecStart"].split()[1:] == ["thaw"]
