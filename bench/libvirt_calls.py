#!/usr/bin/env python3
"""Count the libvirt calls of one freeze and one live thaw of a running one-disk domain.

The CLI runs in this process with every public method of libvirt's
connection and domain objects wrapped by a counter, so the figure covers
whatever code path is installed (run it against an older checkout with
PYTHONPATH=<checkout>/hooks to compare). Prints the total per command and
the calls by name.

Usage: bench/libvirt_calls.py [--runs 3]
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import scratch  # noqa: E402  (also puts the repository on sys.path)

import libvirt  # noqa: E402

from tests.rig.guest import DiskSpec, create_guest  # noqa: E402

COUNTS: collections.Counter = collections.Counter()


def _count(cls) -> None:
    for name in dir(cls):
        if name.startswith("_") or not callable(getattr(cls, name)):
            continue
        method = getattr(cls, name)

        @functools.wraps(method)
        def counted(*args, _name=f"{cls.__name__}.{name}", _method=method, **kw):
            COUNTS[_name] += 1
            return _method(*args, **kw)

        setattr(cls, name, counted)


def run_cli(config: Path, *args: str) -> None:
    from virtfreeze.cli import cli

    try:
        cli(["-q", "--config", str(config), *args], standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise RuntimeError(f"virtfreeze {' '.join(args)} exited {e.code}") from None


def main() -> None:
    os.environ["VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # only the built-in merges: comparable across versions
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    conn = libvirt.open("qemu:///system")
    work, config = scratch("vf-bench-calls-")
    g = create_guest(conn, work / "guest", [DiskSpec("vda", "qcow2")], name="vf-bench-calls")
    _count(libvirt.virConnect)
    _count(libvirt.virDomain)
    per: dict[str, list[collections.Counter]] = {"freeze": [], "thaw": []}
    try:
        for _ in range(args.runs):
            for command in ("freeze", "thaw"):
                COUNTS.clear()
                run_cli(config, command, g.name)
                per[command].append(collections.Counter(COUNTS))
    finally:
        try:
            run_cli(config, "thaw")
        finally:
            g.remove()
            shutil.rmtree(work, ignore_errors=True)
    import virtfreeze

    print(f"libvirt calls per command, one running one-disk domain ({virtfreeze.__file__})")
    for command, runs in per.items():
        last = runs[-1]
        totals = [sum(c.values()) for c in runs]
        detail = ", ".join(f"{n.split('.', 1)[1]} {k}" for n, k in sorted(last.items(), key=lambda x: -x[1]))
        print(f"  {command:6s} total {totals} ({detail})")


if __name__ == "__main__":
    main()
