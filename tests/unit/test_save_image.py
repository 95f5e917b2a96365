"""Save images built as libvirt 9.0 lays them out: read, and the XML rewritten in place."""

import struct

import pytest

from virtfreeze import save_image
from virtfreeze.errors import UsageError, VirtfreezeError
from virtfreeze.restore import check_decompressor, recorded_compression

XML = "<domain type='kvm'><name>web</name><uuid>6f1c4a8e-0d7b-4a43-9d52-2b1f0e4c8a11</uuid></domain>"
COOKIE = "<cookie><cpu mode='custom'><model>qemu64</model></cpu></cookie>"
STREAM = b"QEVM\x00\x00\x00\x03" + bytes(range(256)) * 64


def build(xml=XML, cookie=COOKIE, stream=STREAM, magic=b"LibvirtQemudSave", version=2, compressed=0,
          was_running=1, order="<", padding=64 * 1024):
    """What virQEMUSaveDataWrite + virQEMUSaveDataFinish write, then the stream."""
    xml_b = xml.encode() + b"\0"
    cookie_b = cookie.encode() + b"\0" if cookie else b""
    data_len = len(xml_b) + len(cookie_b) + padding
    cookie_offset = len(xml_b) if cookie else 0
    header = magic + struct.pack(order + "IIIII14I", version, data_len, was_running, compressed, cookie_offset,
                                 *[0] * 14)
    assert len(header) == 92
    return header + xml_b + cookie_b + b"\0" * padding + stream


@pytest.fixture
def image(tmp_path):
    def make(**kw):
        p = tmp_path / "vm.save"
        p.write_bytes(build(**kw))
        return p
    return make


def test_reads_header_xml_and_stream_offset(image):
    p = image()
    i = save_image.read(str(p))
    assert i.xml == XML and i.version == 2 and i.was_running is True and i.compressed == 0
    assert i.header_size == 92
    assert i.cookie_offset == len(XML) + 1 and i.cookie == COOKIE.encode()
    assert i.data_len == len(XML) + 1 + len(COOKIE) + 1 + 64 * 1024
    assert p.read_bytes()[i.stream_offset:] == STREAM


def test_reads_without_cookie_paused_compressed_and_other_byte_order(image):
    i = save_image.read(str(image(cookie="", was_running=0, compressed=3, order=">")))
    assert i.xml == XML and i.cookie_offset == 0 and i.cookie == b""
    assert i.was_running is False and i.compressed == 3 and i.byteorder == ">"


def test_round_trip_keeps_data_len_cookie_and_stream(image):
    p = image()
    before = save_image.read(str(p))
    new = XML.replace("web", "web-restored-as-a-much-longer-name") + "<!--" + "x" * 4000 + "-->"
    save_image.rewrite_xml(str(p), new)
    after = save_image.read(str(p))
    assert after.xml == new
    assert after.data_len == before.data_len and after.stream_offset == before.stream_offset
    assert after.cookie == COOKIE.encode() and after.cookie_offset == len(new.encode()) + 1
    raw = p.read_bytes()
    assert raw[after.stream_offset:] == STREAM and len(raw) == len(build())
    # The rest of the data area is zeroed, as libvirt writes it.
    used = 92 + after.cookie_offset + len(COOKIE) + 1
    assert raw[used:after.stream_offset] == b"\0" * (after.stream_offset - used)


def test_shorter_xml_leaves_no_stale_bytes(image):
    p = image()
    save_image.rewrite_xml(str(p), "<domain/>")
    raw = p.read_bytes()
    i = save_image.read(str(p))
    assert i.xml == "<domain/>" and i.cookie == COOKIE.encode()
    assert XML.encode() not in raw and raw[i.stream_offset:] == STREAM


def test_rewrite_without_cookie_keeps_it_absent_and_other_byte_order(image):
    p = image(cookie="", order=">")
    save_image.rewrite_xml(str(p), XML + " ")
    i = save_image.read(str(p))
    assert i.xml == XML + " " and i.cookie_offset == 0 and i.byteorder == ">"
    assert p.read_bytes()[i.stream_offset:] == STREAM


