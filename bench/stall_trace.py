#!/usr/bin/env python3
"""Diagnosis: what the host's CPUs did during a writing guest's longest stalls, while borg archives or a thaw merges.

`--load borg` (the default): one writing guest with a raw disk of random
data, and borg archiving that disk as `backup` runs it (`archive_priority`
default: nice 19, ionice idle, CPU weight 10, its repository on the images'
disk written back every 25 ms). `--load thaw`: a guest writing about
9 MiB/s over two disks (as `bench/downtime.py`'s) is frozen for `--window`
seconds, then the live thaw is traced: its commit and pivot. `--load quiet`:
a window without either. The kernel's scheduler tracepoints (`sched_switch`,
`sched_wakeup`, through tracefs, mounted here if it is not) are recorded
with the clock the ack watcher uses.
For the longest gaps between the guest's acknowledged writes it prints how
long each task ran on each CPU inside the gap, and the tasks that waited
longest between being woken and running (QEMU's threads: `CPU 0/TCG` the
guest's virtual CPU, `worker` its I/O threads, `qemu-system-x86` its main
loop; `vf-writeback:…` virtfreeze's thread starting the writeback of
what borg writes, `acks-reader` this bench's thread reading the guest's
acknowledgements, `borg` borg). A stall the guest notices because QEMU's
threads wait for a CPU shows here as such waits; one it notices because
its I/O is slow shows as idle CPUs.

Usage: bench/stall_trace.py [--runs 3] [--gaps 3] [--load borg|thaw|quiet] [--window 40] [--size-mib 512]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import drop_caches, scratch, thaw_everything, vf, writing_guest  # noqa: E402

import libvirt  # noqa: E402

from tests.rig.acks import Ack  # noqa: E402
from virtfreeze import priority, runner  # noqa: E402

from archive import BORG_ENV, guest_with_data  # noqa: E402

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("sched/sched_switch", "sched/sched_wakeup")
LINE = re.compile(r"^\s*(?P<comm>.+?)-(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+\S+\s+(?P<ts>[\d.]+): (?P<event>\w+): (?P<rest>.*)$")
SWITCH = re.compile(r"prev_comm=(?P<prev>.*?) prev_pid=(?P<prev_pid>\d+) .*==> next_comm=(?P<next>.*?) "
                    r"next_pid=(?P<next_pid>\d+)")
WAKEUP = re.compile(r"comm=(?P<comm>.*?) pid=(?P<pid>\d+)")


@contextlib.contextmanager
def tracefs() -> Iterator[Path]:
    """tracefs, mounted for the while if it was not; the scheduler events off and the buffer emptied after."""
    mounted = False
    if not (TRACEFS / "trace").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True)
        mounted = True
    try:
        (TRACEFS / "trace_clock").write_text("mono")  # CLOCK_MONOTONIC: the clock of the acks' times
        (TRACEFS / "buffer_size_kb").write_text("65536")
        yield TRACEFS
    finally:
        (TRACEFS / "tracing_on").write_text("0")
        for event in EVENTS:
            (TRACEFS / "events" / event / "enable").write_text("0")
        (TRACEFS / "trace").write_text("")
        if mounted:
            subprocess.run(["umount", str(TRACEFS)], check=False)


def recorded(call) -> str:
    """The scheduler events while `call()` runs."""
    (TRACEFS / "trace").write_text("")
    for event in EVENTS:
        (TRACEFS / "events" / event / "enable").write_text("1")
    (TRACEFS / "tracing_on").write_text("1")
    try:
        call()
    finally:
        (TRACEFS / "tracing_on").write_text("0")
    return (TRACEFS / "trace").read_text()


def longest_gaps(acks: list[Ack], start: float, end: float, n: int) -> list[tuple[float, float]]:
    """The n longest intervals without an acknowledged write inside [start, end], longest first."""
    points = [start, *sorted(a.t for a in acks if start <= a.t <= end), end]
    return sorted(zip(points, points[1:]), key=lambda ab: ab[0] - ab[1])[:n]


def events(text: str) -> list[tuple[float, int, str, re.Match]]:
    """(time, cpu, event, its fields) of each sched_switch and sched_wakeup line."""
    out = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m and m["event"] in ("sched_switch", "sched_wakeup"):
            fields = (SWITCH if m["event"] == "sched_switch" else WAKEUP).search(m["rest"])
            if fields:
                out.append((float(m["ts"]), int(m["cpu"]), m["event"], fields))
    return out


def explain(evs, a: float, b: float, top: int = 4) -> list[str]:
    """What each CPU ran inside [a, b] (ms per task), and the longest waits from wakeup to running."""
    ran: dict[tuple[int, str], float] = {}
    current: dict[int, tuple[str, float]] = {}
    woken: dict[str, float] = {}
    waits = []
    for ts, cpu, event, f in evs:
        if event == "sched_wakeup":
            woken[f"{f['comm']}/{f['pid']}"] = ts
            continue
        prev, nxt = f"{f['prev']}/{f['prev_pid']}", f"{f['next']}/{f['next_pid']}"
        since = current.get(cpu, (prev, a))[1]
        if min(ts, b) > max(since, a):
            ran[cpu, prev] = ran.get((cpu, prev), 0.0) + min(ts, b) - max(since, a)
        current[cpu] = (nxt, ts)
        if nxt in woken:
            w = woken.pop(nxt)
            if ts >= a and w <= b:
                waits.append((ts - w, nxt, cpu, prev))
    for cpu, (who, since) in current.items():
        if b > max(since, a):
            ran[cpu, who] = ran.get((cpu, who), 0.0) + b - max(since, a)
    lines = []
    for cpu in sorted({c for c, _ in ran}):
        busy = sorted(((t, who) for (c, who), t in ran.items() if c == cpu), reverse=True)
        lines.append(f"    cpu{cpu} ran: " + ", ".join(f"{who.rsplit('/', 1)[0]} {t * 1000:.1f}" for t, who in busy
                                                       if t >= 0.0002))
    for wait, who, cpu, after in sorted(waits, reverse=True)[:top]:
        lines.append(f"    {who.rsplit('/', 1)[0]} waited {wait * 1000:.2f} ms to run on cpu{cpu} (after "
                     f"{after.rsplit('/', 1)[0]})")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gaps", type=int, default=3, help="longest gaps shown per run")
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--load", choices=["borg", "thaw", "quiet"], default="borg")
    ap.add_argument("--window", type=float, default=40.0, help="seconds frozen before a traced thaw")
    args = ap.parse_args()
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    conn = libvirt.open("qemu:///system")
    work, config = scratch("vf-bench-stall-trace-")
    if args.load == "thaw":
        g = writing_guest(conn, work / "vm", "vf-bench-stall-trace")
    else:
        g = guest_with_data(conn, work / "vm", "vf-bench-stall-trace", args.size_mib)
    image = str(g.disks["vdb"])
    repo = work / "repo"

    def borg() -> None:
        with priority.archiving(priority.Priority(), [image], "vf-bench-stall-trace"):
            runner.run(["borg", "create", "--compression", "lz4", f"{repo}::a", image], env=BORG_ENV, ok=(0, 1))

    load = {"borg": borg, "thaw": lambda: vf(config, "thaw", "--strategy", "live", g.name),
            "quiet": lambda: g.watcher.wait_acks(1, after=time.monotonic() + 1.5, timeout=60)}[args.load]
    try:
        with tracefs():
            for run in range(args.runs):
                if args.load == "borg":
                    shutil.rmtree(repo, ignore_errors=True)
                    runner.run(["borg", "init", "--encryption=none", str(repo)], env=BORG_ENV)
                if args.load == "thaw":
                    vf(config, "freeze", g.name)
                    g.watcher.wait_acks(1, after=time.monotonic() + args.window, timeout=args.window + 60)
                else:
                    drop_caches()
                g.watcher.wait_acks(20)
                t0 = time.monotonic()
                text = recorded(load)
                t1 = time.monotonic()
                g.watcher.wait_acks(3, after=t1, timeout=60)
                evs = events(text)
                gaps = longest_gaps(g.watcher.snapshot(), t0, t1, args.gaps)
                what = {"borg": "borg as backup runs it", "thaw": f"a live thaw after {args.window:g} s frozen",
                        "quiet": "a quiet window"}[args.load]
                print(f"run {run + 1}: {what}, {t1 - t0:.2f} s, {len(evs)} scheduler events", flush=True)
                for a, b in gaps:
                    print(f"  gap of {(b - a) * 1000:.1f} ms")
                    print("\n".join(explain(evs, a, b)), flush=True)
        return 0
    finally:
        thaw_everything(config)
        g.remove()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
