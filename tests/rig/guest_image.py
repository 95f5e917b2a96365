"""Build the writing test guest (kernel + initramfs) from Debian packages.

No image download: the kernel comes from Debian's linux-image-cloud-amd64,
the userland is busybox-static, and /init loads the virtio modules and then
writes numbered records to each disk with O_DIRECT+fsync, acknowledging each
one on the second serial port. Built once and cached (see `cache_dir`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

MODULES = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
]

# Bump when INIT_SCRIPT changes so cached initramfs files are rebuilt.
RIG_VERSION = "5"

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko || echo "init: insmod $m failed"
done
disks=""
stride=1
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vf.disks=*) disks=$(echo "${arg#vf.disks=}" | tr ',' ' ');;
        vf.stride=*) stride="${arg#vf.stride=}";;
    esac
done
# Acknowledgements go to ttyS1, which the host reads through a unix socket.
exec 3<>/dev/ttyS1
stty raw -echo <&3
for d in $disks; do
    while [ ! -b /dev/$d ]; do usleep 10000; done
    eval "size_$d=$(cat /sys/block/$d/size)"
done
# Handshake: repeat BOOTED until the host answers GO (bytes sent before the
# port was opened are lost, so the host answers each BOOTED it sees).
echo "BOOTED $disks" >&3
until read -t 1 -r go <&3 && [ "${go%%[!A-Z]*}" = GO ]; do echo "BOOTED $disks" >&3; done
echo "init: writing to $disks"
i=0
while :; do
    for d in $disks; do
        eval "n=\$size_$d"
        printf 'VFREC %s %012d\n' "$d" "$i" > /tmp/rec
        if dd if=/tmp/rec of=/dev/$d bs=512 seek=$(((i * stride) % n)) count=1 oflag=direct conv=notrunc,sync,fsync 2>/dev/null; then
            echo "ACK $d $i" >&3
        else
            echo "init: write $d $i failed"
        fi
    done
    i=$((i + 1))
done
"""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


def cache_dir() -> Path:
    return Path(os.environ.get("VIRTFREEZE_TEST_CACHE", "/var/cache/virtfreeze-tests"))


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def _kernel_package() -> str:
    out = _run(["apt-cache", "depends", "linux-image-cloud-amd64"]).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[1]
    raise RuntimeError("apt-cache depends linux-image-cloud-amd64 names no kernel package; run apt-get update")


def _extract_kernel(dest: Path) -> tuple[Path, Path]:
    """Download and unpack the cloud kernel package; return (vmlinuz, modules dir)."""
    pkg = _kernel_package()
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        _run(["apt-get", "download", pkg], cwd=tmp)
        deb = next(Path(tmp).glob("*.deb"))
        root = dest / "kernel-root"
        shutil.rmtree(root, ignore_errors=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)])
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    moddir = next((root / "lib" / "modules").iterdir()) / "kernel"
    return vmlinuz, moddir


def _build_initramfs(moddir: Path, out: Path) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "tmp", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copy(busybox, root / "bin" / "busybox")
        for mod in MODULES:
            shutil.copy(moddir / mod, root / "lib" / "modules" / Path(mod).name)
        init = root / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
        files = _run(["find", ".", "-print0"], cwd=root).stdout
        with open(out, "wb") as fh:
            subprocess.run(
                ["cpio", "--null", "-o", "-H", "newc", "--quiet"],
                input=files.encode(), cwd=root, stdout=fh, check=True,
            )


def ensure_guest_image() -> GuestImage:
    """Return the cached kernel and initramfs, building them on first use."""
    base = cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    kernel = base / "vmlinuz"
    initrd = base / f"initrd-{RIG_VERSION}.cpio"
    with open(base / ".lock", "w") as lock:  # several pytest-xdist workers
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (kernel.exists() and initrd.exists()):
            vmlinuz, moddir = _extract_kernel(base)
            tmp = initrd.with_suffix(".tmp")
            _build_initramfs(moddir, tmp)
            shutil.copy(vmlinuz, kernel.with_suffix(".tmp"))
            os.replace(kernel.with_suffix(".tmp"), kernel)
            os.replace(tmp, initrd)
    return GuestImage(kernel=kernel, initrd=initrd)
