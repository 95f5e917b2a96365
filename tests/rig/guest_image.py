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
RIG_VERSION = "8"

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
check=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vf.disks=*) disks=$(echo "${arg#vf.disks=}" | tr ',' ' ');;
        vf.stride=*) stride="${arg#vf.stride=}";;
        vf.check=*) check="${arg#vf.check=}";;
    esac
done
# Acknowledgements go to ttyS1, which the host reads through a unix socket.
exec 3<>/dev/ttyS1
stty raw -echo <&3
for d in $disks; do
    while [ ! -b /dev/$d ]; do usleep 10000; done
    eval "size_$d=$(cat /sys/block/$d/size)"
done
# With vf.check=1, the guest's own check, as an fsck at boot: a disk whose first sector is neither
# empty nor a record is corrupt, and init exits: the kernel panics and (panic=-1, on_reboot=destroy)
# the domain stops.
for d in $disks; do
    head=$(head -c 5 /dev/$d)
    if [ "$check" = 1 ] && [ -n "$head" ] && [ "$head" != VFREC ]; then
        echo "init: /dev/$d is corrupt; stopping"
        exit 1
    fi
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


# The agent guest: a real QEMU guest agent and an ext4 filesystem on vda (made by the host), whose
# file /data receives the numbered records (tag "vda"), so that a quiesced freeze can be
# told from a crash-consistent one by e2fsck on the archived image. vf.hook=block installs an
# fsfreeze hook that never returns (an agent that hangs in its fsfreeze).
AGENT_VERSION = "3"
AGENT_MODULES = MODULES + ["drivers/char/virtio_console.ko"]

AGENT_INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console; do
    insmod /lib/modules/$m.ko || echo "init: insmod $m failed"
done
hook=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in vf.hook=*) hook="${arg#vf.hook=}";; esac
done
exec 3<>/dev/ttyS1
stty raw -echo <&3
while [ ! -b /dev/vda ]; do usleep 10000; done
mkdir -p /mnt /run /etc/qemu
mount -t ext4 /dev/vda /mnt || echo "init: mount vda failed"
port=""
while [ -z "$port" ]; do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/$(basename $p)
    done
    [ -n "$port" ] || usleep 10000
done
hookopt=""
if [ "$hook" = block ]; then
    mkfifo /run/never
    printf '#!/bin/sh\nread x < /run/never\n' > /etc/qemu/fsfreeze-hook
    chmod 755 /etc/qemu/fsfreeze-hook
    hookopt="-F/etc/qemu/fsfreeze-hook"
fi
/usr/sbin/qemu-ga -d -m virtio-serial -p $port -f /run/qga.pid -t /run $hookopt || echo "init: qemu-ga failed"
n=$(( $(stat -c %s /mnt/data) / 512 ))
echo "BOOTED vda" >&3
until read -t 1 -r go <&3 && [ "${go%%[!A-Z]*}" = GO ]; do echo "BOOTED vda" >&3; done
echo "init: writing to /mnt/data"
i=0
while :; do
    printf 'VFREC %s %012d\n' vda "$i" > /tmp/rec
    if dd if=/tmp/rec of=/mnt/data bs=512 seek=$((i % n)) count=1 conv=notrunc,sync,fsync 2>/dev/null; then
        echo "ACK vda $i" >&3
    else
        echo "init: write $i failed"
    fi
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


def _add_agent(root: Path, work: Path) -> None:
    """qemu-ga from Debian's package, with the shared libraries it needs (as the host resolves them)."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        _run(["apt-get", "download", "qemu-guest-agent"], cwd=tmp)
        deb = next(Path(tmp).glob("*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")])
        qga = Path(tmp) / "x" / "usr" / "sbin" / "qemu-ga"
        (root / "usr" / "sbin").mkdir(parents=True)
        shutil.copy(qga, root / "usr" / "sbin" / "qemu-ga")
        for line in _run(["ldd", str(qga)]).stdout.splitlines():
            parts = line.split()
            lib = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
            if lib.startswith("/"):
                dst = root / lib.lstrip("/")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(os.path.realpath(lib), dst)


def _build_initramfs(moddir: Path, out: Path, agent: bool = False) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "tmp", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copy(busybox, root / "bin" / "busybox")
        for mod in AGENT_MODULES if agent else MODULES:
            shutil.copy(moddir / mod, root / "lib" / "modules" / Path(mod).name)
        if agent:
            _add_agent(root, out.parent)
        init = root / "init"
        init.write_text(AGENT_INIT_SCRIPT if agent else INIT_SCRIPT)
        init.chmod(0o755)
        files = _run(["find", ".", "-print0"], cwd=root).stdout
        with open(out, "wb") as fh:
            subprocess.run(
                ["cpio", "--null", "-o", "-H", "newc", "--quiet"],
                input=files.encode(), cwd=root, stdout=fh, check=True,
            )


def ensure_guest_image(agent: bool = False) -> GuestImage:
    """Return the cached kernel and initramfs (the agent guest's with `agent`), building them on first use."""
    base = cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    kernel = base / "vmlinuz"
    initrd = base / (f"initrd-agent-{RIG_VERSION}.{AGENT_VERSION}.cpio" if agent else f"initrd-{RIG_VERSION}.cpio")
    with open(base / ".lock", "w") as lock:  # several pytest-xdist workers
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (kernel.exists() and initrd.exists()):
            vmlinuz, moddir = _extract_kernel(base)
            tmp = initrd.with_suffix(".tmp")
            _build_initramfs(moddir, tmp, agent)
            shutil.copy(vmlinuz, kernel.with_suffix(".tmp"))
            os.replace(kernel.with_suffix(".tmp"), kernel)
            os.replace(tmp, initrd)
    return GuestImage(kernel=kernel, initrd=initrd)
