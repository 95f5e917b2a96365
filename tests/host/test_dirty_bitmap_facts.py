"""Facts the changed-block tracking of issue 13 will build on, checked on this host's libvirt and QEMU:
a libvirt checkpoint's persistent dirty bitmap in a qcow2 base image coexists with virtfreeze's external
snapshots, is stored consistently while the domain is frozen (readable then, with qemu-nbd), and after a
thaw by any strategy covers every write the guest acknowledged since the checkpoint: in the overlay
(merged) and in the base (after the pivot)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import libvirt
import pytest

from tests.host.helpers import assert_all_acked_present, assert_back_on_base
from tests.rig.guest import DiskSpec
from virtfreeze.dirty_bitmap import dirty_ranges

CHECKPOINT = ("<domaincheckpoint><name>vf-facts</name><disks><disk name='vda' checkpoint='bitmap'/></disks>"
              "</domaincheckpoint>")


def _bitmaps(image: Path) -> list[dict]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out).get("format-specific", {}).get("data", {}).get("bitmaps") or []


@pytest.mark.parametrize("strategy", ["live", "iterative", "offline"])
def test_a_checkpoint_bitmap_survives_freeze_and_thaw_and_covers_every_write(guest_factory, vf, strategy):
    g = guest_factory([DiskSpec("vda", "qcow2")])
    base = g.disks["vda"]
    g.watcher.wait_acks(10)
    since = time.monotonic()
    g.dom.checkpointCreateXML(CHECKPOINT, 0)
    try:
        g.watcher.wait_acks(10, after=time.monotonic())
        vf("freeze", g.name)  # an external snapshot beside a checkpoint: not refused
        assert [(b["name"], b["flags"]) for b in _bitmaps(base)] == [("vf-facts", ["auto"])]  # stored, not in-use
        g.watcher.wait_acks(20, after=time.monotonic())  # writes into the overlay
        vf("thaw", "--strategy", strategy, g.name)
        g.watcher.wait_acks(20, after=time.monotonic())  # writes into the base again
        until = time.monotonic()
        vf("freeze", g.name)  # the next run reads the bitmap while the domain is frozen
        dirty = dirty_ranges(str(base), "vf-facts", g.name, "vda")  # the reader freeze uses
        size = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(base)], check=True,
                                         capture_output=True, text=True).stdout)["virtual-size"]
        written = {(a.seq % (size // 512)) * 512 for a in g.watcher.snapshot()
                   if a.disk == "vda" and since < a.t < until}
        assert len(written) >= 50
        uncovered = [o for o in written if not any(s <= o < s + n for s, n in dirty)]
        assert uncovered == [], f"{len(uncovered)} written sectors not in the bitmap ({dirty})"
        assert sum(n for _s, n in dirty) < size // 4  # it tracks what changed, not everything
        vf("thaw", g.name)
    finally:
        try:
            g.dom.checkpointLookupByName("vf-facts").delete(0)
        except libvirt.libvirtError:
            pass
    assert _bitmaps(base) == []
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)
