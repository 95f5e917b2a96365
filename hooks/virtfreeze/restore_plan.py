"""What a restore will write, and where: pure logic, checked before anything is written.

An archive is data, never instructions: it may come from a compromised
backup server. `read_archive` accepts only a tree of regular files and
directories whose names stay inside it and whose data files have the sizes
the manifest recorded. `plan_restore` decides every destination (in place:
the archived paths; as a new domain: files of its own) and refuses any that
is not inside an allowed directory. `relocate_xml` applies the same
decisions to a definition and to the XML inside a memory image, so that the
two always agree.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import stat
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from virtfreeze.errors import UsageError, VirtfreezeError
from virtfreeze.segment_stamps import segment_count
from virtfreeze.segment_view import segment_name

LIBVIRT_DIR = Path("/var/lib/libvirt")
SWTPM_DIR = LIBVIRT_DIR / "swtpm"
NVRAM_DIR = LIBVIRT_DIR / "qemu" / "nvram"
BLOCK_DISK_DIR = LIBVIRT_DIR / "images"  # where block-device disks come back as raw files without --disk-dir
ALWAYS_ALLOWED = (LIBVIRT_DIR, Path("/var/log/libvirt"), Path("/run/libvirt"))
FIRMWARE_DIRS = (Path("/usr/share"),)  # <loader> and <nvram template=> are read from packaged firmware only
BOOT_DIRS = (Path("/usr/share"), Path("/boot"))  # besides the allowed places: where <kernel>/<initrd> may be read
WAY_OUT = "restore with --disk-dir DIR, or list the directory under restore_directories in the config"


class ArchiveRefused(UsageError):
    """The archive names a place or holds a file a restore must not write or read."""


class ArchiveIncomplete(VirtfreezeError):
    """The archive lacks data it needs (a truncated image, a missing disk)."""


@dataclass(frozen=True)
class ArchivedImage:
    file: PurePosixPath  # relative to the archive's root
    format: str
    path: str  # where it was on the frozen host


@dataclass(frozen=True)
class SegmentLayout:
    """A disk archived as its guest-visible bytes in fixed-size segment files (000000, 000001, ...)."""

    segment_size: int
    count: int
    size: int  # guest-visible bytes; the last segment holds the rest

    def length(self, i: int) -> int:
        return min(self.segment_size, self.size - i * self.segment_size)


@dataclass(frozen=True)
class ArchivedDisk:
    target: str
    image: ArchivedImage  # a segmented disk: `file` is its directory, `format` the one it comes back in
    type: str  # the disk's type when frozen: file or block
    backing: tuple[ArchivedImage, ...]  # its chain below, nearest first
    segments: SegmentLayout | None = None  # None: one image file (layout "image")


@dataclass
class Archive:
    """An extracted archive (or a domain's export view), read and checked once."""

    root: Path
    manifest: dict
    xml: str  # the inactive definition as frozen
    name: str
    uuid: str
    state_at_freeze: str
    disks: list[ArchivedDisk]
    memory: PurePosixPath | None
    nvram: PurePosixPath | None
    tpm: PurePosixPath | None


def safe_relpath(value: object, what: str) -> PurePosixPath:
    """A path from an archive that stays inside it: relative, no `..`, no empty or odd parts."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise ArchiveRefused(f"archive names {what} with an invalid path {value!r}", hint="not a virtfreeze archive?")
    p = PurePosixPath(value)
    if p.is_absolute() or any(part in ("..", ".", "") for part in value.split("/")):
        raise ArchiveRefused(f"archive names {what} outside itself: {value!r}",
                             hint="an archive is data: refusing it; check where it came from")
    return p


def _walk_checked(root: Path) -> None:
    """Refuse a tree holding anything but regular files and directories (symlinks, devices, FIFOs)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in (*dirnames, *filenames):
            p = Path(dirpath) / entry
            mode = os.lstat(p).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = "a symlink" if stat.S_ISLNK(mode) else "a special file"
                raise ArchiveRefused(f"archive holds {kind}: {p.relative_to(root)}",
                                     path=str(p), hint="an archive is data: refusing it; check where it came from")


METADATA_LIMIT = 16 << 20  # manifest.json and domain.xml are kilobytes


def _read_small(path: Path) -> str:
    """A metadata file of the archive: a regular file (never through a symlink, never a FIFO or device)
    of bounded size."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArchiveRefused(f"archive's {path.name} is not a regular file", path=str(path))
        if st.st_size > METADATA_LIMIT:
            raise ArchiveRefused(f"archive's {path.name} is {st.st_size} bytes; not a virtfreeze archive",
                                 path=str(path))
        return os.read(fd, METADATA_LIMIT + 1).decode()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ArchiveRefused(f"archive holds a symlink: {path.name}", path=str(path)) from None
        raise
    finally:
        os.close(fd)


LAYOUTS = ("image", "segmented")


def _segment_layout(target: str, d: dict, manifest_path: Path) -> SegmentLayout | None:
    """A disk entry's layout: None for one image file, else its segments, each value checked."""
    layout = d.get("layout", "image")
    if layout not in LAYOUTS:
        raise ArchiveRefused(f"disk {target}: unknown layout {layout!r}", path=str(manifest_path),
                             hint=f"known: {', '.join(LAYOUTS)}; a newer virtfreeze's archive?")
    if layout == "image":
        return None
    seg = d.get("segments")
    values = [seg.get(k) for k in ("segment_size", "count", "size")] if isinstance(seg, dict) else []
    if len(values) != 3 or not all(type(v) is int and v > 0 for v in values):
        raise ArchiveRefused(f"disk {target}: segments needs positive integers segment_size, count and size",
                             path=str(manifest_path), hint="not a virtfreeze manifest?")
    layout = SegmentLayout(*values)
    if layout.segment_size < 512 or layout.segment_size & (layout.segment_size - 1):
        raise ArchiveRefused(f"disk {target}: segment_size {layout.segment_size} is not a power of two of at "
                             "least 512", path=str(manifest_path))
    if layout.count != segment_count(layout.size, layout.segment_size):
        raise ArchiveRefused(f"disk {target}: {layout.count} segments cannot hold {layout.size} bytes in "
                             f"segments of {layout.segment_size}", path=str(manifest_path))
    if d.get("backing"):
        raise ArchiveRefused(f"disk {target}: a segmented disk names a backing chain (its segments hold the "
                             "guest's whole view)", path=str(manifest_path), hint="not a virtfreeze manifest?")
    if d.get("size", layout.size) != layout.size:
        raise ArchiveRefused(f"disk {target}: size {d.get('size')!r} disagrees with its segments' {layout.size}",
                             path=str(manifest_path), hint="not a virtfreeze manifest?")
    return layout


def read_archive(root: Path, *, data: bool = True) -> Archive:
    """Read manifest.json and domain.xml under `root`; with `data`, also check the tree and every
    data file's size against the manifest."""
    root = Path(root)
    try:
        manifest = json.loads(_read_small(root / "manifest.json"))
        xml = _read_small(root / "domain.xml")
    except FileNotFoundError as e:
        raise ArchiveIncomplete(f"no {Path(e.filename).name} in the archive", path=str(root),
                                hint="is this a virtfreeze archive or export view?") from None
    except (OSError, ValueError) as e:
        raise ArchiveIncomplete(f"unreadable manifest or definition: {e}", path=str(root)) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("disks", {}), dict):
        raise ArchiveRefused("manifest.json is not a virtfreeze manifest", path=str(root / "manifest.json"))
    try:
        root_el = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ArchiveRefused(f"domain.xml is not valid XML: {e}", path=str(root / "domain.xml")) from None
    name = (root_el.findtext("name") or "").strip()
    uuid = (root_el.findtext("uuid") or "").strip()
    if not name or not uuid or manifest.get("domain") not in (None, name):
        raise ArchiveRefused("domain.xml and manifest.json disagree or lack a name/UUID", path=str(root))

    disks = []
    for target, d in sorted(manifest.get("disks", {}).items()):
        if not isinstance(d, dict) or not isinstance(d.get("backing", []), list) \
                or not all(isinstance(b, dict) for b in d.get("backing", [])) \
                or not isinstance(manifest.get("sizes", {}), dict):
            raise ArchiveRefused("manifest.json is not a virtfreeze manifest", path=str(root / "manifest.json"))
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", target or ""):
            raise ArchiveRefused(f"manifest names an invalid disk target {target!r}", path=str(root))
        backing = tuple(ArchivedImage(safe_relpath(b.get("file"), f"disk {target}'s backing file"),
                                      str(b.get("format") or "raw"), str(b.get("path") or ""))
                        for b in d.get("backing", []))
        disks.append(ArchivedDisk(target, ArchivedImage(safe_relpath(d.get("file"), f"disk {target}"),
                                                        str(d.get("format") or "raw"), str(d.get("base") or "")),
                                  str(d.get("type") or "file"), backing,
                                  _segment_layout(target, d, root / "manifest.json")))
    for disk in disks:
        for img in (disk.image, *disk.backing):
            if img.format not in ("raw", "qcow2"):
                raise ArchiveRefused(f"disk {disk.target}: unsupported image format {img.format!r}",
                                     path=str(root / img.file))

    def present(rel: str) -> PurePosixPath | None:
        return PurePosixPath(rel) if (root / rel).exists() or rel in manifest.get("sizes", {}) else None

    archive = Archive(root, manifest, xml, name, uuid, str(manifest.get("state_at_freeze") or "shut off"), disks,
                      PurePosixPath("memory.save") if manifest.get("memory") else None,
                      present("nvram.fd"),
                      PurePosixPath("tpm") if (root / "tpm").is_dir() or _lists(manifest, "tpm") else None)
    if data:
        check_data(archive)
    return archive


