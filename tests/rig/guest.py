"""Real libvirt domains running the writing test guest.

`create_guest` defines (or creates, for a transient guest) a TCG domain with
the requested disks, starts it, and connects an AckWatcher to its
acknowledgement port. `Guest.remove` destroys and undefines it; the fixtures
call it even when a test fails.
"""

from __future__ import annotations

import subprocess
import tempfile
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from tests.rig.acks import AckWatcher, acked_by_disk
from tests.rig.guest_image import ensure_guest_image
from tests.rig.integrity import IntegrityReport, check_image

SOCKET_DIR = Path("/run/virtfreeze-tests")  # short: unix socket paths max 107 bytes


@dataclass
class DiskSpec:
    target: str
    fmt: str = "qcow2"  # qcow2 | raw
    size_mib: int = 16
    device: str = "disk"  # disk | cdrom
    writes: bool = True  # the guest writes records to it
    nbd_socket: Path | None = None  # a network (NBD over a unix socket) disk instead of a file
    template: bool = False  # qcow2 on top of a shared template image (<target>.template.qcow2)
    block: bool = False  # a block device (a loop device over <target>.<fmt>.img): LVM/zvol stand-in


@dataclass
class Guest:
    conn: libvirt.virConnect
    name: str
    uuid: str
    workdir: Path
    disks: dict[str, Path]
    formats: dict[str, str]
    writing: list[str]
    persistent: bool
    sock: Path
    xml: str
    stride: int = 1
    watcher: AckWatcher | None = None
    extra_watchers: list[AckWatcher] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)  # loop devices to detach at removal
    fs_file: str | None = None  # the agent guest: records go into this file of vdb's ext4 filesystem

    @property
    def dom(self) -> libvirt.virDomain:
        return self.conn.lookupByUUIDString(self.uuid)

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    def start(self, boot_timeout: float = 60.0) -> None:
        if self.watcher:
            self.watcher.close()
        if self.persistent:
            self.dom.create()
        else:
            self.conn.createXML(self.xml, 0)
        self.watcher = AckWatcher(self.sock, self.workdir / "acks.log")
        self.wait_writing(boot_timeout)

    def wait_writing(self, timeout: float = 60.0) -> None:
        """Wait until the guest acknowledged writes on every writing disk."""
        want = set(self.writing)
        try:
            self.watcher.wait_for(lambda acks: want <= {a.disk for a in acks}, timeout,
                                  f"first writes of {self.name} on {sorted(want)}")
        except TimeoutError as e:
            tail = self.console_log.read_text(errors="replace")[-2000:] if self.console_log.exists() else ""
            raise TimeoutError(f"{e}\n--- guest console ---\n{tail}") from None

    def acked(self, until: float | None = None) -> dict[str, list[int]]:
        acks = self.watcher.snapshot() if self.watcher else []
        for w in self.extra_watchers:
            acks += w.snapshot()
        return acked_by_disk(acks, until)

    def check(self, target: str, image: Path | None = None, until: float | None = None,
              fmt: str | None = None) -> IntegrityReport:
        """Every write acknowledged on `target` (up to `until`) is in `image` (default: its base)."""
        image = image or self.disks[target]
        acked = self.acked(until).get(target, [])
        if self.fs_file:  # the records are in a file of the image's filesystem: check that file
            with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
                data = Path(tmp) / "data"
                subprocess.run(["debugfs", "-R", f"dump {self.fs_file} {data}", str(image)], check=True,
                               capture_output=True)
                return check_image(data, target, acked, "raw", self.stride)
        return check_image(image, target, acked,
                           fmt or (None if image != self.disks[target] else self.formats[target]), self.stride)

    def state(self) -> int:
        try:
            return self.dom.state()[0]
        except libvirt.libvirtError:
            return libvirt.VIR_DOMAIN_NOSTATE

    def remove(self) -> None:
        """Destroy and undefine; never raises (used in teardown)."""
        for w in [self.watcher, *self.extra_watchers]:
            if w:
                w.close()
        remove_domain(self.conn, uuid=self.uuid)
        for dev in self.loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)


