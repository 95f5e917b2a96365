#!/usr/bin/env python3
"""Benchmark: nightly cost in proportion to what changed (issue 13, `export_layout: segmented`).

One writing guest with a qcow2 disk (default 4 GiB) full of random data, backed
up with `virtfreeze backup` into a borg and a restic repository (lz4 for borg),
each the way a nightly run would: into the same repository again.

- full: the image layout, where every run reads every byte (the baseline);
- segmented after the guest changed 16 MiB (the issue's goal case: at most
  64 MiB read), 1 %, 10 % and 50 % of the disk: 4 MiB extents at random
  places, written through the guest's own virtio device (QEMU's block layer,
  as the guest's writes go, so the dirty bitmap sees them), with a new byte
  pattern each run;
- the hash fallback: the same after the guest was restarted (every segment
  hashed here, still only the changed ones archived), with 1 % changed;
- per way, the guest's largest write stall, and a window with no backup.

It prints medians of --runs runs: wall time of the `backup` command, bytes
read through the segment view (the view's own counters), and ratios to the
full archive. Patterned extents compress to almost nothing, so the figures
for changed data understate what random data would cost to store; what
is read and chunked is the same.

Usage: bench/incremental.py [--runs 3] [--size-mib 4096] [--tools borg,restic]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import VIRTFREEZE, drop_caches, med, thaw_everything  # noqa: E402

import libvirt  # noqa: E402

from tests.rig.acks import max_gap  # noqa: E402
from tests.rig.guest import DiskSpec, create_guest  # noqa: E402

from archive import VF_ENV  # noqa: E402

SEG = 16 << 20
EXTENT = 4 << 20
DEVICE = "/machine/peripheral/virtio-disk0/virtio-backend"


def fill_random(image: Path, size_mib: int, work: Path) -> None:
    """The qcow2 image holds random data in every cluster (nothing to compress, nothing sparse)."""
    raw = work / "fill.raw"
    with open(raw, "wb") as fh:
        for _ in range(size_mib // 64):
            fh.write(os.urandom(64 << 20))
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()


def change(name: str, size: int, nbytes: int, rng: random.Random, pattern: int) -> None:
    """Write `nbytes` in 4 MiB extents at random 4 MiB-aligned places, through the guest's device."""
    slots = rng.sample(range(size // EXTENT), max(1, nbytes // EXTENT))
    for slot in slots:
        out = subprocess.run(["virsh", "qemu-monitor-command", "--hmp", name,
                              f'qemu-io -d {DEVICE} "write -P {pattern} {slot * EXTENT} {EXTENT}"'],
                             check=True, capture_output=True, text=True).stdout
        if out.strip():
            raise RuntimeError(f"qemu-io: {out.strip()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=4096)
    ap.add_argument("--tools", default="borg,restic")
    args = ap.parse_args()
    tools = args.tools.split(",")
    size = args.size_mib << 20
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    conn = libvirt.open("qemu:///system")
    work = Path(tempfile.mkdtemp(prefix="vf-bench-incremental-", dir="/var/tmp"))
    (work / "restic.pass").write_text("bench\n")
    targets = (f"targets:\n  borg: {{type: borg, repository: '{work}/repo.borg', compression: lz4}}\n"
               f"  restic: {{type: restic, repository: '{work}/repo.restic', password_file: '{work}/restic.pass'}}\n")
    common = f"state_directory: {work}/state\nexport_directory: {work}/export\n{targets}"
    (work / "image.yaml").write_text(common)
    (work / "segmented.yaml").write_text(common + f"export_layout: segmented\nsegment_size: {SEG}\n")
    env = dict(VF_ENV, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")
    subprocess.run(["borg", "init", "-e", "none", f"{work}/repo.borg"], check=True, capture_output=True, env=env)
    subprocess.run(["restic", "-q", "init"], check=True, capture_output=True,
                   env=dict(env, RESTIC_REPOSITORY=f"{work}/repo.restic", RESTIC_PASSWORD="bench"))
    g = create_guest(conn, work / "vm", [DiskSpec("vda", "qcow2", size_mib=args.size_mib)],
                     name="vf-bench-incremental", start=False)
    rng = random.Random(13)
    pattern = [0]
    try:
        fill_random(g.disks["vda"], args.size_mib, work)
        g.start()
        read_file = work / "state" / "segments" / g.uuid / "vda.read.json"

        def backup(config: str, tool: str) -> tuple[float, int | None, float]:
            """(seconds, bytes read through the view or None, the guest's largest stall)."""
            read_file.unlink(missing_ok=True)
            drop_caches()
            g.watcher.wait_acks(20)
            t0 = time.monotonic()
            proc = subprocess.run([*VIRTFREEZE, "-q", "--json", "--config", str(work / config), "backup",
                                   "--target", tool, g.name], capture_output=True, text=True, env=env)
            t1 = time.monotonic()
            if proc.returncode != 0 or not json.loads(proc.stdout)["backups"][0]["ok"]:
                raise RuntimeError(f"backup failed: {proc.stdout}{proc.stderr}")
            g.watcher.wait_acks(5, after=t1)
            read = json.loads(read_file.read_text())["bytes_read"] if read_file.exists() else None
            return t1 - t0, read, max_gap(g.watcher.snapshot(), t0, t1)

        def changed(nbytes: int) -> None:
            pattern[0] = pattern[0] % 250 + 1
            change(g.name, size, nbytes, rng, pattern[0])

        cases = [("16 MiB changed", 16 << 20), ("1 % changed", size // 100), ("10 % changed", size // 10),
                 ("50 % changed", size // 2)]
        rows: dict[str, dict[str, tuple[float, float | None, float]]] = {}
        for tool in tools:
            got: dict[str, list[tuple[float, int | None, float]]] = {}
            backup("image.yaml", tool)  # the repository holds the disk once, as after the first night
            got["full (image layout)"] = [backup("image.yaml", tool) for _ in range(args.runs)]
            backup("segmented.yaml", tool)  # the first segmented run reads everything
            for label, nbytes in cases:
                got[label] = []
                for _ in range(args.runs):
                    changed(nbytes)
                    got[label].append(backup("segmented.yaml", tool))
            got["hash fallback, 1 % changed"] = []
            for _ in range(args.runs):
                g.dom.destroy()  # another QEMU process: the bitmap cannot be trusted
                g.start()
                changed(size // 100)
                got["hash fallback, 1 % changed"].append(backup("segmented.yaml", tool))
            rows[tool] = {k: (med([s for s, _r, _x in v]),
                              med([r for _s, r, _x in v]) if all(r is not None for _s, r, _x in v) else None,
                              med([x for _s, _r, x in v])) for k, v in got.items()}

        window = med([rows[t]["full (image layout)"][0] for t in tools])
        base = []
        for _ in range(args.runs):
            g.watcher.wait_acks(20)
            t0 = time.monotonic()
            g.watcher.wait_acks(1, after=t0 + window, timeout=window + 60)
            base.append(max_gap(g.watcher.snapshot(), t0, t0 + window))
        base_stall = med(base)

        print(f"\nincremental reads: {args.size_mib} MiB qcow2 disk of random data, segments of {SEG >> 20} MiB, "
              f"changes in {EXTENT >> 20} MiB extents, medians of {args.runs} runs")
        print(f"guest stall with no backup ({window:.1f} s window): {base_stall * 1000:.0f} ms")
        for tool in tools:
            full_s = rows[tool]["full (image layout)"][0]
            print(f"\n  {tool:34} {'time':>8} {'× full':>7} {'read':>10} {'× disk':>7} {'stall':>8} {'× base':>7}")
            for label, (secs, read, stall) in rows[tool].items():
                read_text = "all" if read is None else f"{read / 2**20:.0f} MiB"
                read_ratio = "1.00" if read is None else f"{read / size:.3f}"
                print(f"  {label:34} {secs:7.2f}s {secs / full_s:7.2f} {read_text:>10} {read_ratio:>7} "
                      f"{stall * 1000:6.0f}ms {stall / base_stall:7.1f}")
    finally:
        thaw_everything(work / "segmented.yaml")
        g.remove()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
