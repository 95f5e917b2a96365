"""The rig measures what it claims: writes survive a snapshot + active commit,
and a single lost record is caught."""

from __future__ import annotations

import queue
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET

import libvirt

from tests.rig.acks import max_gap
from tests.rig.guest import DiskSpec
from tests.rig.integrity import check_image, corrupt_record, records_in


def disk_sources(dom: libvirt.virDomain, flags: int = 0) -> dict[str, str]:
    root = ET.fromstring(dom.XMLDesc(flags))
    return {d.find("target").get("dev"): d.find("source").get("file")
            for d in root.findall("devices/disk") if d.find("source") is not None}


def test_snapshot_and_active_commit_keep_every_acknowledged_write(libvirt_conn, guest_factory, tmp_path):
    g = guest_factory([DiskSpec("vda", "qcow2"), DiskSpec("vdb", "raw")])
    g.watcher.wait_acks(40)
    dom = g.dom
    overlays = {t: tmp_path / f"{t}.overlay.qcow2" for t in g.disks}
    disks_xml = "".join(f"<disk name='{t}' snapshot='external'><source file='{p}'/></disk>"
                        for t, p in overlays.items())
    t_before = time.monotonic()
    dom.snapshotCreateXML(f"<domainsnapshot><disks>{disks_xml}</disks></domainsnapshot>",
                          libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                          | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                          | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
    assert disk_sources(dom) == {t: str(p) for t, p in overlays.items()}
    g.watcher.wait_acks(40)  # the guest keeps writing, now into the overlays

    # While frozen, the base holds everything acknowledged before the snapshot.
    for t in g.disks:
        report = g.check(t, until=t_before)
        assert report.checked > 0 and report.ok, report

    events: queue.Queue = queue.Queue()
    cb = libvirt_conn.domainEventRegisterAny(
        dom, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
        lambda conn, d, disk, type_, status, opaque: events.put((disk, status)), None)
    try:
        for t in g.disks:
            dom.blockCommit(t, str(g.disks[t]), None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
            while True:  # wait for this disk's READY event (never poll cur == end)
                disk, status = events.get(timeout=60)
                assert status != libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED, f"commit of {disk} failed"
                if disk == t and status == libvirt.VIR_DOMAIN_BLOCK_JOB_READY:
                    break
            dom.blockJobAbort(t, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
    finally:
        libvirt_conn.domainEventDeregisterAny(cb)
    t_pivot = time.monotonic()
    assert disk_sources(dom) == {t: str(p) for t, p in g.disks.items()}

    g.watcher.wait_acks(40, after=t_pivot)  # and keeps writing, now into the base again
    dom.destroy()
    for t in g.disks:
        report = g.check(t)
        assert report.checked > 0 and report.ok, report
    acks = g.watcher.snapshot()
    assert max_gap(acks, t_before, t_pivot) < 30  # sanity: the guest never stopped for long


def test_integrity_check_catches_one_lost_record(guest_factory, tmp_path):
    g = guest_factory([DiskSpec("vda", "qcow2")])
    g.watcher.wait_acks(30)
    g.dom.destroy()
    acked = g.acked()["vda"]
    raw = tmp_path / "copy.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(g.disks["vda"]), str(raw)], check=True)
    assert check_image(raw, "vda", acked, "raw").ok

    victim = acked[len(acked) // 2]
    nslots, found = records_in(raw, "vda", "raw")
    assert found[victim % nslots] == victim
    corrupt_record(raw, victim % nslots)
    report = check_image(raw, "vda", acked, "raw")
    assert not report.ok
    assert report.missing == [victim]

    # A record that was never written (an ack the image does not back) is caught too. It is one past
    # the newest record on disk: the guest may have written max(acked) + 1 before its ack was lost.
    fresh = tmp_path / "fresh.raw"
    shutil.copy(raw, fresh)
    unwritten = max(found.values()) + 1
    assert check_image(fresh, "vda", [unwritten], "raw").missing == [unwritten]