def _lists(manifest: dict, rel: str) -> bool:
    """The manifest's `files` names `rel` (so an archive read from its metadata alone still knows of it)."""
    files = manifest.get("files")
    return isinstance(files, list) and rel in files


def check_data(archive: Archive) -> None:
    """Every file the manifest lists is there, a regular file of the recorded size; nothing leads out."""
    root = archive.root
    _walk_checked(root)
    sizes = archive.manifest.get("sizes", {})
    for rel, want in sorted(sizes.items()):
        rel_p = safe_relpath(rel, "a data file")
        p = root / rel_p
        if rel_p == archive.memory:
            continue  # checked only when it is used (save_image.read), so that --no-memory still works
        try:
            got = os.stat(p).st_size
        except FileNotFoundError:
            raise ArchiveIncomplete(f"{rel} is missing from the archive", path=str(root)) from None
        if got != want:
            raise ArchiveIncomplete(f"{rel} holds {got} of {want} bytes (truncated?)", path=str(p))
    if archive.tpm is not None and not (root / archive.tpm).is_dir():
        raise ArchiveIncomplete("the TPM state (tpm/) is missing from the archive", path=str(root))
    for disk in archive.disks:
        if disk.segments is not None:
            _check_segments(root, disk)
            continue
        for img in (disk.image, *disk.backing):
            if not (root / img.file).is_file():
                raise ArchiveIncomplete(f"disk {disk.target}: {img.file} is missing from the archive", path=str(root))