UNDEFINE_ALL = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_TPM", 0))


def remove_domain(conn: libvirt.virConnect, *, uuid: str | None = None, name: str | None = None) -> None:
    """Destroy and undefine a domain (with its managed save, NVRAM and TPM state) if it exists; never raises."""
    try:
        dom = conn.lookupByUUIDString(uuid) if uuid else conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    try:
        if dom.isPersistent():
            dom.undefineFlags(UNDEFINE_ALL)
    except libvirt.libvirtError:
        pass


def attach_loop(image: Path, attempts: int = 5) -> str:
    """A loop device over `image` (retried: parallel test workers race for the free one)."""
    for attempt in range(attempts):
        proc = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout.strip()
    raise RuntimeError(f"losetup {image}: {proc.stderr.strip()}")


def domain_xml(name: str, uuid: str, workdir: Path, disks: list[DiskSpec], paths: dict[str, Path],
               sock: Path, memory_mib: int = 192, agent_channel: bool = False, stride: int = 1,
               agent: str | None = None, boot_check: bool = False) -> str:
    img = ensure_guest_image(agent=agent is not None)
    writing = [d.target for d in disks if d.device == "disk" and d.writes]
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = uuid
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_, "kernel").text = str(img.kernel)
    ET.SubElement(os_, "initrd").text = str(img.initrd)
    ET.SubElement(os_, "cmdline").text = (f"console=ttyS0 panic=-1 vf.disks={','.join(writing)} vf.stride={stride}"
                                          + (f" vf.hook={agent}" if agent else "")
                                          + (" vf.check=1" if boot_check else ""))
    for ev in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, ev).text = "destroy"
    dev = ET.SubElement(dom, "devices")
    ET.SubElement(dev, "emulator").text = "/usr/bin/qemu-system-x86_64"
    for d in disks:
        if d.device == "cdrom":
            disk = ET.SubElement(dev, "disk", type="file", device="cdrom")
            ET.SubElement(disk, "driver", name="qemu", type="raw")
            ET.SubElement(disk, "source", file=str(paths[d.target]))
            ET.SubElement(disk, "target", dev=d.target, bus="ide")
            ET.SubElement(disk, "readonly")
            continue
        if d.nbd_socket is not None:
            disk = ET.SubElement(dev, "disk", type="network", device="disk")
            ET.SubElement(disk, "driver", name="qemu", type="raw")
            src = ET.SubElement(disk, "source", protocol="nbd")
            ET.SubElement(src, "host", transport="unix", socket=str(d.nbd_socket))
            ET.SubElement(disk, "target", dev=d.target, bus="virtio")
            continue
        disk = ET.SubElement(dev, "disk", type="block" if d.block else "file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=d.fmt)
        ET.SubElement(disk, "source", {"dev" if d.block else "file": str(paths[d.target])})
        ET.SubElement(disk, "target", dev=d.target, bus="virtio")
    s0 = ET.SubElement(dev, "serial", type="file")
    ET.SubElement(s0, "source", path=str(workdir / "console.log"), append="on")
    ET.SubElement(s0, "target", port="0")
    s1 = ET.SubElement(dev, "serial", type="unix")
    ET.SubElement(s1, "source", mode="bind", path=str(sock))
    ET.SubElement(s1, "target", port="1")
    if agent_channel or agent is not None:  # the writing guest has no agent behind it; the agent guest has
        ch = ET.SubElement(dev, "channel", type="unix")
        ET.SubElement(ch, "source", mode="bind")
        ET.SubElement(ch, "target", type="virtio", name="org.qemu.guest_agent.0")
    ET.SubElement(dev, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def create_guest(conn: libvirt.virConnect, workdir: Path, disks: list[DiskSpec] | None = None,
                 name: str | None = None, persistent: bool = True, start: bool = True,
                 memory_mib: int = 192, agent_channel: bool = False, stride: int = 1,
                 boot_check: bool = False) -> Guest:
    """Define a writing guest with fresh disk images in `workdir` and (by default) start it."""
    disks = disks if disks is not None else [DiskSpec("vda")]
    uid = str(uuidlib.uuid4())
    name = name or f"vft-{uid[:8]}"
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    sock = SOCKET_DIR / f"{uid[:13]}.sock"
    paths: dict[str, Path] = {}
    loops: list[str] = []
    for d in disks:
        if d.nbd_socket is not None:
            continue
        fmt = "raw" if d.device == "cdrom" else d.fmt
        p = workdir / f"{d.target}.{'iso' if d.device == 'cdrom' else fmt}"
        if d.template:
            tpl = workdir / f"{d.target}.template.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tpl), f"{d.size_mib}M"], check=True)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(tpl), "-F", "qcow2", str(p)],
                           check=True)
        elif d.block:
            p = p.with_name(p.name + ".img")
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(p), f"{d.size_mib}M"], check=True)
            if fmt != "raw":  # a qcow2 on a block device: room for its metadata too, as an LV would have
                with open(p, "r+b") as fh:
                    fh.truncate((d.size_mib + 8) << 20)
            p = Path(attach_loop(p))
            loops.append(str(p))
        else:
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(p), f"{d.size_mib}M"], check=True)
        paths[d.target] = p
    xml = domain_xml(name, uid, workdir, disks, paths, sock, memory_mib, agent_channel, stride,
                     boot_check=boot_check)
    guest = Guest(conn=conn, name=name, uuid=uid, workdir=workdir,
                  disks={d.target: paths[d.target] for d in disks if d.target in paths and d.device == "disk"},
                  formats={d.target: d.fmt for d in disks if d.target in paths and d.device == "disk"},
                  writing=[d.target for d in disks if d.device == "disk" and d.writes],
                  persistent=persistent, sock=sock, xml=xml, stride=stride, loops=loops)
    if persistent:
        conn.defineXML(xml)
    if start:
        try:
            guest.start()
        except BaseException:
            guest.remove()  # a guest that did not boot is not left defined
            raise
    return guest


