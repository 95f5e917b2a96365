"""What the benchmarks share: running the virtfreeze CLI as a hook would, and medians."""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Iterator

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


@contextlib.contextmanager
def other_disk(prefix: str, size_mib: int = 3072) -> Iterator[Path]:
    """A second disk for a backup repository: ext4 on a loop device over a file in /dev/shm.

    A stand-in for the separate disk (or host) a repository belongs on: its
    own block queue, file system and journal, so that its writes and flushes
    do not share the images' disk (RAM-backed, so it shows what sharing costs,
    not how fast a real second disk is).
    """
    import tempfile

    from tests.rig.guest import attach_loop

    backing = Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm"))
    image, mountpoint = backing / "disk.img", backing / "mnt"
    mountpoint.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    dev = attach_loop(image)
    try:
        subprocess.run(["mkfs.ext4", "-q", dev], check=True)
        subprocess.run(["mount", dev, str(mountpoint)], check=True)
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", str(mountpoint)], check=False)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(backing, ignore_errors=True)


def drop_caches() -> None:
    """A cold cache for the next measurement."""
    import os

    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def med(xs) -> float:
    return statistics.median(xs)


def rotated(items, run: int) -> list:
    """`items` in the order of run number `run`: each run starts one later, so no way always goes first."""
    items = list(items)
    k = run % len(items)
    return items[k:] + items[:k]


def writing_guest(conn, workdir: Path, name: str):
    """A guest writing about 9 MiB/s over two 4 GiB disks, a qcow2 and a raw one (a record per 64 KiB
    cluster, so that an overlay grows as a busy VM's would)."""
    from tests.rig.guest import DiskSpec, create_guest

    return create_guest(conn, workdir, [DiskSpec("vda", "qcow2", 4096), DiskSpec("vdb", "raw", 4096)],
                        name=name, stride=128)