def _check_segments(root: Path, disk: ArchivedDisk) -> None:
    """A segmented disk's directory holds exactly its segments, each a regular file of its length."""
    directory = root / disk.image.file
    if not directory.is_dir():
        raise ArchiveIncomplete(f"disk {disk.target}: {disk.image.file}/ is missing from the archive", path=str(root))
    count = disk.segments.count
    extra = sorted(n for n in os.listdir(directory)
                   if not (n.isdigit() and int(n) < count and segment_name(int(n), count) == n))
    if extra:
        raise ArchiveRefused(f"disk {disk.target}: {disk.image.file}/ holds {extra[0]}, which is not one of its "
                             f"{count} segments", path=str(directory / extra[0]),
                             hint="an archive is data: refusing it; check where it came from")
    for i in range(count):
        n = segment_name(i, count)
        try:
            st = os.lstat(directory / n)
        except FileNotFoundError:
            raise ArchiveIncomplete(f"disk {disk.target}: segment {disk.image.file}/{n} is missing from the archive",
                                    path=str(directory)) from None
        if not stat.S_ISREG(st.st_mode) or st.st_size != disk.segments.length(i):
            raise ArchiveIncomplete(f"disk {disk.target}: segment {disk.image.file}/{n} holds {st.st_size} of "
                                    f"{disk.segments.length(i)} bytes (truncated?)", path=str(directory / n))


