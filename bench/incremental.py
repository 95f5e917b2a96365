#!/usr/bin/env python3
"""Benchmark: nightly cost in proportion to what changed (issue 13, `export_layout: segmented`).

One writing guest with a qcow2 disk (default 4 GiB) full of random data,
backed up with `virtfreeze backup` the way a nightly run does: into the same
repository again. Each layout has its own borg repository (lz4) and restic
repository, so neither profits from chunks the other stored. Per case, each
run first changes the disk, then backs it up in the image layout (every
byte read: today's cost), then in the segmented layout:

- nothing changed (only the guest's own small writes);
- 16 MiB changed (the issue's goal case: at most 64 MiB read), 1 %, 10 %
  and 50 % of the disk: 4 MiB extents at random places, written through the
  guest's own virtio device (QEMU's block layer, as the guest's writes go,
  so the dirty bitmap sees them), with a new byte pattern each run;
- the hash fallback: the guest restarted before the run (every segment
  hashed here, still only the changed ones archived), with 1 % changed.

It prints medians of --runs runs: the wall time of each `backup` command
and their ratio, the bytes read through the segment view (its own
counters) and their share of the disk, and the guest's largest write stall
during each, against a window with no backup. Patterned extents compress
to almost nothing, so storing them costs less than random data would;
what is read and chunked is the same.

Usage: bench/incremental.py [--runs 3] [--size-mib 4096] [--segment-mib 16] [--tools borg,restic]
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
    ap.add_argument("--segment-mib", type=int, default=16)
    ap.add_argument("--tools", default="borg,restic")
    args = ap.parse_args()
    tools = args.tools.split(",")
    size, seg = args.size_mib << 20, args.segment_mib << 20
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    conn = libvirt.open("qemu:///system")
    work = Path(tempfile.mkdtemp(prefix="vf-bench-incremental-", dir="/var/tmp"))
    (work / "restic.pass").write_text("bench\n")
    env = dict(VF_ENV, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")
    for layout, extra in (("image", ""), ("segmented", f"export_layout: segmented\nsegment_size: {seg}\n")):
        (work / f"{layout}.yaml").write_text(  # each its own state: a run of the other layout would forget it
            f"state_directory: {work}/state-{layout}\nexport_directory: {work}/export\n{extra}"
            f"targets:\n  borg: {{type: borg, repository: '{work}/{layout}.borg', compression: lz4}}\n"
            f"  restic: {{type: restic, repository: '{work}/{layout}.restic', password_file: '{work}/restic.pass'}}\n")
        subprocess.run(["borg", "init", "-e", "none", f"{work}/{layout}.borg"], check=True, capture_output=True,
                       env=env)
        subprocess.run(["restic", "-q", "init"], check=True, capture_output=True,
                       env=dict(env, RESTIC_REPOSITORY=f"{work}/{layout}.restic", RESTIC_PASSWORD="bench"))
    g = create_guest(conn, work / "vm", [DiskSpec("vda", "qcow2", size_mib=args.size_mib)],
                     name="vf-bench-incremental", start=False)
    rng = random.Random(13)
    pattern = [0]
    try:
        fill_random(g.disks["vda"], args.size_mib, work)
        g.start()
        read_file = work / "state-segmented" / "segments" / g.uuid / "vda.read.json"

        def backup(layout: str, tool: str) -> tuple[float, int | None, float]:
            """(seconds, bytes read through the segment view or None, the guest's largest stall)."""
            read_file.unlink(missing_ok=True)
            drop_caches()
            g.watcher.wait_acks(20)
            t0 = time.monotonic()
            proc = subprocess.run([*VIRTFREEZE, "-q", "--json", "--config", str(work / f"{layout}.yaml"), "backup",
                                   "--target", tool, g.name], capture_output=True, text=True, env=env)
            t1 = time.monotonic()
            if proc.returncode != 0 or not json.loads(proc.stdout)["backups"][0]["ok"]:
                raise RuntimeError(f"backup failed: {proc.stdout}{proc.stderr}")
            g.watcher.wait_acks(5, after=t1)
            read = json.loads(read_file.read_text())["bytes_read"] if read_file.exists() else None
            return t1 - t0, read, max_gap(g.watcher.snapshot(), t0, t1)

        def changed(nbytes: int) -> None:
            if nbytes:
                pattern[0] = pattern[0] % 250 + 1
                change(g.name, size, nbytes, rng, pattern[0])

        cases = [("nothing changed", 0, False), ("16 MiB changed", 16 << 20, False),
                 ("1 % changed", size // 100, False), ("10 % changed", size // 10, False),
                 ("50 % changed", size // 2, False), ("hash fallback, 1 % changed", size // 100, True)]
        rows: dict[str, dict[str, tuple]] = {}
        for tool in tools:
            backup("image", tool)  # each repository holds the disk once, as after the first night
            backup("segmented", tool)
            rows[tool] = {}
            for label, nbytes, restart in cases:
                image, segmented = [], []
                for _ in range(args.runs):
                    if restart:
                        g.dom.destroy()  # another QEMU process: its bitmap cannot be trusted
                        g.start()
                    changed(nbytes)
                    image.append(backup("image", tool))
                    segmented.append(backup("segmented", tool))
                rows[tool][label] = (med([t for t, _r, _s in image]), med([t for t, _r, _s in segmented]),
                                     med([r for _t, r, _s in segmented]), med([s for _t, _r, s in image]),
                                     med([s for _t, _r, s in segmented]))

        window = med([rows[t]["nothing changed"][0] for t in tools])
        base = []
        for _ in range(args.runs):
            g.watcher.wait_acks(20)
            t0 = time.monotonic()
            g.watcher.wait_acks(1, after=t0 + window, timeout=window + 60)
            base.append(max_gap(g.watcher.snapshot(), t0, t0 + window))
        base_stall = med(base)

        print(f"\nincremental reads: {args.size_mib} MiB qcow2 disk of random data, segments of {seg >> 20} MiB, "
              f"changes in {EXTENT >> 20} MiB extents, medians of {args.runs} runs")
        print(f"guest stall with no backup ({window:.1f} s window): {base_stall * 1000:.0f} ms")
        for tool in tools:
            print(f"\n  {tool:28} {'image':>8} {'segmented':>10} {'ratio':>6} {'read':>10} {'of disk':>8} "
                  f"{'stall image':>12} {'stall segm.':>12}")
            for label, (t_img, t_seg, read, s_img, s_seg) in rows[tool].items():
                print(f"  {label:28} {t_img:7.2f}s {t_seg:9.2f}s {t_seg / t_img:6.2f} {read / 2**20:6.0f} MiB "
                      f"{read / size:7.1%} {s_img * 1000:6.0f}ms {s_img / base_stall:4.1f}x "
                      f"{s_seg * 1000:6.0f}ms {s_seg / base_stall:4.1f}x")
    finally:
        thaw_everything(work / "segmented.yaml")
        thaw_everything(work / "image.yaml")
        g.remove()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
