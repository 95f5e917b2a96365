"""The export view: what borg and restic read while a domain is frozen.

`<export>/<domain>/` holds domain.xml, disks/<target>.<format> (read-only
bind mounts of the frozen base images), memory.save, nvram.fd, tpm/,
manifest.json and paths.txt. Large files stay on disk storage and only appear
here through bind mounts, so the export directory may be on tmpfs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

from virtfreeze.errors import VirtfreezeError
from virtfreeze.journal import write_atomic

log = logging.getLogger(__name__)


def domain_dir_name(name: str, uuid: str) -> str:
    """A directory name for a domain that cannot escape the export directory."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        return uuid
    return name


def _mount(args: list[str], path: Path) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise VirtfreezeError(f"mount failed: {proc.stderr.strip()}", path=str(path),
                              hint="virtfreeze needs root (CAP_SYS_ADMIN) for the export view")


def bind_readonly(source: Path, target: Path) -> None:
    """Make `source` appear read-only at `target` (a file or a block device)."""
    target.touch(mode=0o600, exist_ok=True)
    _mount(["--bind", str(source), str(target)], target)
    try:
        _mount(["-o", "remount,bind,ro", str(target)], target)
    except VirtfreezeError:
        unmount(target)
        raise


def unmount(target: Path) -> None:
    proc = subprocess.run(["umount", str(target)], capture_output=True, text=True)
    if proc.returncode != 0 and is_mountpoint(target):
        log.warning("path %s: umount failed (%s); detaching lazily", target, proc.stderr.strip())
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def unescape_mountinfo(field: str) -> str:
    """Undo the octal escapes (\\040 for a space, ...) of a /proc/self/mountinfo field."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mountinfo_paths() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        return [unescape_mountinfo(line.split()[4]) for line in fh]


def is_mountpoint(path: Path) -> bool:
    return str(path) in _mountinfo_paths()


def mounts_under(directory: Path) -> list[Path]:
    prefix = str(directory).rstrip("/") + "/"
    return sorted((Path(p) for p in _mountinfo_paths() if p.startswith(prefix)), key=lambda p: -len(str(p)))


def remove(directory: Path) -> None:
    """Unmount everything under a domain's export directory and delete it."""
    for mp in mounts_under(directory):
        unmount(mp)
    if mounts_under(directory):
        raise VirtfreezeError("export view still has mounts; not deleting it", path=str(directory),
                              hint="check what holds them open (borg or restic still running?)")
    shutil.rmtree(directory, ignore_errors=True)


def backing_name(target: str, depth: int, fmt: str) -> str:
    """Export name of the depth-th image below a disk's base (1 = its backing file)."""
    return f"disks/{target}.backing-{depth}.{fmt}"


def create(directory: Path, *, inactive_xml: str, disks: dict[str, tuple[str, str, tuple]],
           memory_file: Path | None, nvram: str | None, tpm_dir: Path | None,
           manifest: dict) -> list[Path]:
    """Build a domain's export view; return the paths written to paths.txt.

    `disks` maps target -> (base image path, format, backing chain of the base).
    A base on a backing chain (a template) is exported with its whole chain.
    """
    if directory.exists():
        remove(directory)
    directory.mkdir(parents=True, mode=0o700)
    paths: list[Path] = []

    xml_path = directory / "domain.xml"
    write_atomic(xml_path, inactive_xml.encode())
    paths.append(xml_path)

    disk_dir = directory / "disks"
    disk_dir.mkdir(mode=0o700)
    for target, (base, fmt, chain) in sorted(disks.items()):
        dst = disk_dir / f"{target}.{fmt}"
        bind_readonly(Path(base), dst)
        paths.append(dst)
        for depth, (image, image_fmt) in enumerate(chain, 1):
            dst = directory / backing_name(target, depth, image_fmt)
            bind_readonly(Path(image), dst)
            paths.append(dst)

    if memory_file is not None:
        dst = directory / "memory.save"
        bind_readonly(memory_file, dst)
        paths.append(dst)
    if nvram and os.path.exists(nvram):
        dst = directory / "nvram.fd"
        shutil.copyfile(nvram, dst)
        os.chmod(dst, 0o600)
        paths.append(dst)
    if tpm_dir is not None and tpm_dir.is_dir():
        dst = directory / "tpm"
        shutil.copytree(tpm_dir, dst, symlinks=True)
        paths.append(dst)

    manifest_path = directory / "manifest.json"
    manifest = dict(manifest, files=[str(p.relative_to(directory)) for p in paths])
    write_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())
    paths.append(manifest_path)
    write_atomic(directory / "paths.txt", "".join(f"{p}\n" for p in paths).encode())
    return paths


def write_index(export_root: Path) -> None:
    """The top-level paths.txt: every frozen domain's paths, for --paths-from-command/--files-from."""
    lines = []
    if export_root.is_dir():
        for sub in sorted(export_root.iterdir()):
            with contextlib.suppress(OSError):
                if sub.is_dir():
                    lines.append((sub / "paths.txt").read_text())
    export_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(export_root / "paths.txt", "".join(lines).encode())
