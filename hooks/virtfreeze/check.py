"""Preflight: what will work on this host and for each domain, before the first night.

`virtfreeze check` changes nothing and writes nothing: it reads versions,
directories, definitions and libvirt's security model, and asks a guest
agent for a ping. One finding per line, each ok, warning or error.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

from virtfreeze.domain_xml import has_agent_channel, has_swtpm, ineligible_reason, nvram_path, overlay_path, parse_disks
from virtfreeze.errors import DomainNotFound, VirtfreezeError
from virtfreeze.libvirt_boundary import PAUSED, RUNNING, DomainInfo
from virtfreeze.runtime import Runtime
from virtfreeze.status import planned_strategy

OK, WARNING, ERROR = "ok", "warning", "error"
AGENT_PING_SECONDS = 2


@dataclass(frozen=True)
class Finding:
    level: str  # ok, warning, error
    scope: str  # "host", or a domain's name
    topic: str  # libvirt, apparmor, directory, tool, fuse, disk vda, quiesce, nvram, tpm, strategy, domain
    message: str

    def to_json(self) -> dict:
        return asdict(self)


def _fs(path: Path) -> tuple[str, int] | None:
    """(filesystem type, bytes free) of the filesystem holding `path` (its nearest existing ancestor)."""
    p = path
    while not p.exists():
        p = p.parent
    best, fstype = "", "?"
    with open("/proc/self/mounts") as fh:
        for line in fh:
            fields = line.split()
            mp = fields[1].replace("\\040", " ")
            if (str(p) == mp or str(p).startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                best, fstype = mp, fields[2]
    st = os.statvfs(p)
    return fstype, st.f_bavail * st.f_frsize


def _version(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def host_findings(rt: Runtime, needs_fuse: bool, needs_qsd: bool = False) -> list[Finding]:
    """The host's findings; `needs_fuse`: a checked domain has a block-device disk or segments to export;
    `needs_qsd`: a checked domain has a qcow2 disk in the segmented layout."""
    cfg, hv = rt.config, rt.hv
    out = []
    lib, qemu = hv.versions()
    out.append(Finding(OK, "host", "libvirt", f"libvirt {lib}, QEMU {qemu} at {hv.uri}"))
    model = hv.security_model()
    if model == "apparmor":
        out.append(Finding(WARNING, "host", "live commit",
                           "libvirt confines QEMU with AppArmor (read from its security model): on Debian 12 it "
                           "refuses live commits (OpenNebula/one#6565), so a running VM is merged offline, stopped "
                           "for the whole merge (strategy auto says so); not tried here"))
    else:
        out.append(Finding(OK, "host", "live commit",
                           f"libvirt's security model is {model or 'none'} (read, not tried): nothing refuses a live "
                           "commit"))
    for what, path, durable in (("state_directory", cfg.state_directory, True),
                                ("export_directory", cfg.export_directory, False),
                                ("overlay_directory", cfg.overlay_directory, True),
                                ("memory_directory", cfg.memory_directory, False)):  # tmpfs allowed: RAM
        if path is None:
            continue
        fstype, free = _fs(Path(path))
        exists = "" if Path(path).exists() else " (does not exist yet; made on first use)"
        if durable and fstype in ("tmpfs", "ramfs"):
            out.append(Finding(ERROR, "host", what, f"{path} is on {fstype}: it must survive a reboot "
                                                   f"(journal, overlays){exists}"))
        elif what == "overlay_directory" and free < cfg.overlay_min_free:
            out.append(Finding(ERROR, "host", what, f"{path}: {free >> 20} MiB free, below overlay_min_free "
                                                   f"({cfg.overlay_min_free >> 20} MiB): freeze refuses{exists}"))
        else:
            out.append(Finding(OK, "host", what, f"{path} on {fstype}, {free >> 20} MiB free{exists}"))
    for tool, argv in (("borg", ["borg", "--version"]), ("restic", ["restic", "version"]),
                       ("borgmatic", ["borgmatic", "--version"])):
        version = _version(argv)
        used = any(t.get("type") == tool for t in cfg.targets.values())
        if version:
            out.append(Finding(OK, "host", tool, version))
        elif used:
            out.append(Finding(ERROR, "host", tool, "not found, and a configured target uses it"))
    if needs_fuse:
        if not os.path.exists("/dev/fuse"):
            out.append(Finding(ERROR, "host", "fuse", "/dev/fuse is missing: block-device disks cannot be exported "
                                                     "(modprobe fuse)"))
        else:
            try:
                importlib.import_module("virtfreeze._vendor.mfusepy")  # loads libfuse3

                out.append(Finding(OK, "host", "fuse", "/dev/fuse and libfuse3: block-device disks and segments "
                                                      "are exported"))
            except (ImportError, OSError) as e:
                out.append(Finding(ERROR, "host", "fuse", f"libfuse3 cannot be loaded ({e}): install libfuse3-3"))
    if needs_qsd:
        version = _version(["qemu-storage-daemon", "--version"])
        out.append(Finding(OK, "host", "qemu-storage-daemon", version) if version else
                   Finding(ERROR, "host", "qemu-storage-daemon", "not found, and a qcow2 disk is in the segmented "
                                                                 "layout: install qemu-system-common"))
    return out


def findings(rt: Runtime, domains: list[DomainInfo], missing: list[str]) -> list[Finding]:
    """Everything `check` says: the host's findings first, then each domain's (its definitions read once)."""
    per_domain: list[Finding] = []
    for d in domains:
        try:
            per_domain += domain_findings(rt, d)
        except DomainNotFound:
            missing.append(d.name)  # undefined meanwhile
    needs_fuse = any(f.message.startswith("frozen:") and BLOCK_NOTE in f.message for f in per_domain) \
        or any(f.topic == "layout" for f in per_domain)
    needs_qsd = any(f.topic == "layout" and QCOW2_SEGMENTS in f.message for f in per_domain)
    return host_findings(rt, needs_fuse, needs_qsd) + per_domain + [missing_domain(n) for n in missing]


BLOCK_NOTE = "block device, exported as a file through FUSE"
QCOW2_SEGMENTS = "qcow2, read through qemu-storage-daemon"


def domain_findings(rt: Runtime, info: DomainInfo) -> list[Finding]:
    cfg, hv = rt.config, rt.hv
    name = info.name
    out = []
    inactive = hv.xml(info.uuid, name, inactive=True)
    live = hv.xml(info.uuid, name) if info.state in (RUNNING, PAUSED) else inactive
    excluded = set(cfg.for_domain(name).exclude_disks)
    frozen = 0
    for disk in parse_disks(live):
        reason = ineligible_reason(disk, excluded)
        topic = f"disk {disk.target}"
        if reason is None:
            frozen += 1
            where = overlay_path(disk, info.uuid, cfg.overlay_directory, cfg.state_directory)
            kind = BLOCK_NOTE if disk.type == "block" else disk.format or "?"
            out.append(Finding(OK, name, topic, f"frozen: {disk.source} ({kind}); overlay {where}"))
            fstype, free = _fs(where.parent)
            if free < cfg.overlay_min_free:
                out.append(Finding(ERROR, name, topic, f"only {free >> 20} MiB free for its overlay in {where.parent}, "
                                                       f"below overlay_min_free ({cfg.overlay_min_free >> 20} MiB): "
                                                       "freeze refuses"))
            if cfg.export_layout_of(name) == "segmented":
                out.append(_layout_finding(name, topic, disk, info.state))
        elif disk.device == "disk" and disk.type not in ("file", "block"):
            out.append(Finding(WARNING, name, topic, f"left out: {reason}; its data is NOT in the backup"))
        else:
            out.append(Finding(OK, name, topic, f"left out: {reason}"))
    if frozen == 0:
        out.append(Finding(WARNING, name, "disks", "no disk is frozen: only its definition is archived"))
    if info.state not in (RUNNING, PAUSED):
        out.append(Finding(OK, name, "quiesce", f"{info.state}: an offline snapshot, consistent as it is"))
    elif not has_agent_channel(live):
        out.append(Finding(WARNING, name, "quiesce", "no guest agent channel: crash-consistent snapshots only "
                                                    "(add org.qemu.guest_agent.0 and run qemu-guest-agent)"))
    else:
        try:
            hv.agent_ping(info.uuid, name, AGENT_PING_SECONDS)
            out.append(Finding(OK, name, "quiesce", "the guest agent answers: filesystems are quiesced"))
        except VirtfreezeError as e:
            level = ERROR if cfg.effective(name).quiesce == "require" else WARNING
            out.append(Finding(level, name, "quiesce", f"agent channel, but the agent does not answer ({e.message}): "
                                                       + ("quiesce require fails the freeze" if level == ERROR
                                                          else "crash-consistent snapshots")))
    if nvram_path(inactive):
        out.append(Finding(OK, name, "nvram", f"{nvram_path(inactive)} is archived"))
    if has_swtpm(inactive):
        out.append(Finding(OK, name, "tpm", "its swtpm state is archived"))
    strategy, why = planned_strategy(rt, name, info.state)
    out.append(Finding(OK if strategy != "none" else WARNING, name, "strategy", f"{strategy}: {why}"))
    root = ET.fromstring(inactive)
    passthrough = [t for t in ("hostdev", "filesystem") if root.findall(f"devices/{t}")]
    if passthrough and cfg.effective(name).memory:
        out.append(Finding(WARNING, name, "memory", f"{' and '.join(passthrough)} devices: its memory state "
                                                    "cannot be saved (--memory fails)"))
    return out


def _layout_finding(name: str, topic: str, disk, state: str) -> Finding:
    """How the segmented layout finds out what changed on this disk."""
    if disk.format != "qcow2":
        return Finding(OK, name, "layout", f"segmented, {topic}: {disk.format or 'raw'}, so each run compares "
                                           "segment hashes (reads the disk here; the backup tool reads what changed)")
    from virtfreeze.dirty_bitmap import holds_bitmaps

    try:
        bitmaps = holds_bitmaps(disk.source, name, disk.target)
    except VirtfreezeError as e:
        return Finding(WARNING, name, "layout", f"segmented, {topic}: cannot read the image ({e.message})")
    how = f"segmented, {topic}: {QCOW2_SEGMENTS}; "
    if not bitmaps:
        return Finding(WARNING, name, "layout", how + "compat 0.10 holds no dirty bitmap, so each run compares "
                                                      "hashes (`qemu-img amend -o compat=1.1` while it is shut off)")
    if state not in (RUNNING, PAUSED):
        return Finding(OK, name, "layout", how + f"{state}: hashes while it is not running, a dirty bitmap after")
    return Finding(OK, name, "layout", how + "a dirty bitmap tells what changed from the second run on")


def missing_domain(name: str) -> Finding:
    return Finding(ERROR, name, "domain", "no such domain (`virsh list --all` shows them)")
