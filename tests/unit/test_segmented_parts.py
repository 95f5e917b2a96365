"""Pure parts of the segmented layout: a dirty bitmap's ranges as segments, the checkpoint document,
finding a guest view's daemon again by its argv, and the option text that carries paths."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from virtfreeze import dirty_bitmap, guest_view, segment_view

MIB = 1 << 20


@pytest.mark.parametrize("ranges, want", [
    ([], set()),
    ([(0, 512)], {0}),
    ([(MIB - 512, 1024)], {0, 1}),  # across a boundary: both
    ([(MIB, MIB)], {1}),  # exactly one segment: not the next
    ([(3 * MIB + 7, 0)], set()),  # empty ranges touch nothing
    ([(0, 4096), (5 * MIB, 3 * MIB)], {0, 5, 6, 7}),
])
def test_dirty_ranges_become_the_segments_they_touch(ranges, want):
    assert dirty_bitmap.segments_of(ranges, MIB) == want


def test_the_checkpoint_tracks_the_given_disks_and_no_other():
    root = ET.fromstring(dirty_bitmap.checkpoint_xml("virtfreeze-1", ["vda"], ["vdb", "sda"]))
    assert root.findtext("name") == "virtfreeze-1"
    assert {d.get("name"): d.get("checkpoint") for d in root.findall("disks/disk")} == \
        {"vda": "bitmap", "vdb": "no", "sda": "no"}


def test_segment_names_have_one_width_per_disk_so_they_sort_in_order():
    assert segment_view.segment_name(5, 10) == "000005"
    names = [segment_view.segment_name(i, 1_000_001) for i in (0, 99_999, 100_000, 999_999, 1_000_000)]
    assert names == sorted(names) and names[-1] == "1000000" and names[0] == "0000000"


def test_image_opts_double_commas_so_a_path_cannot_add_options():
    opts = dirty_bitmap.image_opts("/v/a,b.qcow2,driver=raw", block=True)
    assert opts == "driver=qcow2,force-share=on,file.driver=host_device,file.filename=/v/a,,b.qcow2,,driver=raw"


def test_a_guest_view_daemon_is_found_by_its_mountpoint_commas_and_all():
    argv = [guest_view.PROGRAM, "--blockdev", "x", "--export",
            "type=fuse,id=guest,node-name=guest,writable=off,mountpoint=/s/guest-views/u/a,,b.raw",
            "--daemonize"]
    assert guest_view.mountpoint_of(argv) == "/s/guest-views/u/a,b.raw"
    assert guest_view.mountpoint_of(["/usr/bin/qemu-system-x86_64", "--export", "mountpoint=/x"]) is None
    assert guest_view.mountpoint_of([guest_view.PROGRAM, "--export"]) is None


def test_a_segment_view_is_found_by_its_mountpoint_and_a_device_view_is_not_one():
    argv = segment_view.argv_for("/dev/vg/lv", "/e/web/disks/vda.segments", "/s/st.json", "/s/read.json", 5)
    assert segment_view.mountpoint_of(argv) == "/e/web/disks/vda.segments"
    from virtfreeze import device_view

    assert device_view.mountpoint_of(argv) is None
    assert segment_view.mountpoint_of(device_view.argv_for("/dev/sdb", "/e/web/disks/vdb.raw", 5)) is None