def memory_complete(archive: Archive) -> None:
    """The memory image is there at its recorded size; else one line suggesting --no-memory."""
    p = archive.root / archive.memory
    want = archive.manifest.get("sizes", {}).get(str(archive.memory))
    try:
        got = os.stat(p).st_size
    except FileNotFoundError:
        raise ArchiveIncomplete("memory.save is missing from the archive", path=str(archive.root),
                                hint="restore with --no-memory to cold-boot from the disks") from None
    if want is not None and got != want:
        raise ArchiveIncomplete(f"memory.save holds {got} of {want} bytes (truncated?)", path=str(p),
                                hint="restore with --no-memory to cold-boot from the disks")


# -- destinations -------------------------------------------------------------------

def _resolved(path: Path) -> Path:
    """`path` with every existing ancestor's symlinks resolved (the rest need not exist yet)."""
    return Path(os.path.realpath(path))


def inside(path: Path, roots: list[Path]) -> bool:
    if not Path(path).is_absolute():  # libvirt would resolve it against its own working directory
        return False
    real = _resolved(path)
    return any(real == _resolved(r) or _resolved(r) in real.parents for r in roots)


@dataclass(frozen=True)
class Placement:
    """One file (or tree) the restore writes: archive file -> destination."""

    source: PurePosixPath
    dest: Path
    kind: str  # disk, backing, nvram, tpm
    format: str | None = None
    target: str | None = None
    backing_dest: Path | None = None  # a chain member's own backing file, once restored
    backing_format: str | None = None
    segments: SegmentLayout | None = None  # a disk reassembled from the segment files in `source`


@dataclass
class RestorePlan:
    name: str
    uuid: str
    new: bool  # a new domain beside the original (--name)
    placements: list[Placement]
    definition: str  # the XML to define
    relocation: "Relocation"
    warnings: list[str] = field(default_factory=list)
    allowed: list[Path] = field(default_factory=list)  # where it may write (also checks the memory image's XML)

    def files(self) -> list[Path]:
        return [p.dest for p in self.placements]


@dataclass
class Relocation:
    """How a definition changes on its way back: applied alike to domain.xml and the memory image's XML."""

    name: str
    uuid: str
    disks: dict[str, tuple[Path, str]]  # target -> (restored file, format)
    nvram: Path | None = None
    macs: dict[str, str] = field(default_factory=dict)  # old MAC -> new MAC
    files: dict[str, str] = field(default_factory=dict)  # other per-domain files (serial logs, ...): old -> new
    remove: list[str] = field(default_factory=list)  # device elements to drop (a verify's isolation)
    eject: set[str] = field(default_factory=set)  # cdrom/floppy targets whose medium is outside the allowed places
    drop_disks: set[str] = field(default_factory=set)  # data disks the archive lacks (a new domain: left out)
    free_graphics_ports: bool = False  # graphics take any free port (a fixed one is the original's)


def new_mac(rng: random.Random) -> str:
    return "52:54:00:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(3))


def _renamed(path: str, old: str, new: str, directory: Path | None = None) -> str:
    """A per-domain file's path for the new domain: the old name replaced, or the new one prefixed."""
    p = Path(path)
    base = p.name.replace(old, new) if old in p.name else f"{new}-{p.name}"
    return str((directory or p.parent) / base)


_DOMAIN_FILE_ELEMENTS = ("serial", "console", "parallel", "channel")


def _domain_files(root: ET.Element) -> list[tuple[ET.Element, str]]:
    """(element, attribute) of the per-domain files libvirt or QEMU write: character device files and
    sockets, and their <log file=>."""
    out = []
    for tag in _DOMAIN_FILE_ELEMENTS:
        for dev in root.findall(f"devices/{tag}"):
            src = dev.find("source")
            if src is not None and src.get("path"):
                out.append((src, "path"))
            log_el = dev.find("log")
            if log_el is not None and log_el.get("file"):
                out.append((log_el, "file"))
    return out


PASSTHROUGH = ("hostdev", "filesystem", "redirdev", "smartcard", "shmem")  # host devices, shared directories
EMULATOR_DIRS = ("/usr/bin", "/usr/libexec", "/usr/local/bin")
EMULATOR_NAME = re.compile(r"qemu-system-[A-Za-z0-9_]+|qemu-kvm|kvm")


def passthrough(xml: str) -> list[str]:
    """The host devices and shared directories a definition uses (none survive a verify)."""
    root = ET.fromstring(xml)
    return [tag for tag in PASSTHROUGH if root.findall(f"devices/{tag}")]


