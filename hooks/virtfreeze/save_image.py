"""Read and rewrite the domain XML inside a libvirt QEMU save image (memory state).

`virsh save` and an external snapshot with memory write the same file: libvirt's
header, the domain XML, a save cookie, zero padding, then QEMU's migration
stream. Restoring such an image as a new domain (other name, UUID, MACs, disk
paths) next to the still running original is refused by the ABI check of
`restoreFlags(file, xml)`; rewriting the XML inside a staged copy of the image
and restoring it without an XML is not. The layout mirrors libvirt's
src/qemu/qemu_saveimage.[ch] (v9.0.0):

    struct { char magic[16]; uint32 version, data_len, was_running,
             compressed, cookieOffset, unused[14]; }     92 bytes, host order
    data_len bytes: XML NUL [cookie NUL] zeros            cookieOffset counts
                                                          from the XML's start
    QEMU migration stream (compressed if `compressed`)    at 92 + data_len

The stream's offset is fixed by data_len, which a rewrite therefore keeps; the
XML may grow into the padding, the cookie moving behind it, exactly as libvirt's
own virDomainSaveImageDefineXML rewrites it (virQEMUSaveDataWrite).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from virtfreeze.errors import VirtfreezeError

MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"  # written first, replaced by MAGIC once the stream is complete
VERSION = 2  # version 1 images have no compression field (it reads 0 there)
_FIELDS = "IIIII14I"  # version, data_len, was_running, compressed, cookieOffset, unused[14]
HEADER_SIZE = len(MAGIC) + struct.calcsize("<" + _FIELDS)  # 92
COMPRESSION = {0: "raw", 1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop"}


@dataclass(frozen=True)
class SaveImage:
    """The header and XML of a save image; the migration stream starts at stream_offset."""

    version: int
    data_len: int
    was_running: bool
    compressed: int  # 0 raw; else the stream is compressed (see COMPRESSION); header and XML never are
    cookie_offset: int  # 0: no cookie; else where the cookie starts, counted from the XML's start
    xml: str
    header_size: int
    stream_offset: int
    cookie: bytes = b""  # the cookie's text (without its NUL and padding)
    byteorder: str = "<"  # "<" or ">": libvirt writes the header in the saving host's order

    @property
    def decompressor(self) -> str | None:
        """The program libvirt resumes the stream through (`PROGRAM -dc`), None for a raw stream: a
        saving host whose qemu.conf sets `snapshot_image_format` (or `save_image_format`) compresses it."""
        return COMPRESSION.get(self.compressed) if self.compressed else None

    @property
    def room(self) -> int:
        """The most bytes of XML (without its NUL) that fit, with the cookie moved behind it."""
        return self.data_len - (len(self.cookie) + 1 if self.cookie_offset else 0) - 1


def _header(path: str, raw: bytes) -> tuple[str, tuple[int, ...]]:
    if len(raw) < len(MAGIC) or raw[:len(MAGIC)] not in (MAGIC, PARTIAL_MAGIC):
        raise VirtfreezeError("not a libvirt save image (no LibvirtQemudSave magic)", path=path,
                              hint="expected the memory file of `virsh save` or of a snapshot with memory")
    if raw[:len(MAGIC)] == PARTIAL_MAGIC:
        raise VirtfreezeError("the save image is incomplete: libvirt never finished writing it", path=path,
                              hint="take the backup again, or restore without memory (--no-memory)")
    if len(raw) < HEADER_SIZE:
        raise VirtfreezeError(f"the save image is truncated: {len(raw)} bytes, shorter than its "
                              f"{HEADER_SIZE}-byte header", path=path)
    # As libvirt does: a version above ours means the other byte order (qemuSaveImageOpen).
    for order in ("<", ">"):
        fields = struct.unpack_from(order + _FIELDS, raw, len(MAGIC))
        if 1 <= fields[0] <= VERSION:
            return order, fields
    version = struct.unpack_from("<I", raw, len(MAGIC))[0]
    raise VirtfreezeError(f"unsupported save image version {version} (this reads 1 to {VERSION})", path=path,
                          hint="restore it with the libvirt that wrote it")


def read(path: str) -> SaveImage:
    """The header and domain XML of the save image at `path`, checked to be complete."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
            order, (version, data_len, was_running, compressed, cookie_offset, *_unused) = _header(path, raw)
            size = os.fstat(f.fileno()).st_size
            if data_len == 0 or cookie_offset > data_len:
                raise VirtfreezeError(f"the save image header is corrupt (data length {data_len}, "
                                      f"cookie offset {cookie_offset})", path=path)
            if size <= HEADER_SIZE + data_len:
                raise VirtfreezeError(
                    f"the save image is truncated: {size} bytes, but its header and XML take "
                    f"{HEADER_SIZE + data_len} and the memory stream must follow", path=path,
                    hint="the copy is incomplete; copy the image again")
            data = f.read(data_len)
    except OSError as e:
        raise VirtfreezeError(f"cannot read the save image: {e.strerror or e}", path=path) from e
    xml_area = data[:cookie_offset] if cookie_offset else data
    end = xml_area.find(b"\0")
    if end < 0:
        raise VirtfreezeError("the save image's domain XML is not NUL-terminated", path=path)
    cookie = data[cookie_offset:].split(b"\0", 1)[0] if cookie_offset else b""
    try:
        xml = xml_area[:end].decode()
    except UnicodeDecodeError as e:
        raise VirtfreezeError(f"the save image's domain XML is not UTF-8: {e}", path=path) from e
    if compressed not in COMPRESSION and version >= 2:
        raise VirtfreezeError(f"the save image's memory stream has an unknown compression ({compressed})",
                              path=path)
    return SaveImage(version=version, data_len=data_len, was_running=bool(was_running),
                     compressed=compressed if version >= 2 else 0, cookie_offset=cookie_offset, xml=xml,
                     header_size=HEADER_SIZE, stream_offset=HEADER_SIZE + data_len, cookie=cookie,
                     byteorder=order)


def rewrite_xml(path: str, xml: str) -> None:
    """Replace the domain XML inside the save image at `path`, in place.

    data_len, and so the migration stream, stay where they are; the cookie (CPU
    model and the like) keeps its text and follows the new XML, and the rest of
    the data area is zeroed, as libvirt's virQEMUSaveDataWrite lays it out. Only
    the header's cookieOffset changes in the header.
    """
    image = read(path)
    new = xml.encode()
    if b"\0" in new:
        raise VirtfreezeError("the new domain XML contains a NUL byte", path=path)
    if len(new) > image.room:
        raise VirtfreezeError(
            f"the new domain XML is {len(new) - image.room} bytes too long for the save image "
            f"({len(new)} bytes; {image.room} fit in its {image.data_len}-byte data area)", path=path,
            hint="shorten the XML (names, paths, metadata); the memory stream cannot move")
    area = new + b"\0"
    cookie_offset = 0
    if image.cookie_offset:
        cookie_offset = len(area)
        area += image.cookie + b"\0"
    area += b"\0" * (image.data_len - len(area))
    offset_field = len(MAGIC) + 4 * 4  # cookieOffset: the header's 5th uint32
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            _pwrite_all(fd, area, HEADER_SIZE)
            _pwrite_all(fd, struct.pack(image.byteorder + "I", cookie_offset), offset_field)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise VirtfreezeError(f"cannot rewrite the save image's domain XML: {e.strerror or e}", path=path) from e


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
