"""A block device shown as a read-only regular file: the export view of a block-device disk.

borg stores a device node as a 0-byte node (unless given --read-special) and
restic cannot read one at all, so an LVM volume, zvol or partition must
reach every backup tool as a plain file. This is a one-file FUSE file
system over the frozen device, run as a small detached process per device
(`python -m virtfreeze.device_view --device DEV --mountpoint FILE`), mounted
read-only on an existing empty file.

Its attributes never change while it is mounted (size, and mtime/ctime of
when it was mounted): borg warns "file changed while we backed it up" when
a file's ctime moves during the read, which is what qemu-storage-daemon's
FUSE export (timestamps of "now") makes happen on every large image.

It unmounts and exits on SIGTERM, SIGINT or SIGHUP (libfuse's handlers),
and when its mount is unmounted. `export_view` finds it again by the
--mountpoint in its argv, so a crashed run's view is stopped by `thaw`.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
import time

from virtfreeze.direct_read import DirectReader

MODULE = "virtfreeze.device_view"


def argv_for(device: str, mountpoint: str, ready_fd: int) -> list[str]:
    """The command line of the process serving `device` at `mountpoint`."""
    return [sys.executable, "-m", MODULE, "--device", device, "--mountpoint", mountpoint, "--ready-fd",
            str(ready_fd)]


def mountpoint_of(argv: list[str], module: str = MODULE) -> str | None:
    """The mountpoint a view process (`module`: a device view by default) serves, from its argv
    (None: not one)."""
    if module not in argv[:3] or "--mountpoint" not in argv:
        return None
    i = argv.index("--mountpoint")
    return argv[i + 1] if i + 1 < len(argv) else None


def _operations(device: str, ready_fd: int):
    from virtfreeze._vendor import mfusepy

    class DeviceFile(mfusepy.Operations):
        """The file system's one file, "/", holding the device's bytes."""

        use_ns = True

        def __init__(self) -> None:
            self.reader = DirectReader(device)  # O_DIRECT: the guests' writes do not queue behind read-ahead
            self.size = self.reader.size
            self.mounted_ns = time.time_ns()

        def init(self, path):
            os.write(ready_fd, b"ready\n")  # the kernel sent INIT: the mount is in place
            os.close(ready_fd)

        def getattr(self, path, fh=None):
            if path != "/":
                raise mfusepy.FuseOSError(errno.ENOENT)
            return {"st_mode": stat.S_IFREG | 0o400, "st_nlink": 1, "st_uid": 0, "st_gid": 0,
                    "st_size": self.size, "st_blocks": (self.size + 511) // 512, "st_blksize": 1 << 20,
                    "st_atime": self.mounted_ns, "st_mtime": self.mounted_ns, "st_ctime": self.mounted_ns}

        def open(self, path, flags):
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise mfusepy.FuseOSError(errno.EROFS)
            return 0

        def read(self, path, size, offset, fh):  # DeviceFUSE.read serves reads; this is its plain twin
            return self.reader.pread(size, offset)

    return DeviceFile()


def _fuse_class():
    import ctypes

    from virtfreeze._vendor import mfusepy

    class DeviceFUSE(mfusepy.FUSE):
        """Reads go from the device into libfuse's buffer (no bytes object in between)."""

        def read(self, path, buf, size, offset, fip):
            into = (ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))
            return self.operations.reader.readinto(into, offset)

    return DeviceFUSE


def main(args: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    ap.add_argument("--device", required=True, help="the block device to show")
    ap.add_argument("--mountpoint", required=True, help="an existing empty regular file")
    ap.add_argument("--ready-fd", type=int, required=True, help="written to and closed once mounted")
    opts = ap.parse_args(args)
    if not stat.S_ISBLK(os.stat(opts.device).st_mode):
        raise SystemExit(f"{opts.device}: not a block device")  # on stderr, where start_daemon reads it
    # allow_other + default_permissions: the kernel applies the file's mode (0400, root), as for a
    # bind-mounted image; kernel_cache and long timeouts: nothing changes while it is mounted.
    _fuse_class()(_operations(opts.device, opts.ready_fd), opts.mountpoint, foreground=True, ro=True,
                 allow_other=True, default_permissions=True, kernel_cache=True, attr_timeout=86400,
                 entry_timeout=86400, fsname="virtfreeze")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
