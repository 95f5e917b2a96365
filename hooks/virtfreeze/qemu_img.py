"""qemu-img: read image chains, and merge an overlay offline."""

from __future__ import annotations

import json
import logging
import os
import stat

from virtfreeze import runner
from virtfreeze.errors import VirtfreezeError

log = logging.getLogger(__name__)


def _run(args: list[str], what: str, path: str, domain: str | None = None, disk: str | None = None) -> str:
    return runner.run(["qemu-img", *args], what=what, domain=domain, disk=disk, path=path,
                      install_hint="install qemu-utils").stdout or ""


def info(path: str, domain: str | None = None, disk: str | None = None) -> dict:
    """`qemu-img info` of one image (works while QEMU uses it)."""
    return json.loads(_run(["info", "-U", "--output=json", path], "qemu-img info", path, domain, disk))


def backing_of(path: str, domain: str | None = None, disk: str | None = None) -> tuple[str | None, str | None]:
    """(backing file, its format) of an image, or (None, None)."""
    i = info(path, domain, disk)
    return i.get("full-backing-filename") or i.get("backing-filename"), i.get("backing-filename-format")


def backing_chain(path: str, domain: str | None = None, disk: str | None = None) -> list[tuple[str, str]]:
    """The images below `path`, nearest first, as (file, format)."""
    out = _run(["info", "-U", "--backing-chain", "--output=json", path], "qemu-img info", path, domain, disk)
    return [(i["filename"], i["format"]) for i in json.loads(out)[1:]]


def commit(top: str, base: str, domain: str | None = None, disk: str | None = None) -> None:
    """Merge `top` (and anything between) into `base`, which must be in its chain; sync the base."""
    chain = [os.path.realpath(f) for f, _ in backing_chain(top, domain, disk)]
    if os.path.realpath(base) not in chain:
        raise VirtfreezeError("the recorded base is not in the overlay's backing chain",
                              domain=domain, disk=disk, path=top,
                              hint="refusing to commit into another image")
    _run(["commit", "-f", "qcow2", "-b", base, top], "qemu-img commit", top, domain, disk)
    fd = os.open(base, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_overlay(overlay: str, backing: str, backing_format: str, domain: str | None = None,
                   disk: str | None = None) -> None:
    """A new qcow2 overlay on `backing`, of its size; refuses to replace a file that exists.

    The backing image is not opened for writing (`-u`; its size is read with
    `info -U`), so this works while QEMU uses it, block devices included.
    """
    if os.path.lexists(overlay):
        raise VirtfreezeError("an overlay file appeared there meanwhile", domain=domain, disk=disk, path=overlay,
                              hint="another program is using this name; run the command again once it is gone")
    size = info(backing, domain, disk)["virtual-size"]
    _run(["create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", backing_format, overlay, str(size)],
         "qemu-img create", overlay, domain, disk)
    # The guest's writes go here: as private as libvirt makes its own overlays (owned like a file base,
    # which QEMU already writes; libvirt relabels it when it takes it), before anything is written.
    st = os.stat(backing)
    os.chmod(overlay, 0o600)
    if not stat.S_ISBLK(st.st_mode):
        os.chown(overlay, st.st_uid, st.st_gid)
