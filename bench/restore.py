#!/usr/bin/env python3
"""Benchmark: what `virtfreeze restore` costs over borg's own extract, and how soon a restored guest runs.

One writing guest whose raw disk is full of incompressible data is backed up
once with its memory state (`virtfreeze backup --memory --target borg`) and
deleted. Then, per run, with the page cache dropped before each measurement
and the order alternating:

1. Throughput. `borg extract --sparse` of the whole archive alone into a
   fresh directory on the same filesystem, then `sync` (the restore makes
   its files durable before it defines the domain), against `virtfreeze restore
   --no-start --no-memory` of the same archive (extract into staging, link
   into place, `qemu-img check`, define). Medians of MB/s of the disk data
   and their ratio (goal >= 0.95: the restore costs little beyond the
   extract).
   Both name the archive (as `restore --archive NAME`; `latest` adds one
   `borg list`).
2. Time to running. `virtfreeze restore` resumed from the memory state
   against `--no-memory` (a cold boot), each from the start of the command
   to the guest's first acknowledged write. Medians and their ratio.
3. Verify. The wall time of `virtfreeze verify --seconds 0` of the same
   archive (restore as a throwaway domain resumed from memory, checks,
   removal), from borg (extracted) and from a directory target (read in
   place through overlays, after its checksums), against the restore of 1.

Usage: bench/restore.py [--runs 3] [--size-mib 2048]
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

from _common import VIRTFREEZE, drop_caches, med  # noqa: E402

import libvirt  # noqa: E402

from tests.rig.acks import AckWatcher  # noqa: E402
from tests.rig.guest import SOCKET_DIR, DiskSpec, create_guest, remove_domain  # noqa: E402
from tests.rig.guest_image import cache_dir  # noqa: E402

from archive import BORG_ENV, VF_ENV, borg  # noqa: E402


def delete(conn, name: str, files: list[Path]) -> None:
    """Remove the domain and its disk files (what a restore then brings back)."""
    remove_domain(conn, name=name)
    for p in files:
        p.unlink(missing_ok=True)


def restore(config: Path, name: str, *args: str) -> float:
    t0 = time.monotonic()
    subprocess.run([*VIRTFREEZE, "-q", "--config", str(config), "restore", name, "--target", "borg", *args],
                   check=True, env=VF_ENV, capture_output=True)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=2048)
    args = ap.parse_args()
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    conn = libvirt.open("qemu:///system")
    work = Path(tempfile.mkdtemp(prefix="vf-bench-restore-", dir="/var/tmp"))
    repo = work / "repo.borg"
    config = work / "virtfreeze.yaml"
    config.write_text(f"state_directory: {work}/state\nexport_directory: {work}/export\n"
                      f"restore_directories: ['{work}', '{SOCKET_DIR}', '{cache_dir()}']\n"
                      f"targets:\n  borg: {{type: borg, repository: '{repo}', compression: lz4}}\n"
                      f"  dir: {{type: directory, path: '{work / 'dir-target'}'}}\n")
    (work / "dir-target").mkdir()
    g = create_guest(conn, work / "vm", [DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw", args.size_mib)],
                     name="vf-bench-restore", start=False)
    try:
        with open(g.disks["vdb"], "r+b") as fh:
            for _ in range(args.size_mib):
                fh.write(os.urandom(1 << 20))
        g.start()
        g.watcher.wait_acks(50)
        borg("init", "--encryption=none", str(repo))
        subprocess.run([*VIRTFREEZE, "-q", "--config", str(config), "backup", "--memory", "--target", "borg",
                        "--target", "dir", g.name], check=True, env=VF_ENV, capture_output=True)
        g.watcher.close()
        g.watcher = None
        archive = subprocess.run(["borg", "list", "--short", "--last", "1", str(repo)], check=True,
                                 capture_output=True, text=True, env=BORG_ENV).stdout.strip()
        files = list(g.disks.values())
        data_mb = sum(os.path.getsize(p) for p in files) / 1e6
        delete(conn, g.name, files)

        extract_s, restore_s, memory_s, cold_s = [], [], [], []
        verify_s: dict[str, list[float]] = {"borg": [], "dir": []}

        def verify(target: str) -> None:
            drop_caches()
            t0 = time.monotonic()
            subprocess.run([*VIRTFREEZE, "-q", "--config", str(config), "verify", g.name, "--target", target,
                            "--seconds", "0"], check=True, env=VF_ENV, capture_output=True)
            verify_s[target].append(time.monotonic() - t0)

        def borg_alone() -> None:
            dest = work / "extract"
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            drop_caches()
            t0 = time.monotonic()
            borg("extract", "--sparse", f"{repo}::{archive}", cwd=dest)
            os.sync()  # on disk, as the restore makes sure before it defines the domain
            extract_s.append(time.monotonic() - t0)
            shutil.rmtree(dest)

        def virtfreeze_restore() -> None:
            drop_caches()
            restore_s.append(restore(config, g.name, "--archive", archive, "--no-start", "--no-memory"))
            delete(conn, g.name, files)

        def to_running(memory: bool) -> None:
            drop_caches()
            watcher = AckWatcher(g.sock)
            try:
                t0 = time.monotonic()
                restore(config, g.name, "--start", "--memory" if memory else "--no-memory")
                watcher.wait_acks(1, timeout=120)
                (memory_s if memory else cold_s).append(watcher.snapshot()[0].t - t0)
            finally:
                watcher.close()
                delete(conn, g.name, files)

        for run in range(args.runs):
            order = [borg_alone, virtfreeze_restore] if run % 2 == 0 else [virtfreeze_restore, borg_alone]
            for step in order:
                step()
            for memory in ((True, False) if run % 2 == 0 else (False, True)):
                to_running(memory)
            for target in (("borg", "dir") if run % 2 == 0 else ("dir", "borg")):
                verify(target)

        b, r = data_mb / med(extract_s), data_mb / med(restore_s)
        print(f"restore throughput ({args.runs} runs, {data_mb:.0f} MB of disk data; both extract the whole "
              "archive, memory image included):")
        print(f"  borg extract alone:          median {med(extract_s):.2f}s = {b:.0f} MB/s")
        print(f"  virtfreeze restore (no start): median {med(restore_s):.2f}s = {r:.0f} MB/s")
        print(f"  ratio restore/extract: {r / b:.2f} (goal >= 0.95); the restore's own time: "
              f"{med(restore_s) - med(extract_s):+.2f}s (a small extract of the definition first, qemu-img check, "
              "define)")
        print("time to running (command start to the guest's first acknowledged write):")
        print(f"  resumed from memory: median {med(memory_s):.2f}s  {[f'{x:.2f}' for x in memory_s]}")
        print(f"  cold boot:           median {med(cold_s):.2f}s  {[f'{x:.2f}' for x in cold_s]}")
        print(f"  ratio memory/cold: {med(memory_s) / med(cold_s):.2f}")
        print("verify --seconds 0 (restore as a throwaway domain, resumed from memory; checks; removal):")
        for target, how in (("borg", "extracted"), ("dir", "read in place through overlays")):
            print(f"  from {target} ({how}): median {med(verify_s[target]):.2f}s; "
                  f"{med(verify_s[target]) / med(restore_s):.2f}x the restore of 1")
        return 0
    finally:
        g.remove()
        subprocess.run(["borg", "delete", "--cache-only", str(repo)], env=BORG_ENV, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