def test_xml_that_does_not_fit_says_by_how_much_and_changes_nothing(image):
    p = image(padding=10)
    raw = p.read_bytes()
    room = save_image.read(str(p)).room
    assert room == len(XML) + 10
    save_image.rewrite_xml(str(p), "y" * room)  # exactly fits
    p.write_bytes(raw)
    with pytest.raises(VirtfreezeError, match=r"7 bytes too long") as e:
        save_image.rewrite_xml(str(p), "y" * (room + 7))
    assert e.value.path == str(p)
    assert p.read_bytes() == raw


def test_not_a_save_image(tmp_path):
    p = tmp_path / "disk.qcow2"
    p.write_bytes(b"QFI\xfb" + b"\0" * 200)
    with pytest.raises(VirtfreezeError, match="not a libvirt save image"):
        save_image.read(str(p))
    p.write_bytes(b"")
    with pytest.raises(VirtfreezeError, match="not a libvirt save image"):
        save_image.read(str(p))


def test_incomplete_image_hints_no_memory(image):
    p = image(magic=b"LibvirtQemudPart")
    with pytest.raises(VirtfreezeError, match="incomplete") as e:
        save_image.read(str(p))
    assert "--no-memory" in e.value.hint
    with pytest.raises(VirtfreezeError, match="incomplete"):
        save_image.rewrite_xml(str(p), XML)


@pytest.mark.parametrize("keep", [0, 40, 92, 92 + 200, "no stream"])
def test_truncated(image, keep):
    p = image()
    raw = p.read_bytes()
    i = save_image.read(str(p))
    p.write_bytes(raw[:i.stream_offset] if keep == "no stream" else raw[:keep])
    with pytest.raises(VirtfreezeError) as e:
        save_image.read(str(p))
    assert ("truncated" in e.value.message) or (keep == 0 and "not a libvirt save image" in e.value.message)


def test_unsupported_version(image):
    with pytest.raises(VirtfreezeError, match="unsupported save image version 3"):
        save_image.read(str(image(version=3)))


def test_version_1_has_no_compression(image):
    i = save_image.read(str(image(version=1, compressed=7)))
    assert i.version == 1 and i.compressed == 0


def test_missing_file_is_a_virtfreeze_error(tmp_path):
    with pytest.raises(VirtfreezeError, match="cannot read"):
        save_image.read(str(tmp_path / "absent.save"))


def test_names_the_program_a_compressed_stream_resumes_through(image):
    assert save_image.read(str(image(compressed=4))).decompressor == "lzop"
    assert save_image.read(str(image(compressed=1))).decompressor == "gzip"
    assert save_image.read(str(image())).decompressor is None


def test_a_restore_stops_on_a_compressed_image_whose_program_is_not_installed(image, tmp_path):
    lzop = save_image.read(str(image(compressed=4))).decompressor
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    with pytest.raises(UsageError) as e:
        check_decompressor(lzop, "web1", "/r/memory.save", search=str(bin_dir))
    text = str(e.value)
    assert "domain 'web1'" in text and "'/r/memory.save'" in text and "compressed with lzop" in text
    assert "install lzop" in text and "--no-memory" in text
    program = bin_dir / "lzop"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    check_decompressor(lzop, "web1", "/r/memory.save", search=str(bin_dir))  # installed: goes on
    raw = save_image.read(str(image())).decompressor
    check_decompressor(raw, "web1", "/r/memory.save", search=str(tmp_path / "nowhere"))  # needs none


def test_the_manifests_compression_counts_only_when_it_is_one_libvirt_uses():
    assert recorded_compression({"memory_compression": "lzop"}) == "lzop"
    for manifest in ({}, {"memory_compression": None}, {"memory_compression": "raw"},
                     {"memory_compression": "/bin/sh"}, {"memory_compression": ["xz"]}):
        assert recorded_compression(manifest) is None, manifest
