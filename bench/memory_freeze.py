#!/usr/bin/env python3
"""Benchmark: the guest's stall over a `--memory` freeze, and what shortens it.

A LIVE external memory snapshot copies the guest's RAM into a file while it
runs, then pauses it. Until libvirt resumes it, the pause holds: QEMU's last
copy (bounded by the migration `downtime-limit`, 300 ms by default), libvirt's
fdatasync of the whole memory file, the creation of each disk's overlay
(`blockdev-create` jobs, each state saved with an fsync) and the switch to
them. Each variant below is one snapshot of the same writing guest, taken
with libvirt-python the way virtfreeze takes it, then merged back by
`virtfreeze thaw`:

- libvirt's defaults;
- `downtime-limit` lowered (migrateSetMaxDowntime before, the old value after);
- overlays created beforehand (qemu-img create + REUSE_EXT): none in the pause;
- the memory file written back while it grows (so the final fdatasync is short);
- all three;
- overlays created beforehand and the memory file on tmpfs (no fdatasync to
  wait for: what moving the memory image off the disk would give);
- `virtfreeze freeze --memory` itself (what the program does now), and with
  `memory_directory` on tmpfs;

against a baseline window of the same length without a backup, in the same
process. Prints the largest write stall (median over runs, and the ratio to
the baseline's median) and QEMU's own downtime (jobStats).

Usage: bench/memory_freeze.py [--runs 5] [--memory-mib 1024] [--downtime-ms 20]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import med, scratch, thaw_everything, vf  # noqa: E402

import libvirt  # noqa: E402

from tests.rig.acks import max_gap  # noqa: E402
from tests.rig.guest import DiskSpec, create_guest, remove_domain  # noqa: E402
from virtfreeze.domain_xml import parse_disks, snapshot_xml  # noqa: E402
from virtfreeze.memory_freeze import written_back  # noqa: E402


def raw_snapshot(dom, work: Path, n: int, *, downtime_ms: int | None, precreate: bool, writeback: bool,
                 memory_dir: Path | None = None) -> dict:
    """One LIVE memory snapshot as virtfreeze takes it, with the chosen changes."""
    live = dom.XMLDesc(0)
    disks = [d for d in parse_disks(live) if d.source and d.device == "disk"]
    overlays = {d.target: Path(f"{d.source}.virtfreeze.qcow2") for d in disks}
    memory_file = (memory_dir or work) / f"memory-{n}.save"
    flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
             | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_LIVE)
    if precreate:
        for d in disks:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", d.source, "-F", d.format or "raw",
                            str(overlays[d.target])], check=True)
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
    old = dom.migrateGetMaxDowntime(0) if downtime_ms is not None else None
    try:
        if downtime_ms is not None:
            dom.migrateSetMaxDowntime(downtime_ms, 0)
        t0 = time.monotonic()
        with written_back(memory_file) if writeback else contextlib.nullcontext():
            dom.snapshotCreateXML(snapshot_xml(disks, overlays, memory_file), flags)
        seconds = time.monotonic() - t0
    finally:
        if old is not None:
            dom.migrateSetMaxDowntime(old, 0)
    stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    memory_file.unlink()
    return {"seconds": seconds, "qemu_downtime": stats.get("downtime", 0) / 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--memory-mib", type=int, default=1024)
    ap.add_argument("--downtime-ms", type=int, default=20)
    args = ap.parse_args()

    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    conn = libvirt.open("qemu:///system")
    work, config = scratch("virtfreeze-bench-memory-")
    shm = Path(tempfile.mkdtemp(prefix="virtfreeze-bench-memory-", dir="/dev/shm"))
    g = create_guest(conn, work / "g", [DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw")], name="vf-bench-memory",
                     memory_mib=args.memory_mib)
    variants = {
        "libvirt defaults": dict(downtime_ms=None, precreate=False, writeback=False),
        f"downtime-limit {args.downtime_ms} ms": dict(downtime_ms=args.downtime_ms, precreate=False, writeback=False),
        "overlays created before (REUSE_EXT)": dict(downtime_ms=None, precreate=True, writeback=False),
        "memory file written back meanwhile": dict(downtime_ms=None, precreate=False, writeback=True),
        "all three": dict(downtime_ms=args.downtime_ms, precreate=True, writeback=True),
        "overlays before, memory file on tmpfs": dict(downtime_ms=None, precreate=True, writeback=False,
                                                      memory_dir=shm),
    }
    in_ram = work / "in-ram.yaml"
    in_ram.write_text(config.read_text() + f"memory_directory: {shm}/memory\n")
    ours = {"virtfreeze freeze --memory": config, "  the same, memory_directory on tmpfs": in_ram}
    stalls: dict[str, list[float]] = {k: [] for k in [*variants, *ours, "baseline"]}
    qemu: dict[str, list[float]] = {k: [] for k in variants}
    walls: dict[str, list[float]] = {k: [] for k in stalls}
    try:
        g.watcher.wait_acks(20)
        for r in range(args.runs):
            for label, how in [*variants.items(), *ours.items()]:
                t0 = time.monotonic()
                if isinstance(how, Path):
                    vf(how, "freeze", "--memory", g.name)
                else:
                    got = raw_snapshot(g.dom, work, r, **how)
                    qemu[label].append(got["qemu_downtime"])
                t1 = time.monotonic()
                g.watcher.wait_acks(5, after=t1)  # it writes again after the snapshot
                t2 = time.monotonic()
                vf(config, "thaw", g.name)
                stalls[label].append(max_gap(g.watcher.snapshot(), t0, t2))
                walls[label].append(t1 - t0)
                g.watcher.wait_acks(5, after=time.monotonic())
            length = med(walls["libvirt defaults"]) + 0.5
            start = time.monotonic()
            g.watcher.wait_for(lambda a: time.monotonic() >= start + length, length + 30, "baseline window")
            stalls["baseline"].append(max_gap(g.watcher.snapshot(), start, start + length))
            walls["baseline"].append(length)
            print(f"  run {r + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in stalls.items()),
                  flush=True)
    finally:
        thaw_everything(config)
        remove_domain(conn, name=g.name)
        shutil.rmtree(shm, ignore_errors=True)
    base = med(stalls["baseline"])
    print(f"\n{args.memory_mib} MiB writing guest (TCG), qcow2 + raw disk, {args.runs} runs, medians:")
    print(f"{'way':44s} {'stall':>8s} {'ratio':>7s} {'snapshot':>9s} {'QEMU downtime':>14s}")
    for k, v in stalls.items():
        q = f"{med(qemu[k]) * 1000:.0f} ms" if qemu.get(k) else "-"
        print(f"{k:44s} {med(v) * 1000:6.0f} ms {med(v) / base:6.1f}x {med(walls[k]):8.2f}s {q:>14s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
