#!/usr/bin/env python3
"""Benchmark: which part of an archive makes a writing guest stall, one load at a time.

A guest writes all the time (O_DIRECT + fsync per record) on a raw disk of
512 MiB of random data. Beside it, with the page cache dropped before each,
one load runs at a time, and the guest's largest write stall while it runs
is measured:

- CPU: busy loops (`sha256sum /dev/zero`), one or two, at nice 19 or under
  SCHED_IDLE (`chrt --idle`), for a fixed window;
- reading the disk image cold: through the page cache (`cat`, the disk's
  read-ahead), with O_DIRECT in 1 MiB requests (`dd iflag=direct`, as the
  device and segment views read), through a qemu-storage-daemon FUSE export
  with and without `cache.direct=on` (the qcow2 guest view);
- writing 1 GiB through the page cache and fdatasync (an archive's
  repository);
- borg itself (lz4, nice 19, ionice idle) with its repository on the same
  disk and on tmpfs; reading a copy of the image in RAM into a repository
  in RAM (no disk I/O at all: what its CPU and memory traffic alone cost a
  TCG guest), also held to half a CPU (a cgroup CFS quota: does the stall
  follow borg's share of the CPU?), and its reads held to 400 MB/s (a
  cgroup read limit) with the repository on tmpfs; on the same disk with
  what it writes sent to disk every 100 and 25 ms while it runs
  (`archive_priority.writeback_interval`:
  run as `backup` runs it, through priority.archiving), and with its writes
  limited to 100, 200 and 400 MB/s (`archive_priority.write_bps`: the
  cgroup virtfreeze makes for it), and written back every 25 ms with borg's
  fixed 4 MiB chunker (`--chunker-params fixed,4194304`: no rolling hash
  over every byte); borg's wall time is printed too.

The order rotates between runs. Medians, and ratios to the no-load window.

Usage: bench/contention.py [--runs 5] [--window 4]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import drop_caches, med, rotated  # noqa: E402

import libvirt  # noqa: E402

from tests.rig.acks import max_gap  # noqa: E402
from virtfreeze import priority, runner  # noqa: E402

from archive import BORG_ENV, guest_with_data  # noqa: E402

NICE = ["nice", "-n", "19"]
IDLE = ["chrt", "--idle", "0"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--window", type=float, default=4.0, help="seconds each CPU load runs")
    args = ap.parse_args()
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    conn = libvirt.open("qemu:///system")
    work = Path(tempfile.mkdtemp(prefix="vf-bench-contention-", dir="/var/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="vf-bench-contention-", dir="/dev/shm"))
    g = guest_with_data(conn, work / "vm", "vf-bench-contention", 512)
    image = str(g.disks["vdb"])
    window = args.window
    in_ram = shm / "image.raw"
    half = read_limit = None

    walls: dict[str, list[float]] = {}

    def measure(*commands: list[str], join: Path | None = None, call=None) -> float:
        """The guest's largest stall while `commands` run side by side, or `call()` runs (a quiet window
        when neither)."""
        drop_caches()
        g.watcher.wait_acks(20)
        t0 = time.monotonic()
        if call is not None:
            call()
        procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=BORG_ENV,
                                  preexec_fn=(lambda: join.write_text("0")) if join else None)
                 for c in commands]
        for p, c in zip(procs, commands):
            err = p.communicate()[1]
            # 124: timeout ended a CPU loop, as meant; borg 1: a warning ("file changed": the guest writes on)
            if p.returncode not in (0, 124) and not (p.returncode == 1 and "borg" in c):
                raise RuntimeError(f"{' '.join(c)}: exit {p.returncode}: {err.decode().strip()}")
        t1 = time.monotonic() if commands or call else t0 + window
        g.watcher.wait_acks(3, after=t1, timeout=window + 60)
        return max_gap(g.watcher.snapshot(), t0, t1)

    def cpu(prefix: list[str], n: int) -> float:
        return measure(*[["timeout", str(window), *prefix, "sha256sum", "/dev/zero"]] * n)

    def borg(row: str, repo: Path, write_bps: int | None = None, writeback: float | None = None,
             source: str = image, group: Path | None = None, extra: tuple[str, ...] = ()) -> float:
        """`group`: a cgroup.procs borg joins (a CPU quota, a read limit)."""
        shutil.rmtree(repo, ignore_errors=True)
        subprocess.run(["borg", "init", "--encryption=none", str(repo)], env=BORG_ENV, check=True,
                       capture_output=True)
        create = ["borg", "create", "--compression", "lz4", *extra, f"{repo}::a", source]
        if writeback:  # as `backup` runs it: through runner.run inside priority.archiving
            prio = priority.Priority(cpu_weight=None, writeback_interval=writeback)

            def call() -> None:
                with priority.archiving(prio, [image], "vf-bench-contention"):
                    runner.run(create, env=BORG_ENV, ok=(0, 1))

            t0 = time.monotonic()
            stall = measure(call=call)
            walls.setdefault(row, []).append(time.monotonic() - t0)
            return stall
        if write_bps:
            found = priority.write_limit_group(write_bps, priority.disks_under(image))
            if found is None:
                raise RuntimeError("this host has no cgroup I/O controller for write_bps")
            group = found[1] / "cgroup.procs"
        t0 = time.monotonic()
        stall = measure(["ionice", "-c", "3", *NICE, *create], join=group)
        walls.setdefault(row, []).append(time.monotonic() - t0)
        return stall

    def through_export(direct: bool) -> float:
        view, pidfile = work / "export.raw", work / "export.pid"
        view.touch()
        node = f"node-name=d,read-only=on,driver=raw,file.driver=file,file.filename={image.replace(',', ',,')}"
        subprocess.run(["qemu-storage-daemon", "--blockdev", node + (",cache.direct=on" if direct else ""),
                        "--export", f"type=fuse,id=d,node-name=d,writable=off,mountpoint={view}", "--daemonize",
                        "--pidfile", str(pidfile)], check=True)
        try:
            return measure(["cat", str(view)])
        finally:
            runner.stop_pid(int(pidfile.read_text()), what="qemu-storage-daemon")  # until it has exited

    loads = {
        "no load": lambda: measure(),
        "CPU: 1 busy loop, nice 19": lambda: cpu(NICE, 1),
        "CPU: 2 busy loops, nice 19": lambda: cpu(NICE, 2),
        "CPU: 2 busy loops, SCHED_IDLE": lambda: cpu(IDLE, 2),
        "read 512 MiB cold, page cache (cat)": lambda: measure(["cat", image]),
        "read 512 MiB cold, O_DIRECT 1 MiB (dd)": lambda: measure(
            ["dd", f"if={image}", "of=/dev/null", "bs=1M", "iflag=direct"]),
        "read through qemu-storage-daemon FUSE": lambda: through_export(False),
        "  the same with cache.direct=on": lambda: through_export(True),
        "write 1 GiB, page cache + fdatasync": lambda: measure(
            ["dd", "if=/dev/zero", f"of={work}/written", "bs=1M", "count=1024", "conv=fdatasync"]),
        "borg create (nice 19, ionice idle)": lambda: borg("borg create (nice 19, ionice idle)", work / "repo"),
        "  the same, repository on tmpfs": lambda: borg("  the same, repository on tmpfs", shm / "repo"),
    }
    row = "  image and repository in RAM (no disk I/O)"
    loads[row] = lambda row=row: borg(row, shm / "repo", source=str(in_ram))
    row = "  the same, held to half a CPU (CFS quota)"
    loads[row] = lambda row=row: borg(row, shm / "repo", source=str(in_ram), group=half[1] / "cgroup.procs")
    for every in (0.1, 0.025):
        row = f"  the same, written back every {every * 1000:.0f} ms" + (" (default)" if every == 0.025 else "")
        loads[row] = lambda row=row, every=every: borg(row, work / "repo", writeback=every)
    for mbps in (100, 200, 400):
        row = f"  on the same disk, writes held to {mbps} MB/s"
        loads[row] = lambda row=row, mbps=mbps: borg(row, work / "repo", mbps * 1_000_000)
    row = "  written back every 25 ms, fixed 4 MiB chunks"
    loads[row] = lambda row=row: borg(row, work / "repo", writeback=0.025, extra=("--chunker-params", "fixed,4194304"))
    row = "  repository on tmpfs, its reads held to 400 MB/s"
    loads[row] = lambda row=row: borg(row, shm / "repo", group=read_limit[1] / "cgroup.procs")
    stalls: dict[str, list[float]] = {k: [] for k in loads}
    try:
        shutil.copyfile(image, in_ram)
        half = priority._make_group(priority.CGROUP_ROOT, "cpu", "vf-bench-contention-half-cpu",
                                    [("cpu.max", "50000 100000\n")], "cpu",
                                    [("cpu.cfs_period_us", "100000\n"), ("cpu.cfs_quota_us", "50000\n")])
        if half is None:
            raise RuntimeError("this host has no cgroup CPU controller for a CFS quota")
        disks = sorted(priority.disks_under(image))
        read_limit = priority._make_group(priority.CGROUP_ROOT, "io", "vf-bench-contention-reads-400",
                                          [("io.max", f"{d} rbps=400000000\n") for d in disks], "blkio",
                                          [("blkio.throttle.read_bps_device", f"{d} 400000000\n") for d in disks])
        if read_limit is None:
            raise RuntimeError("this host has no cgroup I/O controller for a read limit")
        for run in range(args.runs):
            for k in rotated(loads, run):
                stalls[k].append(loads[k]())
            print(f"run {run + 1}/{args.runs}: " + ", ".join(f"{k.strip()} {stalls[k][-1] * 1000:.0f}ms"
                                                           for k in loads), flush=True)
        base = med(stalls["no load"])
        print(f"\nlargest write stall of a writing guest beside one load ({args.runs} runs, medians, 2 cores):")
        for k, v in stalls.items():
            wall = f"  (borg {med(walls[k]):.2f} s)" if k in walls else ""
            print(f"  {k:48} {med(v) * 1000:6.0f} ms {med(v) / base:5.1f}x{wall}")
        return 0
    finally:
        g.remove()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
        for group in (half, read_limit):
            if group is not None:
                group[1].rmdir()


if __name__ == "__main__":
    sys.exit(main())