def left_out_disks(archive: Archive) -> list[str]:
    """Data disks of the definition that the archive does not hold (excluded, shareable, network, ...)."""
    held = {d.target for d in archive.disks}
    out = []
    for disk in ET.fromstring(archive.xml).findall("devices/disk"):
        target = disk.find("target")
        if disk.get("device", "disk") in ("disk", "lun") and target is not None and target.get("dev") not in held:
            out.append(target.get("dev"))
    return out


def plan_restore(archive: Archive, *, name: str | None, disk_dir: Path | None, allowed: list[Path],
                 rng: random.Random | None = None, isolate: str | None = None, file_dir: Path | None = None,
                 overlay: bool = False) -> RestorePlan:
    """Every destination of a restore and the definition to define; refuses places outside `allowed`.

    For a verify: `isolate` ("memory": it resumes, so its NICs stay, their links taken down at
    start; "cold": NICs removed) drops host devices and shared directories and lets graphics
    pick free ports; `file_dir` takes its log files; with `overlay`, each disk without a backing
    chain becomes a qcow2 overlay on the archived image, read in place (no copy). A segmented disk
    is always reassembled into its destination (its segments cannot be read in place)."""
    rng = rng or random.SystemRandom()
    new = name is not None and name != archive.name
    name = name or archive.name
    if not re.fullmatch(r"[^/\0\s][^/\0]*", name):
        raise UsageError(f"invalid domain name {name!r}")
    uuid = str(uuid_mod.UUID(int=rng.getrandbits(128), version=4)) if new else archive.uuid
    root = ET.fromstring(archive.xml)
    warnings: list[str] = []
    placements: list[Placement] = []
    reloc = Relocation(name, uuid, {})

    for disk in archive.disks:
        block = disk.type == "block"
        if block:
            directory = disk_dir or BLOCK_DISK_DIR
            dest = directory / f"{name}-{disk.target}.raw"
            warnings.append(f"disk {disk.target} was the block device {disk.image.path}; it comes back as the raw "
                            f"file {dest}")
        elif new:
            dest = Path(_renamed(disk.image.path, archive.name, name, disk_dir)) if disk.image.path \
                else (disk_dir or BLOCK_DISK_DIR) / f"{name}-{disk.target}.{disk.image.format}"
            if not disk.image.path or Path(dest) == Path(disk.image.path):
                dest = Path(dest).parent / f"{name}-{disk.target}.{disk.image.format}"
        else:
            dest = disk_dir / Path(disk.image.path).name if disk_dir else Path(disk.image.path)
        fmt = "raw" if block else disk.image.format
        if overlay and not disk.backing and disk.segments is None:  # segments cannot be read in place
            dest = (disk_dir or dest.parent) / f"{name}-{disk.target}.qcow2"
            placements.append(Placement(disk.image.file, dest, "overlay", "qcow2", disk.target,
                                        archive.root / disk.image.file, disk.image.format))
            reloc.disks[disk.target] = (dest, "qcow2")
            continue
        chain_dests = []
        for depth, img in enumerate(disk.backing, 1):
            if new or not img.path:
                chain_dests.append(dest.parent / f"{name}-{disk.target}.backing-{depth}.{img.format}")
            else:
                chain_dests.append(disk_dir / Path(img.path).name if disk_dir else Path(img.path))
        below = list(zip(chain_dests, [i.format for i in disk.backing]))
        placements.append(Placement(disk.image.file, dest, "disk", fmt, disk.target,
                                    *(below[0] if below else (None, None)), segments=disk.segments))
        for i, (img, cdest) in enumerate(zip(disk.backing, chain_dests)):
            nxt = below[i + 1] if i + 1 < len(below) else (None, None)
            placements.append(Placement(img.file, cdest, "backing", img.format, disk.target, *nxt))
        reloc.disks[disk.target] = (dest, fmt)

    nvram_el = root.find("os/nvram")
    if archive.nvram is not None:
        old = (nvram_el.text or "").strip() if nvram_el is not None else ""
        if new or not old:
            dest = NVRAM_DIR / f"{name}_VARS.fd"
        else:
            dest = Path(old)
        placements.append(Placement(archive.nvram, dest, "nvram"))
        reloc.nvram = dest
    elif nvram_el is not None and new:
        reloc.nvram = NVRAM_DIR / f"{name}_VARS.fd"  # libvirt makes it from the template at start
    if archive.tpm is not None:
        placements.append(Placement(archive.tpm, SWTPM_DIR / uuid, "tpm"))

    if new:
        for iface in root.findall("devices/interface"):
            mac = iface.find("mac")
            if mac is not None and mac.get("address"):
                reloc.macs[mac.get("address").lower()] = new_mac(rng)
        for el, attr in _domain_files(root):
            is_socket = el.tag == "source" and el.get("mode") is not None  # stays short: sun_path is 108 bytes
            reloc.files[el.get(attr)] = _renamed(el.get(attr), archive.name, name,
                                                 None if is_socket else file_dir)
    if new:  # a new domain never shares a disk with the original: those the archive lacks are left out
        for target in left_out_disks(archive):
            reloc.drop_disks.add(target)
            warnings.append(f"disk {target} is not in the archive; the new domain has no such disk")
    if isolate:
        reloc.remove = list(PASSTHROUGH) + (["interface"] if isolate == "cold" else [])
        reloc.free_graphics_ports = True

    for disk in root.findall("devices/disk"):  # a medium the archive does not hold, read from the host
        target, src = disk.find("target"), disk.find("source")
        path = src.get("file") or src.get("dev") if src is not None else None
        if disk.get("device") in ("cdrom", "floppy") and path and target is not None \
                and not inside(Path(path), allowed):
            reloc.eject.add(target.get("dev"))
            warnings.append(f"{disk.get('device')} {target.get('dev')}: {path} is outside the allowed places; "
                            "restored empty (insert it again with `virsh change-media`)")

    dests = [p.dest for p in placements]
    if len(set(dests)) != len(dests):
        raise ArchiveRefused("two archived files would be restored to the same path", path=str(root),
                             hint="restore with --name or --disk-dir")
    for p in placements:
        if not inside(p.dest, allowed):
            raise ArchiveRefused(f"{'disk ' + p.target if p.target else p.kind} would be restored outside the "
                                 f"allowed places: {p.dest}", domain=name, path=str(p.dest), hint=WAY_OUT)
    definition = relocate_xml(archive.xml, reloc)
    check_paths(definition, name, allowed)
    return RestorePlan(name, uuid, new, placements, definition, reloc, warnings, list(allowed))


