"""Pure logic on libvirt domain XML: disks, eligibility, overlay names, the
snapshot document, and re-pointing a definition at its base images."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

OVERLAY_SUFFIX = ".virtfreeze.qcow2"
_OVERLAY_RE = re.compile(r"\.virtfreeze(?:-\d+)?\.qcow2$")
AGENT_CHANNEL = "org.qemu.guest_agent.0"


def is_overlay(path: str | None) -> bool:
    """Whether a path has the name virtfreeze gives its overlays."""
    return bool(path) and bool(_OVERLAY_RE.search(path))


@dataclass
class Disk:
    target: str
    device: str  # disk, cdrom, floppy, lun
    type: str  # file, block, network, volume, ...
    source: str | None  # file path or block device path
    format: str | None  # driver type: qcow2, raw, ...
    readonly: bool = False
    shareable: bool = False
    snapshot: str | None = None  # the disk's own snapshot= attribute
    backing: list[tuple[str, str | None]] = field(default_factory=list)  # chain below source, top first
    index: str | None = None  # a live definition's block node of the source (libvirt's <source index=>)


def _source_path(disk_type: str, elem: ET.Element | None) -> str | None:
    if elem is None:
        return None
    if disk_type == "file":
        return elem.get("file")
    if disk_type == "block":
        return elem.get("dev")
    return None


def _backing_chain(disk: ET.Element) -> list[tuple[str, str | None]]:
    chain = []
    node = disk.find("backingStore")
    while node is not None and node.get("type") is not None:
        fmt = node.find("format")
        path = _source_path(node.get("type"), node.find("source"))
        if path:
            chain.append((path, fmt.get("type") if fmt is not None else None))
        node = node.find("backingStore")
    return chain


def parse_disks(xml: str) -> list[Disk]:
    root = ET.fromstring(xml)
    disks = []
    for d in root.findall("devices/disk"):
        target = d.find("target")
        driver = d.find("driver")
        dtype = d.get("type", "file")
        disks.append(Disk(
            target=target.get("dev") if target is not None else "?",
            device=d.get("device", "disk"),
            type=dtype,
            source=_source_path(dtype, d.find("source")),
            format=driver.get("type") if driver is not None else None,
            readonly=d.find("readonly") is not None,
            shareable=d.find("shareable") is not None,
            snapshot=d.get("snapshot"),
            backing=_backing_chain(d),
            index=d.find("source").get("index") if d.find("source") is not None else None,
        ))
    return disks


def ineligible_reason(disk: Disk, excluded: set[str] | frozenset[str] = frozenset()) -> str | None:
    """Why a disk is left out of the snapshot, or None when it takes part."""
    if disk.target in excluded:
        return "excluded by configuration"
    if disk.device != "disk":
        return f"device is a {disk.device}"
    if disk.type not in ("file", "block"):
        return f"{disk.type} disks are not supported (only file and block)"
    if disk.readonly:
        return "read-only"
    if disk.shareable:
        return "shareable (other domains may write it)"
    if disk.source is None:
        return "has no source (empty drive)"
    if disk.snapshot == "no":
        return "the domain definition says snapshot='no'"
    return None


def overlay_path(disk: Disk, domain_uuid: str, overlay_dir: Path | None, state_dir: Path) -> Path:
    """Where the overlay of `disk` goes: beside a file base, or in the overlay directory."""
    if overlay_dir is not None:
        return Path(overlay_dir) / f"{domain_uuid}.{disk.target}{OVERLAY_SUFFIX}"
    if disk.type == "block":
        return Path(state_dir) / "overlays" / f"{domain_uuid}.{disk.target}{OVERLAY_SUFFIX}"
    return Path(f"{disk.source}{OVERLAY_SUFFIX}")


def snapshot_xml(disks: list[Disk], overlays: dict[str, Path], memory_file: Path | None = None) -> str:
    """The <domainsnapshot> document: external overlays for `overlays`, every other disk 'no'."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "description").text = "virtfreeze"
    if memory_file is not None:
        ET.SubElement(root, "memory", snapshot="external", file=str(memory_file))
    else:
        ET.SubElement(root, "memory", snapshot="no")
    elems = ET.SubElement(root, "disks")
    for disk in disks:
        if disk.target in overlays:
            e = ET.SubElement(elems, "disk", name=disk.target, snapshot="external", type="file")
            ET.SubElement(e, "driver", type="qcow2")
            ET.SubElement(e, "source", file=str(overlays[disk.target]))
        else:
            ET.SubElement(elems, "disk", name=disk.target, snapshot="no")
    return ET.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class BaseImage:
    """Where a disk goes back to: path, format and disk type ('file' or 'block')."""

    path: str
    format: str
    type: str = "file"


def repoint_disks(xml: str, bases: dict[str, BaseImage], only_if_source: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """Point the given disk targets of a definition back at their base images.

    Only disks whose current source is the given overlay (when `only_if_source`
    names one) are changed. Returns the new XML and the targets changed.
    """
    root = ET.fromstring(xml)
    changed = []
    for d in root.findall("devices/disk"):
        target = d.find("target")
        tdev = target.get("dev") if target is not None else None
        if tdev not in bases:
            continue
        src = d.find("source")
        current = _source_path(d.get("type", "file"), src)
        if only_if_source and only_if_source.get(tdev) != current:
            continue
        base = bases[tdev]
        if current == base.path:
            continue
        d.set("type", base.type)
        for old in d.findall("source"):
            d.remove(old)
        new_src = ET.Element("source", {"file" if base.type == "file" else "dev": base.path})
        driver = d.find("driver")
        index = list(d).index(driver) + 1 if driver is not None else 0
        d.insert(index, new_src)
        if driver is not None:
            driver.set("type", base.format)
        for bs in d.findall("backingStore"):
            d.remove(bs)
        changed.append(tdev)
    return ET.tostring(root, encoding="unicode"), changed


def has_agent_channel(xml: str) -> bool:
    root = ET.fromstring(xml)
    return any(t.get("name") == AGENT_CHANNEL for t in root.findall("devices/channel/target"))


def nvram_path(xml: str) -> str | None:
    node = ET.fromstring(xml).find("os/nvram")
    return node.text.strip() if node is not None and node.text else None


def has_swtpm(xml: str) -> bool:
    root = ET.fromstring(xml)
    return any(b.get("type") == "emulator" for b in root.findall("devices/tpm/backend"))
