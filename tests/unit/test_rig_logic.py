"""Pure logic of the rig's measurements."""

import pytest

from tests.rig.acks import Ack, acked_by_disk, max_gap
from tests.rig.integrity import check_image


def test_max_gap_counts_window_edges():
    acks = [Ack(1.0, "vda", 0), Ack(1.5, "vda", 1), Ack(4.0, "vda", 2)]
    assert max_gap(acks, 0.0, 5.0) == 2.5
    assert max_gap(acks, 0.9, 1.6) == pytest.approx(0.5)
    assert max_gap([], 2.0, 3.0) == 1.0


def test_acked_by_disk_respects_until():
    acks = [Ack(1.0, "vda", 0), Ack(2.0, "vdb", 0), Ack(3.0, "vda", 1)]
    assert acked_by_disk(acks) == {"vda": [0, 1], "vdb": [0]}
    assert acked_by_disk(acks, until=2.0) == {"vda": [0], "vdb": [0]}


def _raw_image(tmp_path, records, nslots=8):
    data = bytearray(512 * nslots)
    for seq in records:
        rec = f"VFREC vda {seq:012d}\n".encode()
        off = (seq % nslots) * 512
        data[off:off + len(rec)] = rec
    p = tmp_path / "img.raw"
    p.write_bytes(bytes(data))
    return p


def test_check_image_accepts_wrapped_slots(tmp_path):
    img = _raw_image(tmp_path, range(0, 12))  # 8..11 overwrite 0..3
    assert check_image(img, "vda", list(range(12)), "raw").ok


def test_check_image_reports_missing_and_stale(tmp_path):
    img = _raw_image(tmp_path, [0, 1, 2])
    report = check_image(img, "vda", [0, 1, 2, 3, 4], "raw")
    assert report.missing == [3, 4]
    assert check_image(img, "vdb", [0], "raw").missing == [0]  # other disk's records don't count


def test_check_image_with_stride(tmp_path):
    nslots, stride = 16, 4
    data = bytearray(512 * nslots)
    for seq in range(10):  # seq 4.. overwrite slots of 0.. (period 4)
        rec = f"VFREC vda {seq:012d}\n".encode()
        off = ((seq * stride) % nslots) * 512
        data[off:off + 512] = rec.ljust(512, b"\0")
    img = tmp_path / "s.raw"
    img.write_bytes(bytes(data))
    assert check_image(img, "vda", list(range(10)), "raw", stride).ok
    assert check_image(img, "vda", [10], "raw", stride).missing == [10]