def check_paths(xml: str, name: str, allowed: list[Path]) -> None:
    """A definition (or a memory image's XML, once relocated) names no file libvirt or QEMU would open
    outside the allowed places; firmware comes from packaged firmware, kernels also from /boot."""
    root = ET.fromstring(xml)
    refuse = "an archive is data: it may not give this domain host access; restore it by hand if you trust it"
    foreign = [el.tag for el in root.iter() if el.tag.startswith("{")]
    if foreign:  # e.g. <qemu:commandline>: arbitrary QEMU arguments
        raise ArchiveRefused(f"definition holds {foreign[0].split('}')[-1]!r} of another namespace", domain=name,
                             hint=refuse)
    for tag in PASSTHROUGH:
        if root.findall(f"devices/{tag}"):
            raise ArchiveRefused(f"definition passes a host device or directory through (<{tag}>)", domain=name,
                                 hint=refuse)
    for iface in root.findall("devices/interface"):
        if iface.get("type") in ("hostdev", "vhostuser"):
            raise ArchiveRefused(f"definition passes a host interface through (type {iface.get('type')})",
                                 domain=name, hint=refuse)
    emulator = (root.findtext("devices/emulator") or "").strip()
    if emulator and not (os.path.dirname(emulator) in EMULATOR_DIRS
                         and EMULATOR_NAME.fullmatch(os.path.basename(emulator))):
        raise ArchiveRefused(f"definition runs {emulator!r} as its emulator", domain=name, path=emulator,
                             hint="only a qemu-system-* from " + ", ".join(EMULATOR_DIRS))
    for el in root.iter():
        sock = el.get("socket")
        if sock and not inside(Path(sock), allowed):  # graphics, listen, network disk hosts
            raise ArchiveRefused(f"definition names a socket outside the allowed places: {sock}", domain=name,
                                 path=sock, hint=WAY_OUT)
    for disk in root.findall("devices/disk"):
        if disk.get("type") not in ("file", "block", "network", None):
            raise ArchiveRefused(f"definition has a disk of type {disk.get('type')!r}", domain=name, hint=refuse)
    for tag in ("kernel", "initrd", "dtb"):
        path = (root.findtext(f"os/{tag}") or "").strip()
        if path and not inside(Path(path), [*BOOT_DIRS, *allowed]):
            raise ArchiveRefused(f"<{tag}> read from outside the allowed places: {path}", domain=name, path=path,
                                 hint=WAY_OUT)
    for el, attr in _domain_files(root):
        if not inside(Path(el.get(attr)), allowed):
            raise ArchiveRefused(f"definition names a file outside the allowed places: {el.get(attr)}",
                                 domain=name, path=el.get(attr), hint=WAY_OUT)
    for disk in root.findall("devices/disk"):
        src = disk.find("source")
        path = src is not None and (src.get("file") or src.get("dev"))
        if path and not inside(Path(path), allowed):
            raise ArchiveRefused(f"definition names a disk outside the allowed places: {path}", domain=name,
                                 path=path, hint=WAY_OUT)
    for tpm_src in root.findall("devices/tpm/backend/source"):
        if tpm_src.get("path") and not inside(Path(tpm_src.get("path")), allowed):
            raise ArchiveRefused(f"TPM state outside the allowed places: {tpm_src.get('path')}", domain=name,
                                 path=tpm_src.get("path"), hint=WAY_OUT)
    nvram = root.find("os/nvram")
    if nvram is not None and (nvram.text or "").strip() and not inside(Path(nvram.text.strip()), allowed):
        raise ArchiveRefused(f"NVRAM outside the allowed places: {nvram.text.strip()}", domain=name,
                             path=nvram.text.strip(), hint=WAY_OUT)
    for el, attr in ((root.find("os/loader"), None), (nvram, "template")):
        if el is None:
            continue
        path = (el.text or "").strip() if attr is None else el.get(attr)
        if path and not inside(Path(path), list(FIRMWARE_DIRS)):
            raise ArchiveRefused(f"firmware read from outside {', '.join(map(str, FIRMWARE_DIRS))}: {path}",
                                 domain=name, path=path, hint="an archive is data: refusing it")


