#!/usr/bin/env python3
"""Benchmark: what the device view (virtfreeze.device_view, FUSE) costs against reading the device.

A writing guest whose vdb is a block device (a loop device standing in for
an LVM volume) full of incompressible data is frozen once per run. While it
is frozen, with the page cache dropped before each read:

1. plain read (1 MiB reads to the end): the device itself against the
   export view's regular file;
2. `borg create` into a fresh repository: `--read-special` of the device
   (what a borg user would otherwise configure) against the view file.

The order alternates between runs. Medians in MB/s and the ratio view/direct.

Usage: bench/block_view.py [--runs 3] [--size-mib 512]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import med, scratch, thaw_everything, vf  # noqa: E402

import libvirt  # noqa: E402

from tests.rig.guest import DiskSpec, create_guest  # noqa: E402

BORG_ENV = dict(os.environ, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")


def drop_caches() -> bool:
    """Cold cache for the next read (root only); False where the kernel refuses."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
        return True
    except OSError:
        return False


def read_all(path: Path) -> float:
    """Seconds to read `path` to its end."""
    t0 = time.monotonic()
    with open(path, "rb", buffering=0) as fh:
        while fh.read(1 << 20):
            pass
    return time.monotonic() - t0


def borg_create(repo: Path, source: Path, read_special: bool) -> float:
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run(["borg", "init", "--encryption=none", str(repo)], check=True, capture_output=True, env=BORG_ENV)
    drop_caches()
    t0 = time.monotonic()
    args = ["borg", "create", "--compression", "lz4", *(["--read-special"] if read_special else []),
            f"{repo}::a", source.name]
    proc = subprocess.run(args, capture_output=True, text=True, env=BORG_ENV, cwd=source.parent)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"borg create failed: {proc.stderr.strip()}")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=512)
    args = ap.parse_args()
    conn = libvirt.open("qemu:///system")
    work, config = scratch("vf-bench-block-")
    g = create_guest(conn, work / "guest", [DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw", args.size_mib, block=True)],
                     name="vf-bench-block", start=False)
    device = g.disks["vdb"]
    with open(device, "r+b") as fh:
        for _ in range(args.size_mib):
            fh.write(os.urandom(1 << 20))
        os.fsync(fh.fileno())
    g.start()
    mb = args.size_mib * (1 << 20) / 1e6
    read = {"direct": [], "view": []}
    archive = {"direct": [], "view": []}
    cold = True
    try:
        for run in range(args.runs):
            vf(config, "freeze", g.name)
            view = work / "export" / g.name / "disks" / "vdb.raw"
            order = ["direct", "view"] if run % 2 == 0 else ["view", "direct"]
            for way in order:
                cold &= drop_caches()
                read[way].append(mb / read_all(device if way == "direct" else view))
            for way in order:
                secs = borg_create(work / "repo", device if way == "direct" else view, read_special=way == "direct")
                archive[way].append(mb / secs)
            vf(config, "thaw", g.name)
    finally:
        thaw_everything(config)
        g.remove()
        shutil.rmtree(work, ignore_errors=True)
    print(f"block device {args.size_mib} MiB of random data, {args.runs} runs, "
          f"{'cold' if cold else 'WARM (could not drop caches)'} cache; medians in MB/s")
    for what, res in (("read", read), ("borg create", archive)):
        d, v = med(res["direct"]), med(res["view"])
        print(f"  {what:12s} device directly {d:8.1f}   through the view {v:8.1f}   ratio view/direct {v / d:.3f}")


if __name__ == "__main__":
    main()