def create_agent_guest(conn: libvirt.virConnect, workdir: Path, hook: str = "none", data_mib: int = 8,
                       name: str | None = None) -> Guest:
    """A running guest with a real QEMU guest agent, writing records into /data of an ext4 filesystem on
    vda (a raw image the host made); `hook="block"`: its fsfreeze hook never returns."""
    uid = str(uuidlib.uuid4())
    name = name or f"vfa-{uid[:8]}"
    workdir = Path(workdir)
    (workdir / "fs-src").mkdir(parents=True, exist_ok=True)
    with open(workdir / "fs-src" / "data", "wb") as fh:
        fh.write(b"\xff" * (data_mib << 20))  # not zeros: mke2fs -d would leave holes, and the guest's writes
        # would then allocate blocks (metadata in the journal) instead of overwriting the file in place
    image = workdir / "vda.raw"
    subprocess.run(["truncate", "-s", f"{data_mib + 24}M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(workdir / "fs-src"), str(image)], check=True)
    SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    sock = SOCKET_DIR / f"{uid[:13]}.sock"
    spec = DiskSpec("vda", "raw")
    xml = domain_xml(name, uid, workdir, [spec], {"vda": image}, sock, agent=hook)
    guest = Guest(conn=conn, name=name, uuid=uid, workdir=workdir, disks={"vda": image}, formats={"vda": "raw"},
                  writing=["vda"], persistent=True, sock=sock, xml=xml, fs_file="/data")
    conn.defineXML(xml)
    try:
        guest.start()
    except BaseException:
        guest.remove()
        raise
    return guest
