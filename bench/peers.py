#!/usr/bin/env python3
"""Benchmark: what the guest notices of its backup, virtfreeze against the plain way, side by side.

One writing guest with a raw disk full of incompressible data. Per run, with
the page cache dropped before each measurement, a fresh borg repository for
each, and the order rotating between runs:

- baseline: a window of the same length with no backup at all;
- plain script: `virsh snapshot-create-as --disk-only`, `borg create` of the
  base images, `virsh blockcommit --active --pivot` per disk (what people
  write by hand);
- virtfreeze `freeze` then `thaw` with no archive between (the stall of the
  snapshot and the pivot alone), and the same with `--memory` (the LIVE
  memory snapshot pauses the guest at its end);
- virtfreeze hook mode: `freeze`, `borg create` of the export view, `thaw`;
  again with borg under `nice -n 19 ionice -c 3`, and through `virtfreeze
  behind-guests` (as the recipes run it);
- virtfreeze driver mode: `backup --target borg` with the default
  `archive_priority` (nice 19, ionice idle, cgroup CPU weight 10, what borg
  writes to the images' disk sent to disk every 25 ms), with that writeback
  left to the kernel (`writeback_interval: null`), with `archive_priority`
  normal, and with `write_bps` (its writes to the images' disk limited to
  200 MiB/s);
- the same with `export_layout: segmented` and no state from an earlier run,
  so that every segment is read: the disks then come through the segment
  view (the raw disk, read with O_DIRECT) and the guest view (the qcow2 one,
  qemu-storage-daemon with `cache.direct=on`) instead of bind mounts read
  through the page cache;
- the plain script and virtfreeze `backup` again with the repository on
  another disk (`_common.other_disk`: ext4 on a RAM-backed loop device, its
  own queue and journal), where a repository belongs: what the guest
  notices of the archive's reads alone, without the repository's writes and
  flushes on the images' disk;
- virt-backup from PyPI (a snapshot, a plain copy into a directory, a
  blockcommit; no borg), installed into a venv under /var/tmp on the first
  run; when it does not install, the bench prints why and runs the rest.

It prints, per way, the median wall time and the median of the guest's
largest write stall, with the stall's ratio to the baseline's and the wall
time's ratio to the plain script's.

Usage: bench/peers.py [--runs 3] [--size-mib 512] [--way TEXT ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import VIRTFREEZE, drop_caches, med, other_disk, rotated  # noqa: E402

import libvirt  # noqa: E402

from tests.rig.acks import max_gap  # noqa: E402

from archive import BORG_ENV, VF_ENV, guest_with_data  # noqa: E402


def sh(*argv: str, **kw) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and "borg" not in argv):  # borg 1: a warning
        raise RuntimeError(f"{' '.join(argv)}: {proc.returncode}: {proc.stderr.strip()}")


VIRT_BACKUP_VENV = Path("/var/tmp/vf-bench-virt-backup")
VIRT_BACKUP_WAY = "virt-backup (snapshot, copy, blockcommit; no borg)"


def virt_backup() -> str | None:
    """The virt-backup program (installed from PyPI into a venv once), or None when it does not install."""
    program = VIRT_BACKUP_VENV / "bin" / "virt-backup"
    if not program.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VIRT_BACKUP_VENV)], check=True)
        proc = subprocess.run([str(VIRT_BACKUP_VENV / "bin" / "pip"), "install", "-q", "virt-backup"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"virt-backup did not install: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            shutil.rmtree(VIRT_BACKUP_VENV, ignore_errors=True)
            return None
    return str(program)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--way", action="append", metavar="TEXT", dest="ways",
                    help="only the ways whose name contains TEXT (repeatable; the plain script always runs, "
                         "as the wall time's reference): more runs of fewer ways in the same time")
    args = ap.parse_args()
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    conn = libvirt.open("qemu:///system")
    work = Path(tempfile.mkdtemp(prefix="vf-bench-peers-", dir="/var/tmp"))
    try:
        with other_disk("vf-bench-peers-") as apart:
            return compare(args, conn, work, apart / "repo.borg")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare(args: argparse.Namespace, conn: libvirt.virConnect, work: Path, repo_apart: Path) -> int:
    """Every way in turn, `args.runs` times; print the table."""
    repo = work / "repo.borg"
    def config_into(repository: Path) -> str:
        return (f"state_directory: {work}/state\nexport_directory: {work}/export\n"
                f"targets:\n  borg: {{type: borg, repository: '{repository}', compression: lz4}}\n")

    base = config_into(repo)
    (work / "low.yaml").write_text(base)
    (work / "apart.yaml").write_text(config_into(repo_apart))
    (work / "normal.yaml").write_text(base + "archive_priority: {nice: 0, ionice: none, cpu_weight: null, "
                                             "writeback_interval: null}\n")
    (work / "kernel.yaml").write_text(base + "archive_priority: {writeback_interval: null}\n")
    (work / "segmented.yaml").write_text(base + "export_layout: segmented\n")
    (work / "limited.yaml").write_text(base + "archive_priority: {write_bps: 209715200}\n")
    vb = virt_backup() if not args.ways or any(t in VIRT_BACKUP_WAY for t in args.ways) else None
    g = guest_with_data(conn, work / "vm", "vf-bench-peers", args.size_mib)
    name, disks = g.name, dict(g.disks)

    def fresh_repos() -> None:
        for r in (repo, repo_apart):
            shutil.rmtree(r, ignore_errors=True)
            sh("borg", "init", "--encryption=none", str(r), env=BORG_ENV)

    def vf(config: str, *a: str) -> None:
        sh(*VIRTFREEZE, "-q", "--config", str(work / config), *a, env=VF_ENV)

    def plain(into: Path = repo) -> None:
        specs = [f"--diskspec={t},file={p}.plain-ov.qcow2" for t, p in disks.items()]
        sh("virsh", "snapshot-create-as", name, "--disk-only", "--atomic", "--no-metadata", *specs)
        sh("borg", "create", f"{into}::plain", *map(str, disks.values()), env=BORG_ENV)
        for t, p in disks.items():
            sh("virsh", "blockcommit", name, t, "--active", "--pivot", "--wait")
            os.unlink(f"{p}.plain-ov.qcow2")

    def hook(how: str | None) -> None:
        vf("low.yaml", "freeze", name)
        prefix = {None: [], "niced": ["nice", "-n", "19", "ionice", "-c", "3"],
                  "behind": [*VIRTFREEZE, "--config", str(work / "low.yaml"), "behind-guests", "--"]}[how]
        sh(*prefix, "borg", "create", f"{repo}::hook", ".", cwd=work / "export" / name,
           env=dict(VF_ENV, **BORG_ENV))
        vf("low.yaml", "thaw", name)

    def cycle_only(memory: bool = False) -> None:
        vf("low.yaml", "freeze", *(["--memory"] if memory else []), name)
        vf("low.yaml", "thaw", name)

    ways = {
        "plain script (snapshot, borg, blockcommit)": plain,
        "virtfreeze freeze + thaw, no archive": cycle_only,
        "virtfreeze freeze --memory + thaw, no archive": lambda: cycle_only(True),
        "virtfreeze hook mode (freeze, borg, thaw)": lambda: hook(None),
        "  the same, borg under nice 19 + ionice idle": lambda: hook("niced"),
        "  the same, borg through virtfreeze behind-guests": lambda: hook("behind"),
        "virtfreeze backup, archive_priority default (low)": lambda: vf("low.yaml", "backup", "--target", "borg",
                                                                      name),
        "virtfreeze backup, writeback left to the kernel": lambda: vf("kernel.yaml", "backup", "--target", "borg",
                                                                      name),
        "virtfreeze backup, archive_priority normal": lambda: vf("normal.yaml", "backup", "--target", "borg", name),
        "virtfreeze backup, write_bps 200 MiB/s": lambda: vf("limited.yaml", "backup", "--target", "borg", name),
        "virtfreeze backup, segmented layout, everything read": lambda: (
            shutil.rmtree(work / "state" / "segments", ignore_errors=True),
            vf("segmented.yaml", "backup", "--target", "borg", name)),
        "plain script, repository on another disk": lambda: plain(repo_apart),
        "virtfreeze backup (default), repository on another disk": lambda: vf("apart.yaml", "backup", "--target",
                                                                              "borg", name),
    }
    if vb:
        (work / "virt-backup.yml").write_text(
            f"uri: qemu:///system\nthreads: 1\ngroups:\n  bench:\n    target: {work}/virt-backup\n"
            f"    packager: directory\n    hosts:\n      - {name}\n")

        def with_virt_backup() -> None:
            shutil.rmtree(work / "virt-backup", ignore_errors=True)
            (work / "virt-backup").mkdir()
            sh(vb, "-c", str(work / "virt-backup.yml"), "backup", "bench")

        ways[VIRT_BACKUP_WAY] = with_virt_backup
    if args.ways:
        ways = {w: f for w, f in ways.items() if w.startswith("plain script (") or any(t in w for t in args.ways)}
    walls: dict[str, list[float]] = {w: [] for w in ways}
    stalls: dict[str, list[float]] = {w: [] for w in ["baseline (no backup)", *ways]}
    try:
        for run in range(args.runs):
            for way in rotated(ways, run):
                fresh_repos()
                drop_caches()
                g.watcher.wait_acks(20)
                t0 = time.monotonic()
                ways[way]()
                t1 = time.monotonic()
                g.watcher.wait_acks(5, after=t1)
                walls[way].append(t1 - t0)
                stalls[way].append(max_gap(g.watcher.snapshot(), t0, t1))
            drop_caches()
            window = med([ws[-1] for ws in walls.values()])  # as long as a backup
            t0 = time.monotonic()
            g.watcher.wait_acks(1, after=t0 + window, timeout=window + 60)
            stalls["baseline (no backup)"].append(max_gap(g.watcher.snapshot(), t0, t0 + window))
        base_stall = med(stalls["baseline (no backup)"])
        plain_wall = med(walls["plain script (snapshot, borg, blockcommit)"])
        print(f"what the guest notices ({args.runs} runs, {args.size_mib} MiB of random data, 2 cores; medians):")
        print(f"  {'way':56} {'wall':>7} {'÷plain':>7} {'stall':>8} {'÷base':>6}")
        print(f"  {'baseline (no backup)':56} {'-':>7} {'-':>7} {base_stall * 1000:6.0f}ms {1:6.1f}")
        for way in ways:
            w, s = med(walls[way]), med(stalls[way])
            print(f"  {way:56} {w:6.2f}s {w / plain_wall:7.2f} {s * 1000:6.0f}ms {s / base_stall:6.1f}")
        return 0
    finally:
        g.remove()
        subprocess.run([*VIRTFREEZE, "-q", "--config", str(work / "low.yaml"), "thaw"], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
