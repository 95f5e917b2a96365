"""Issue 13's change logic: a stamp moves exactly when a segment may have changed, never goes back, stays
older than the freeze; anything untrustworthy restamps everything (a full read), with its reason."""

import os

import pytest

from virtfreeze.segment_stamps import (
    MARGIN_NS, Identity, SegmentState, changed_by_hash, distrust, next_stamps, rehash, segment_count,
)

MIB = 1 << 20
ID = Identity("/v/web.qcow2", 1, 2, 8 * MIB, "qcow2")
QEMU = "boot:4242:777"


def _state(**kw) -> SegmentState:
    return SegmentState(**{"segment_size": MIB, "identity": ID, "stamps": [10**12] * 8, "qemu": QEMU, **kw})


def test_only_changed_segments_get_the_new_stamp_which_is_newer_and_older_than_the_freeze():
    prev = _state(stamps=[10**12 + i for i in range(8)])
    freeze = 5 * 10**12
    got = next_stamps(prev, {2, 5}, 8, freeze)
    assert [i for i in range(8) if got[i] != prev.stamps[i]] == [2, 5]
    assert got[2] == got[5] == freeze - MARGIN_NS and got[2] > max(prev.stamps)


def test_an_untrusted_or_first_run_restamps_everything_and_never_reuses_a_stamp():
    prev = _state(stamps=[7 * 10**12] * 8)
    freeze = 7 * 10**12 + 10  # the clock barely moved since the last run's stamps
    everything = next_stamps(prev, None, 8, freeze)
    assert len(set(everything)) == 1 and everything[0] == 7 * 10**12 + 1 < freeze
    assert next_stamps(None, {1}, 8, freeze) == [freeze - MARGIN_NS] * 8
    back = next_stamps(prev, {1}, 8, 7 * 10**12 - 10**15)  # the clock went back: still new, never reused
    assert back[1] == 7 * 10**12 + 1 and back[0] == 7 * 10**12
    with pytest.raises(ValueError, match="outside"):
        next_stamps(prev, {8}, 8, freeze)


@pytest.mark.parametrize("change, reason", [
    (dict(previous=None), "first run"),
    (dict(segment_size=2 * MIB), "segment size changed"),
    (dict(identity=Identity("/v/web.qcow2", 1, 3, 8 * MIB, "qcow2")), "not the one the last run saw"),
    (dict(identity=Identity("/v/web.qcow2", 1, 2, 9 * MIB, "qcow2")), "not the one the last run saw"),
    (dict(qemu="boot:4242:778"), "QEMU process"),
    (dict(qemu=None), "QEMU process"),
    (dict(has_change_set=False), "bitmap lost"),
])
def test_every_untrustworthy_case_names_its_reason(change, reason):
    args = dict(previous=_state(), segment_size=MIB, identity=ID, qemu=QEMU, has_change_set=True)
    args.update(change)
    assert reason in distrust(args.pop("previous"), args.pop("segment_size"), args.pop("identity"),
                              args.pop("qemu"), **args)


def test_a_trusted_state_has_no_reason_and_survives_json():
    assert distrust(_state(), MIB, ID, QEMU, has_change_set=True) is None
    assert SegmentState.from_json(_state(hashes=["a"] * 8).to_json()) == _state(hashes=["a"] * 8)


def test_hashes_find_exactly_the_changed_segments(tmp_path):
    image = tmp_path / "vda.raw"
    image.write_bytes(os.urandom(3 * MIB + 4096))  # a short last segment
    changed, first = changed_by_hash(str(image), MIB, [])
    assert changed == {0, 1, 2, 3} and len(first) == segment_count(3 * MIB + 4096, MIB)
    assert changed_by_hash(str(image), MIB, first) == (set(), first)
    with open(image, "r+b") as fh:
        fh.seek(MIB + 17)
        fh.write(b"x")
    changed, second = changed_by_hash(str(image), MIB, first)
    assert changed == {1} and second[0] == first[0] and second[1] != first[1]
    assert Identity.of(str(image), "raw").size == 3 * MIB + 4096


def test_rehash_reads_the_changed_segments_and_keeps_the_others(tmp_path):
    image = tmp_path / "vda.raw"
    image.write_bytes(os.urandom(3 * MIB + 4096))
    _changed, first = changed_by_hash(str(image), MIB, [])
    with open(image, "r+b") as fh:
        fh.seek(2 * MIB)
        fh.write(b"y")
    stale = ["kept"] + first[1:]  # an unchanged segment's hash is taken as it was, not read again
    again = rehash(str(image), MIB, stale, {2})
    assert again[0] == "kept" and again[1] == first[1] and again[3] == first[3]
    assert again[2] == changed_by_hash(str(image), MIB, [])[1][2] != first[2]
    assert rehash(str(image), MIB, [], {2}) == changed_by_hash(str(image), MIB, [])[1]  # nothing known: all read