def relocate_xml(xml: str, reloc: Relocation) -> str:
    """The definition (or a memory image's XML) with the restore's name, UUID, files and MACs."""
    root = ET.fromstring(xml)
    _set_text(root, "name", reloc.name)
    _set_text(root, "uuid", reloc.uuid)
    for disk in root.findall("devices/disk"):
        target = disk.find("target")
        tdev = target.get("dev") if target is not None else None
        if tdev in reloc.eject:
            for src in disk.findall("source"):
                disk.remove(src)
            continue
        if tdev in reloc.drop_disks:
            root.find("devices").remove(disk)
            continue
        if tdev not in reloc.disks:
            continue
        path, fmt = reloc.disks[tdev]
        disk.set("type", "file")
        src = disk.find("source")
        if src is None:
            src = ET.SubElement(disk, "source")
        for attr in ("dev", "file", "index"):
            src.attrib.pop(attr, None)
        src.set("file", str(path))
        driver = disk.find("driver")
        if driver is not None:
            driver.set("type", fmt)
        for bs in disk.findall("backingStore"):
            disk.remove(bs)
    nvram = root.find("os/nvram")
    if nvram is not None and reloc.nvram is not None:
        nvram.text = str(reloc.nvram)
    for iface in root.findall("devices/interface"):
        mac = iface.find("mac")
        if mac is not None and (mac.get("address") or "").lower() in reloc.macs:
            mac.set("address", reloc.macs[mac.get("address").lower()])
    for el, attr in _domain_files(root):
        if el.get(attr) in reloc.files:
            el.set(attr, reloc.files[el.get(attr)])
    devices = root.find("devices")
    for tag in reloc.remove:
        for el in devices.findall(tag) if devices is not None else []:
            devices.remove(el)
    if reloc.free_graphics_ports:
        for g in root.findall("devices/graphics"):
            for attr in ("port", "tlsPort", "websocket"):
                g.attrib.pop(attr, None)
            g.set("autoport", "yes")
    return ET.tostring(root, encoding="unicode")


def _set_text(root: ET.Element, tag: str, text: str) -> None:
    el = root.find(tag)
    if el is None:
        el = ET.Element(tag)
        root.insert(0, el)
    el.text = text
