"""Fixtures for host tests: run the real virtfreeze CLI against real guests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

VIRTFREEZE = [sys.executable, "-m", "virtfreeze"]


class VF:
    """Runs `virtfreeze` as a subprocess with this test's own config and directories."""

    def __init__(self, tmp_path: Path):
        self.state = tmp_path / "state"
        self.export = tmp_path / "export"
        self.config_path = tmp_path / "virtfreeze.yaml"
        self.config: dict = {"state_directory": str(self.state), "export_directory": str(self.export)}
        self.write_config()

    def write_config(self, **extra) -> None:
        self.config.update(extra)
        self.config_path.write_text(yaml.safe_dump(self.config))

    def env(self, **extra) -> dict:
        env = dict(os.environ, VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD="1")
        env.pop("VIRTFREEZE_FAILPOINT", None)
        env.update(extra)
        return env

    def __call__(self, *args: str, expect: int | None = 0, env: dict | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([*VIRTFREEZE, "--config", str(self.config_path), *args],
                              capture_output=True, text=True, env=env or self.env(), timeout=timeout)
        if expect is not None:
            assert proc.returncode == expect, (
                f"virtfreeze {' '.join(args)} exited {proc.returncode}, expected {expect}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def journal(self, uuid: str) -> Path:
        return self.state / "journal" / f"{uuid}.json"

    def undo_views(self) -> None:
        """Stop this runner's views and unmount its export view, whatever a failed test left."""
        from virtfreeze.export_view import mounts_under, stop_views, unmount

        stop_views(self.export)
        stop_views(self.state)  # the guest views (qemu-storage-daemon) of segmented disks
        for mp in mounts_under(self.export):
            unmount(mp)


@pytest.fixture
def vf(tmp_path, libvirtd_shared) -> VF:
    """A virtfreeze runner; its export view's mounts and device views are undone at teardown, pass or fail.
    A test that runs virtfreeze shares the host (`libvirtd_shared`), guests or not: a bare `thaw` in
    one marked exclusive must never run beside another test's freeze."""
    runner = VF(tmp_path)
    yield runner
    runner.undo_views()
