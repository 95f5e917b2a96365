"""What a qcow2 disk's persistent dirty bitmap says changed: the change set of the segmented layout.

A libvirt checkpoint made just before run N's snapshot puts a persistent
bitmap into each qcow2 base; libvirt carries it into the overlay and merges
it back on every block commit (live, iterative and offline: checked by
tests/host/test_dirty_bitmap_facts.py on libvirt 9.0 / QEMU 7.2). While run
N+1 holds the domain frozen, the base is read-only and its bitmap is stored
consistently (flags ``auto``, not ``in-use``): read then, it covers every
write the guest made since run N's snapshot.

It is read the way the facts test reads it: a read-only, shared qemu-nbd
of the base exporting the bitmap, and ``qemu-img map`` with
``x-dirty-bitmap`` over it ("data": false marks a dirty range).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from xml.sax.saxutils import quoteattr

from virtfreeze import qemu_img, runner
from virtfreeze.errors import VirtfreezeError

CHECKPOINT_PREFIX = "virtfreeze-"


def image_opts(path: str, fmt: str = "qcow2", *, block: bool = False) -> str:
    """--image-opts text opening `path` (a file, or with `block` a device) read-only beside its user
    (commas in the path doubled)."""
    protocol = "host_device" if block else "file"
    return f"driver={fmt},force-share=on,file.driver={protocol},file.filename={path.replace(',', ',,')}"


def holds_bitmaps(image: str, domain: str, disk: str) -> bool:
    """Whether a qcow2 image can hold persistent bitmaps (compat 1.1; 0.10 cannot)."""
    return qemu_img.info(image, domain, disk).get("format-specific", {}).get("data", {}).get("compat") != "0.10"


def bitmap_problem(image: str, bitmap: str, domain: str, disk: str) -> str | None:
    """Why `image`'s bitmap `bitmap` cannot be trusted (missing, in use, inconsistent), or None."""
    found = qemu_img.info(image, domain, disk).get("format-specific", {}).get("data", {}).get("bitmaps") or []
    flags = next((b.get("flags") or [] for b in found if b.get("name") == bitmap), None)
    if flags is None:
        return f"dirty bitmap {bitmap} is missing from {image}"
    if "in-use" in flags or "inconsistent" in flags:
        return f"dirty bitmap {bitmap} in {image} is not stored consistently ({', '.join(flags)})"
    return None


def dirty_ranges(image: str, bitmap: str, domain: str, disk: str, *, block: bool = False) -> list[tuple[int, int]]:
    """(offset, length) of every range `bitmap` of the frozen base `image` marks as written."""
    work = Path(tempfile.mkdtemp(prefix="virtfreeze-nbd-"))  # 0700, short enough for a socket path
    sock, pidfile = work / "nbd.sock", work / "nbd.pid"
    try:
        runner.run(["qemu-nbd", "--fork", "--pid-file", str(pidfile), "--read-only", "--bitmap", bitmap,
                    "--socket", str(sock), "--image-opts", image_opts(image, block=block)],
                   what="qemu-nbd (dirty bitmap)", domain=domain, disk=disk, path=image,
                   install_hint="install qemu-utils")
        # Held from now on: the server waits for its one client, then exits by itself; a pid alone
        # could name another process by the time it is signalled.
        server = os.pidfd_open(int(pidfile.read_text()))
        try:
            out = runner.run(["qemu-img", "map", "--output=json", "--image-opts",
                              f"driver=nbd,server.type=unix,server.path={sock},"
                              f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"],
                             what="qemu-img map (dirty bitmap)", domain=domain, disk=disk, path=image).stdout
        finally:
            runner.stop_pidfd(server, what="qemu-nbd")
        return [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]
    except (OSError, ValueError) as e:
        raise VirtfreezeError(f"cannot read dirty bitmap {bitmap}: {e}", domain=domain, disk=disk,
                              path=image) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def segments_of(ranges: list[tuple[int, int]], segment_size: int) -> set[int]:
    """The segments the ranges touch."""
    out: set[int] = set()
    for start, length in ranges:
        if length > 0:
            out.update(range(start // segment_size, (start + length - 1) // segment_size + 1))
    return out


def checkpoint_xml(name: str, tracked: list[str], untracked: list[str]) -> str:
    """A checkpoint with a bitmap in each `tracked` disk and none in the others."""
    disks = "".join(f"<disk name={quoteattr(t)} checkpoint='bitmap'/>" for t in tracked)
    disks += "".join(f"<disk name={quoteattr(t)} checkpoint='no'/>" for t in untracked)
    return f"<domaincheckpoint><name>{name}</name><disks>{disks}</disks></domaincheckpoint>"
