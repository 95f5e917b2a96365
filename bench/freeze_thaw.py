#!/usr/bin/env python3
"""Benchmark: freeze and thaw times, and the guest-visible stall of a cycle.

Prints medians over several runs:
- freeze wall time (the CLI, as a hook runs it) for 1 and for N domains,
- thaw wall time for 1 and for N domains,
- the guest-visible stall (largest gap between acknowledged writes seen by
  the host) over the whole freeze -> archive window -> thaw cycle, against a
  baseline window of the same length with no backup, in the same process.

Usage: bench/freeze_thaw.py [--runs 5] [--domains 8] [--window 2.0]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import med, thaw_everything, vf  # noqa: E402

import libvirt  # noqa: E402

from tests.rig.acks import max_gap  # noqa: E402
from tests.rig.guest import DiskSpec, create_guest  # noqa: E402


def cycle(config: Path, guests, window: float) -> dict:
    names = [g.name for g in guests]
    t0 = time.monotonic()
    frozen = vf(config, "freeze", *names)["frozen"]
    t1 = time.monotonic()
    end = t1 + window  # the archive window: the guests keep writing into overlays
    guests[0].watcher.wait_for(lambda a: time.monotonic() >= end, window + 30, "archive window")
    t2 = time.monotonic()
    vf(config, "thaw", *names)
    t3 = time.monotonic()
    guests[0].watcher.wait_acks(20, after=t3)
    return {"freeze": t1 - t0, "thaw": t3 - t2, "snapshot": max(f["snapshot_seconds"] for f in frozen),
            "start": t0, "end": t3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--domains", type=int, default=8)
    ap.add_argument("--window", type=float, default=2.0, help="seconds between freeze and thaw")
    args = ap.parse_args()

    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    conn = libvirt.open("qemu:///system")
    work = Path(tempfile.mkdtemp(prefix="virtfreeze-bench-", dir="/var/tmp"))
    config = work / "virtfreeze.yaml"
    config.write_text(f"state_directory: {work}/state\nexport_directory: {work}/export\njobs: 8\n")
    guests = []
    try:
        print("phase 1: one writing guest alone (TCG, 192 MiB, qcow2 + raw disk)", flush=True)
        guests.append(create_guest(conn, work / "g0", [DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw")],
                                   name="vf-bench-0"))
        g0 = guests[0]
        single, multi, stalls, baselines = [], [], [], []
        for r in range(args.runs):
            c = cycle(config, [g0], args.window)
            length = c["end"] - c["start"]
            base_end = time.monotonic() + length  # baseline: same guest, same length, no backup
            g0.watcher.wait_for(lambda a: time.monotonic() >= base_end, length + 30, "baseline window")
            baselines.append(max_gap(g0.watcher.snapshot(), base_end - length, base_end))
            stalls.append(max_gap(g0.watcher.snapshot(), c["start"], c["end"]))
            single.append(c)
            print(f"  run {r + 1}/{args.runs}: freeze {c['freeze']:.3f}s thaw {c['thaw']:.3f}s "
                  f"stall {stalls[-1] * 1000:.0f}ms (baseline {baselines[-1] * 1000:.0f}ms)", flush=True)
        print(f"phase 2: {args.domains} writing guests at once", flush=True)
        for i in range(1, args.domains):
            guests.append(create_guest(conn, work / f"g{i}", [DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw")],
                                       name=f"vf-bench-{i}"))
        for r in range(args.runs):
            multi.append(cycle(config, guests, args.window))
            print(f"  run {r + 1}/{args.runs}: freeze {multi[-1]['freeze']:.3f}s thaw {multi[-1]['thaw']:.3f}s",
                  flush=True)

        print()
        print(f"medians over {args.runs} runs (archive window {args.window:.1f}s):")
        print(f"  freeze, 1 domain:            {med([c['freeze'] for c in single]):7.3f} s "
              f"(snapshot call {med([c['snapshot'] for c in single]) * 1000:.0f} ms)")
        print(f"  freeze, {args.domains} domains:          {med([c['freeze'] for c in multi]):7.3f} s "
              f"(x{med([c['freeze'] for c in multi]) / med([c['freeze'] for c in single]):.2f} of 1 domain)")
        print(f"  thaw, 1 domain:              {med([c['thaw'] for c in single]):7.3f} s")
        print(f"  thaw, {args.domains} domains:            {med([c['thaw'] for c in multi]):7.3f} s "
              f"(x{med([c['thaw'] for c in multi]) / med([c['thaw'] for c in single]):.2f} of 1 domain)")
        print(f"  guest-visible stall, cycle:  {med(stalls) * 1000:7.1f} ms")
        print(f"  same, baseline (no backup):  {med(baselines) * 1000:7.1f} ms")
        print(f"  stall / baseline:            {med(stalls) / med(baselines):7.2f}")
        print(f"  max stall seen in any cycle: {max(stalls) * 1000:7.1f} ms (baseline max {max(baselines) * 1000:.1f} ms)")
        return 0
    finally:
        for g in guests:
            g.remove()
        thaw_everything(config)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
