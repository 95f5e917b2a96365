"""A frozen qcow2 base's guest-visible bytes as a read-only raw file, for the segmented layout.

The segment view serves guest data, not qcow2 clusters: the same layout
for every format, restorable with `cat`, and a backing chain (a template)
read through. For a qcow2 base, qemu-storage-daemon opens it read-only
beside QEMU (force-share) and exports it through FUSE as a raw file; the
segment view reads that file. ``--daemonize`` returns once the export is
mounted. It reads the base with O_DIRECT (``cache.direct=on``) where the
base's file system allows it: reading a cold image through the page cache
with the disk's read-ahead queues large reads ahead of the guests' writes
(a writing guest stalled 26 ms against a 14 ms baseline while 512 MiB were
read through this export, 17 ms with direct reads).

The files live under ``<state_directory>/guest-views/<uuid>/`` (0700), not
in the export view, which borgmatic archives whole. A daemon is found again
by the ``mountpoint=`` in its argv, so `thaw` stops a crashed run's too.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from virtfreeze import runner
from virtfreeze.direct_read import direct_io_allowed
from virtfreeze.dirty_bitmap import image_opts
from virtfreeze.errors import VirtfreezeError

log = logging.getLogger(__name__)

PROGRAM = "qemu-storage-daemon"


def directory(state_dir: Path, uuid: str) -> Path:
    return state_dir / "guest-views" / uuid


def _escaped(path: str | Path) -> str:
    return str(path).replace(",", ",,")


def start(base: str, fmt: str, view: Path, *, block: bool = False, domain: str, disk: str) -> Path:
    """Export `base` (qcow2 or raw; with `block` on a block device) as the raw file `view`; return `view`."""
    view.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(view.parent, 0o700)
    view.touch(mode=0o400, exist_ok=True)
    opts = f"node-name=guest,read-only=on,{image_opts(base, fmt, block=block)}"
    argv = ["--export", f"type=fuse,id=guest,node-name=guest,writable=off,mountpoint={_escaped(view)}",
            "--daemonize", "--pidfile", str(view.with_suffix(".pid"))]
    what = dict(what="qemu-storage-daemon (guest view)", domain=domain, disk=disk, path=base,
                install_hint="install qemu-system-common (qemu-storage-daemon) and fuse3")
    direct = direct_io_allowed(base)
    try:
        runner.run([PROGRAM, "--blockdev", opts + (",cache.direct=on" if direct else ""), *argv], **what)
    except VirtfreezeError as e:
        if not direct:
            raise
        # a backing file on a file system without O_DIRECT: the page cache, then
        log.debug("guest view of %s without O_DIRECT: %s", base, e.message)
        runner.run([PROGRAM, "--blockdev", opts, *argv], **what)
    from virtfreeze.export_view import raise_readahead

    raise_readahead(view)  # hashing a 1 GiB disk through it here: 3.8 s with FUSE's 128 KiB, 1.3 s with 4 MiB
    return view


def mountpoint_of(argv: list[str]) -> str | None:
    """The file a guest-view daemon serves, from its argv (None: not one)."""
    if not argv or os.path.basename(argv[0]) != PROGRAM or "--export" not in argv:
        return None
    spec = argv[argv.index("--export") + 1] if argv.index("--export") + 1 < len(argv) else ""
    for part in spec.replace(",,", "\0").split(","):
        key, _, value = part.partition("=")
        if key == "mountpoint":
            return value.replace("\0", ",")
    return None


def sweep(state_dir: Path, journal) -> None:
    """Stop the guest views of every domain no freeze is recorded for (left by a run whose journal record
    is gone); a domain another run is working on is left alone."""
    from virtfreeze.errors import DomainBusy
    from virtfreeze.journal import domain_lock

    root = state_dir / "guest-views"
    for views in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            with domain_lock(views.name, views.name):
                if journal.load(views.name) is None:
                    log.warning("stopping the guest views of domain %s, which no freeze is recorded for", views.name)
                    stop_all(views)
        except DomainBusy:
            continue


def stop_all(views: Path) -> None:
    """Stop every guest-view daemon serving a file under `views` (also a crashed run's); delete it."""
    from virtfreeze.export_view import VIEW_STOP_TIMEOUT, pids_serving, unmount, mounts_under

    if not views.is_dir():  # a domain without segmented qcow2 disks: no /proc scan on its every thaw
        return
    for pid in pids_serving(views):
        runner.stop_pid(pid, timeout=VIEW_STOP_TIMEOUT, what="guest view")
    for mp in mounts_under(views):
        unmount(mp)
    shutil.rmtree(views, ignore_errors=True)
