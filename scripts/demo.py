#!/usr/bin/env python3
"""The main job, end to end, on a throwaway writing VM (`make demo`)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import libvirt  # noqa: E402

from tests.rig.guest import DiskSpec, create_guest  # noqa: E402


def main() -> int:
    conn = libvirt.open("qemu:///system")
    with tempfile.TemporaryDirectory(prefix="virtfreeze-demo-") as tmp:
        t0 = time.monotonic()
        guest = create_guest(conn, Path(tmp) / "guest", [DiskSpec("vda", "qcow2", 64)],
                             name="virtfreeze-demo")
        try:
            print(f"demo: guest {guest.name} booted and writing in {time.monotonic() - t0:.1f}s")
            guest.watcher.wait_acks(100)
            print(f"demo: {len(guest.watcher.snapshot())} writes acknowledged")
            print("demo: freeze/thaw are not implemented yet; stopping after booting the demo guest")
        finally:
            guest.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
