#!/usr/bin/env python3
"""Benchmark: what the export view costs borg, and what driver mode saves in overlay bytes.

1. Throughput. One writing guest with a raw disk full of incompressible data.
   Per run, into a fresh repository each: `virtfreeze backup --target borg`
   (borg reads the frozen image through the export view's read-only bind
   mount) against `borg create` of the same image file read directly.
   Medians of MB/s and their ratio (target >= 0.95: the view costs nothing).
   The order alternates between runs; a warm-up run is not counted.
2. Overlay bytes at thaw for N writing guests archived one after another:
   hook mode (`freeze` all, one `borg create` of the export directory, as
   borgmatic does, then `thaw`) against driver mode (`backup --jobs 1`,
   where each overlay lives only while its own domain is archived).

Usage: bench/archive.py [--runs 3] [--size-mib 512] [--domains 4] [--domain-mib 256]
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

from _common import med, thaw_everything, vf  # noqa: E402

import libvirt  # noqa: E402

from tests.rig.guest import DiskSpec, create_guest  # noqa: E402

BORG_ENV = dict(os.environ, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")
# The targets are entry-point plugins: autoload must be on.
VF_ENV = {k: v for k, v in os.environ.items() if k != "VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD"}


def borg(*args: str, cwd: Path | None = None) -> None:
    """Run borg; exit 1 is a warning (reading a live image directly: "file changed while we backed it up")."""
    proc = subprocess.run(["borg", *args], capture_output=True, text=True, env=BORG_ENV, cwd=cwd)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"borg {args[0]} failed ({proc.returncode}): {proc.stderr.strip()}")


def fresh_repo(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    borg("init", "--encryption=none", str(path))
    return path


def write_config(work: Path, repo: Path) -> Path:
    config = work / "virtfreeze.yaml"
    config.write_text(f"state_directory: {work}/state\nexport_directory: {work}/export\n"
                      f"targets:\n  borg: {{type: borg, repository: '{repo}', compression: lz4}}\n")
    return config


def guest_with_data(conn, workdir: Path, name: str, data_mib: int, stride: int = 1):
    """A writing guest whose raw vdb is full of random data (nothing for borg to compress away)."""
    g = create_guest(conn, workdir, [DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw", data_mib)],
                     name=name, start=False, stride=stride)
    with open(g.disks["vdb"], "r+b") as fh:
        for _ in range(data_mib):
            fh.write(os.urandom(1 << 20))
    g.start()
    return g


def throughput(conn, work: Path, runs: int, size_mib: int) -> None:
    g = guest_with_data(conn, work / "tp", "vf-bench-archive", size_mib)
    repo = work / "tp-repo"
    config = write_config(work, repo)
    image = g.disks["vdb"]
    try:
        via_view, direct = [], []

        def through_view() -> float:
            fresh_repo(repo)
            result = vf(config, "backup", "--target", "borg", g.name, env=VF_ENV)["backups"][0]
            archive = result["archives"][0]
            return archive["bytes"] / archive["seconds"] / 1e6

        def straight() -> float:
            fresh_repo(repo)
            t0 = time.monotonic()
            borg("create", "--compression", "lz4", f"{repo}::direct", image.name, cwd=image.parent)
            return os.stat(image).st_size / (time.monotonic() - t0) / 1e6

        through_view(), straight()  # warm-up: page cache, borg's first start
        for r in range(runs):
            order = [(through_view, via_view), (straight, direct)]
            for fn, out in (order if r % 2 == 0 else order[::-1]):
                out.append(fn())
            print(f"  run {r + 1}/{runs}: export view {via_view[-1]:.0f} MB/s, "
                  f"direct {direct[-1]:.0f} MB/s", flush=True)
        print(f"throughput, {size_mib} MiB image, borg lz4, medians over {runs} runs:")
        print(f"  virtfreeze backup (export view): {med(via_view):7.1f} MB/s")
        print(f"  borg create of the image itself:  {med(direct):7.1f} MB/s")
        print(f"  ratio view / direct:              {med(via_view) / med(direct):7.3f}  (target >= 0.95)")
    finally:
        g.remove()
        thaw_everything(config)


def overlay_bytes(conn, work: Path, runs: int, n: int, data_mib: int) -> None:
    repo = work / "ov-repo"
    config = write_config(work, repo)
    # One 512-byte record per 64 KiB cluster: overlays grow as a busy VM's do.
    guests = [guest_with_data(conn, work / f"ov{i}", f"vf-bench-archive-{i}", data_mib, stride=128)
              for i in range(n)]
    names = [g.name for g in guests]
    try:
        hook, driver = [], []
        for r in range(runs):
            fresh_repo(repo)
            t0 = time.monotonic()
            frozen = vf(config, "freeze", *names)["frozen"]
            borg("create", "--compression", "lz4", f"{repo}::hook-{r}", ".", cwd=Path(frozen[0]["export_dir"]).parent)
            hook.append(sum(t["overlay_bytes"] for t in vf(config, "thaw", *names)["thawed"]))
            t_hook = time.monotonic() - t0

            fresh_repo(repo)
            t0 = time.monotonic()
            backups = vf(config, "backup", "--jobs", "1", *names, env=VF_ENV)["backups"]
            driver.append(sum(b["overlay_bytes"] for b in backups))
            t_driver = time.monotonic() - t0
            print(f"  run {r + 1}/{runs}: hook mode {hook[-1] / 2**20:.1f} MiB in {t_hook:.1f}s, "
                  f"driver mode {driver[-1] / 2**20:.1f} MiB in {t_driver:.1f}s", flush=True)
        for g in guests:  # every acknowledged write survived all those cycles
            g.dom.destroy()
            for t in g.writing:
                report = g.check(t)
                assert report.ok, report
        print(f"overlay bytes at thaw, {n} writing domains with {data_mib} MiB each, "
              f"archived one after another, medians over {runs} runs:")
        print(f"  hook mode (freeze all, borg create, thaw): {med(hook) / 2**20:8.1f} MiB")
        print(f"  driver mode (backup --jobs 1):             {med(driver) / 2**20:8.1f} MiB")
        print(f"  hook / driver:                             {med(hook) / med(driver):8.2f}x")
    finally:
        for g in guests:
            g.remove()
        thaw_everything(config)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=512, help="throughput: image size")
    ap.add_argument("--domains", type=int, default=4)
    ap.add_argument("--domain-mib", type=int, default=256, help="overlay bytes: data disk size per domain")
    args = ap.parse_args()

    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    conn = libvirt.open("qemu:///system")
    work = Path(tempfile.mkdtemp(prefix="virtfreeze-archive-", dir="/var/tmp"))
    try:
        print("part 1: throughput through the export view", flush=True)
        throughput(conn, work, args.runs, args.size_mib)
        print(f"part 2: overlay bytes, hook mode vs driver mode, {args.domains} domains", flush=True)
        overlay_bytes(conn, work, args.runs, args.domains, args.domain_mib)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
