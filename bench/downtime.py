#!/usr/bin/env python3
"""Benchmark: guest downtime of each merge strategy after an archive window.

Strategies: live (the copy held to commit_bandwidth with the base written
back as it goes, the default); live with `commit_bandwidth: 0` (`live fast`:
the copy at full speed, the default before); iterative with its last overlay
merged with the guest's vCPUs paused (the default final step); iterative
with the last overlay merged with the guest saved (`iter+save`, what runs
where libvirt refuses commits with the guest running); offline.

A guest writes continuously (one 512-byte record per 64 KiB cluster, so its
overlays grow as a busy VM's would) while it is frozen for an archive window
of fixed length; then `virtfreeze thaw --strategy S` merges. For each window
length and strategy, medians over several runs of:
- the guest-visible stall: largest gap between acknowledged writes seen by
  the host over the whole cycle (includes reconnecting to the restored
  guest's serial socket, at most ~20 ms),
- the time the domain was not running, from libvirt lifecycle events,
- the overlay bytes merged with the guest stopped,
each strategy's stall also as a ratio to the no-backup baseline stall of a
window of the same length just before (median of the per-run ratios) and to
`offline` in the same run.

Usage: bench/downtime.py [--runs 3] [--windows 10 40]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import thaw_everything, vf, writing_guest  # noqa: E402

import libvirt  # noqa: E402

from tests.conftest import start_libvirt_event_loop  # noqa: E402
from tests.rig.acks import max_gap  # noqa: E402

# Row label -> (thaw --strategy, what the config used for the thaw adds to the defaults).
STRATEGIES = {"live": ("live", ""), "live fast": ("live", "commit_bandwidth: 0\n"),
              "iterative": ("iterative", "iterative_final_step: pause\n"),
              "iter+save": ("iterative", "iterative_final_step: save\n"), "offline": ("offline", "")}
STOPS = {libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED}
STARTS = {libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_RESUMED}


class Lifecycle:
    """Records when a domain stopped running and started again (libvirt events)."""

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain):
        self.events: list[tuple[float, int]] = []
        self.lock = threading.Lock()
        self.cb = conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on, None)
        self.conn = conn

    def _on(self, conn, dom, event, detail, opaque):
        with self.lock:
            self.events.append((time.monotonic(), event))

    def not_running(self, start: float, end: float) -> float:
        total, down_since = 0.0, None
        with self.lock:
            evs = [e for e in self.events if start <= e[0] <= end]
        for t, ev in evs:
            if ev in STOPS and down_since is None:
                down_since = t
            elif ev in STARTS and down_since is not None:
                total += t - down_since
                down_since = None
        return total + ((end - down_since) if down_since is not None else 0.0)

    def close(self):
        self.conn.domainEventDeregisterAny(self.cb)


def wait_until(g, end: float) -> None:
    g.watcher.wait_for(lambda a: time.monotonic() >= end, end - time.monotonic() + 60, "window")


def one_cycle(work: Path, g, life: Lifecycle, label: str, window: float) -> dict:
    strategy = STRATEGIES[label][0]
    config = work / f"virtfreeze-{label.replace(' ', '-').replace('+', '-')}.yaml"
    t0 = time.monotonic()
    vf(config, "freeze", g.name)
    wait_until(g, time.monotonic() + window)
    result = vf(config, "thaw", "--strategy", strategy, g.name)["thawed"][0]
    t1 = time.monotonic()
    g.watcher.wait_acks(20, after=t1)  # the guest writes again (after a restore too)
    return {"stall": max_gap(g.watcher.snapshot(), t0, t1), "down": life.not_running(t0, t1),
            "offline_bytes": result["offline_bytes"], "rounds": result["rounds"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--windows", type=float, nargs="+", default=[10.0, 40.0])
    args = ap.parse_args()

    start_libvirt_event_loop()
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    conn = libvirt.open("qemu:///system")
    work = Path(tempfile.mkdtemp(prefix="virtfreeze-downtime-", dir="/var/tmp"))
    for label, (_, extra) in STRATEGIES.items():
        (work / f"virtfreeze-{label.replace(' ', '-').replace('+', '-')}.yaml").write_text(
            f"state_directory: {work}/state\nexport_directory: {work}/export\n{extra}")
    config = work / "virtfreeze-live.yaml"
    guest = writing_guest(conn, work / "g", "vf-downtime")
    life = Lifecycle(conn, guest.dom)
    rows = []
    try:
        for window in args.windows:
            per = {s: [] for s in STRATEGIES}
            baseline, ratios, to_base = [], {s: [] for s in STRATEGIES}, {s: [] for s in STRATEGIES}
            for r in range(args.runs):
                b0 = time.monotonic()
                wait_until(guest, b0 + window + 2)
                baseline.append(max_gap(guest.watcher.snapshot(), b0, time.monotonic()))
                run = {s: one_cycle(work, guest, life, s, window) for s in STRATEGIES}
                for s in STRATEGIES:
                    per[s].append(run[s])
                    ratios[s].append(run[s]["stall"] / run["offline"]["stall"])
                    to_base[s].append(run[s]["stall"] / baseline[-1])
                print(f"window {window:.0f}s run {r + 1}/{args.runs}: " + ", ".join(
                    f"{s} stall {run[s]['stall'] * 1000:.0f}ms down {run[s]['down'] * 1000:.0f}ms "
                    f"offline {run[s]['offline_bytes'] / 2**20:.1f}MiB" for s in STRATEGIES)
                    + f"; baseline stall {baseline[-1] * 1000:.0f}ms", flush=True)
            for s in STRATEGIES:
                m = lambda k: statistics.median(x[k] for x in per[s])  # noqa: E731
                rows.append((window, s, m("stall"), statistics.median(to_base[s]), statistics.median(ratios[s]),
                             m("down"), m("offline_bytes"), m("rounds")))
            rows.append((window, "no backup", statistics.median(baseline), 1.0, None, 0.0, 0, 0))
        # Integrity once at the end: every acknowledged write is in the merged disks.
        guest.dom.destroy()
        for t in guest.disks:
            print(guest.check(t))
    finally:
        life.close()
        guest.remove()
        thaw_everything(config)
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"medians over {args.runs} runs; guest writes one record per 64 KiB cluster on 2 disks")
    print(f"{'window':>7} {'strategy':>10} {'stall':>10} {'vs no backup':>12} {'vs offline':>10} "
          f"{'not running':>12} {'merged offline':>15} {'rounds':>6}")
    for window, s, stall, vs_base, ratio, down, off, rounds in rows:
        print(f"{window:>6.0f}s {s:>10} {stall * 1000:>8.0f}ms {vs_base:>11.1f}x "
              f"{'' if ratio is None else f'{ratio:.2f}':>10} {down * 1000:>10.0f}ms {off / 2**20:>12.1f}MiB "
              f"{rounds:>6.0f}")
    offline = {w: d for w, s, _, _, _, d, _, _ in rows if s == "offline"}
    for label in ("iterative", "iter+save"):
        stopped = {w: d for w, s, _, _, _, d, _, _ in rows if s == label}
        for w in offline:
            if stopped.get(w):
                print(f"window {w:.0f}s: offline stops the guest {offline[w] / stopped[w]:.1f}x longer than {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
