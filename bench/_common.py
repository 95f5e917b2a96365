"""What the benchmarks share: running the virtfreeze CLI as a hook would, and medians."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VIRTFREEZE = [sys.executable, "-m", "virtfreeze"]


def vf(config: Path, *args: str, env: dict | None = None) -> dict:
    """Run `virtfreeze --json ARGS` with this config; return its parsed output."""
    out = subprocess.run([*VIRTFREEZE, "-q", "--json", "--config", str(config), *args],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout)


def thaw_everything(config: Path) -> None:
    """Clean-up after a benchmark, whatever happened: merge anything left frozen."""
    subprocess.run([*VIRTFREEZE, "-q", "--config", str(config), "thaw"], check=False)


def scratch(prefix: str) -> tuple[Path, Path]:
    """A scratch directory on disk (not tmpfs) and a virtfreeze config keeping state and export in it."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    config = work / "virtfreeze.yaml"
    config.write_text(f"state_directory: {work}/state\nexport_directory: {work}/export\n")
    return work, config


def drop_caches() -> None:
    """A cold cache for the next measurement."""
    import os

    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def med(xs) -> float:
    return statistics.median(xs)
