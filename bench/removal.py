#!/usr/bin/env python3
"""Benchmark: what a writing guest notices of a large file's deletion beside it (a merged overlay, a memory image).

A guest writes all the time (about 9 MiB/s over two disks, as
`bench/downtime.py`'s). Per run, a file is grown 64 KiB at a time beside
another one, each append made durable, so that its extents interleave as a
qcow2 overlay's do while its guest writes; then it is deleted, on the
guest's file system, either with a plain unlink or with
`file_removal.remove` (shrunk from its end in steps, each committed, then
unlinked: what `thaw` does with overlays and memory images) at several step
sizes. Printed: the median of the guest's largest write stall from the
deletion until half a second after it (the journal commit that frees the
blocks comes with the guest's next flush), its ratio to the same window
without any deletion, and how long the deletion took.

Usage: bench/removal.py [--runs 5] [--size-mib 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import med, rotated, writing_guest  # noqa: E402

import libvirt  # noqa: E402

from tests.rig.acks import max_gap  # noqa: E402
from virtfreeze import file_removal  # noqa: E402

MiB = 1 << 20
AFTER = 0.5  # seconds after the deletion still counted: the commit freeing its blocks follows a flush


def fragmented(work: Path, size_mib: int) -> Path:
    """A file grown 64 KiB at a time beside another, each append durable: interleaved extents."""
    path, other = work / "overlay.qcow2", work / "other"
    chunk = os.urandom(64 << 10)
    with open(path, "wb") as f, open(other, "wb") as g:
        for _ in range(size_mib * 16):
            for fh in (f, g):
                fh.write(chunk)
                fh.flush()
                os.fdatasync(fh.fileno())
    os.unlink(other)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=200)
    args = ap.parse_args()
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    conn = libvirt.open("qemu:///system")
    work = Path(tempfile.mkdtemp(prefix="vf-bench-removal-", dir="/var/tmp"))
    g = writing_guest(conn, work / "vm", "vf-bench-removal")
    ways = {
        "no deletion (baseline)": None,
        "plain unlink": os.unlink,
        **{f"shrunk in {mib} MiB steps" + (" (thaw's)" if mib << 20 == file_removal.STEP else ""):
           (lambda p, mib=mib: file_removal.remove(p, step=mib * MiB)) for mib in (1, 4, 16)},
    }
    stalls: dict[str, list[float]] = {w: [] for w in ways}
    took: dict[str, list[float]] = {w: [] for w in ways}
    try:
        for run in range(args.runs):
            for way in rotated(ways, run):
                path = fragmented(work, args.size_mib)
                os.sync()
                g.watcher.wait_acks(20, after=time.monotonic())  # writing again after the file's fsyncs
                t0 = time.monotonic()
                if ways[way] is not None:
                    ways[way](path)
                t1 = time.monotonic()
                g.watcher.wait_acks(3, after=t1 + AFTER, timeout=60)
                stalls[way].append(max_gap(g.watcher.snapshot(), t0, t1 + AFTER))
                took[way].append(t1 - t0)
                if path.exists():
                    os.unlink(path)
            print(f"run {run + 1}/{args.runs}: " + ", ".join(f"{w} {stalls[w][-1] * 1000:.0f}ms" for w in ways),
                  flush=True)
        base = med(stalls["no deletion (baseline)"])
        print(f"\nlargest write stall of a writing guest while a {args.size_mib} MiB fragmented file is deleted "
              f"beside it ({args.runs} runs, medians):")
        for way in ways:
            print(f"  {way:32} {med(stalls[way]) * 1000:6.1f} ms {med(stalls[way]) / base:5.1f}x"
                  f"   took {med(took[way]):.2f} s")
        return 0
    finally:
        g.remove()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
