"""Storage target plugin: a plain copy per domain and run, for hosts with
neither borg nor restic. Sparse files stay sparse; SHA256SUMS is written with
the copy and checked on extract. A copy appears under its final name only
once complete. An archive is data: regular files and directories; a copy
never follows a symlink, and an archive holding one is not extracted."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
from pathlib import Path

from virtfreeze.errors import VirtfreezeError
from virtfreeze.hookspecs import hookimpl
from virtfreeze.sparse_copy import copy_file
from virtfreeze.targets import (
    ArchiveInfo, ArchiveResult, StorageTarget, archive_name, parse_archive_name, progress_wanted, relative_paths,
    report_progress, tree_bytes,
)

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "description": "Directory that receives one sub-directory per domain and run.",
                 "example": "/srv/backup/vms"},
    },
}


def sparse_copy(src: Path, dst: Path, on_bytes=None) -> tuple[str, int]:
    """Copy a file sparsely (all-zero chunks become holes); return its sha256 and the bytes read
    (`on_bytes` is called with each chunk's). `src` is never followed when it is a symlink (O_NOFOLLOW)."""
    h = hashlib.sha256()
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # cancellable: e.g. an I/O-error pause
        size = copy_file(src, fo, what=f"copy of {src}", digest=h, on_bytes=on_bytes)
        os.fchmod(fo, stat.S_IMODE(os.lstat(src).st_mode))
    finally:
        os.close(fo)
    return h.hexdigest(), size


def _unreadable(e: OSError):
    raise VirtfreezeError(f"cannot read: {e.strerror}", path=e.filename)


def check_data_only(path: Path) -> None:
    """Raise unless `path` (not followed) is a regular file or a directory: a copy that followed a
    symlink would read whatever host file it names, and one of a device or pipe would read no data."""
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        raise VirtfreezeError("a symlink; refusing to copy it (a copy never follows one)", path=str(path),
                              hint="an archive holds regular files and directories only: remove the link")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise VirtfreezeError("neither a regular file nor a directory; refusing to copy it", path=str(path),
                              hint="an archive holds regular files and directories only")


def check_tree(top: Path) -> None:
    """`check_data_only` for everything in the tree `top` (to run before any of it is copied)."""
    for root, dirs, files in os.walk(top, onerror=_unreadable):
        for name in dirs + files:
            check_data_only(Path(root) / name)


def _read_sums(archive_dir: Path) -> dict[str, str]:
    """An archive's SHA256SUMS: relative path -> sha256."""
    sums_file = archive_dir / "SHA256SUMS"
    try:
        listed = sums_file.read_text().splitlines()
    except OSError as e:
        raise VirtfreezeError(f"cannot read the archive's checksums: {e.strerror}", path=str(sums_file),
                              hint="an archive without SHA256SUMS is not a finished one") from None
    sums = {}
    for line in listed:
        digest, sep, rel = line.partition("  ")
        if not sep:
            raise VirtfreezeError(f"malformed line in SHA256SUMS: {line[:80]!r}", path=str(sums_file))
        sums[rel.strip()] = digest
    return sums


def copy_tree(src: Path, dst: Path, on_bytes=None) -> tuple[int, dict[str, str]]:
    """Copy a tree of regular files and directories (anything else, a symlink above all, is an
    error: never followed); return the bytes actually read and each file's sha256 (by relative
    path). `on_bytes` is called with the bytes of each chunk read."""
    total, sums = 0, {}
    for root, dirs, files in os.walk(src, onerror=_unreadable):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in dirs:  # os.walk lists a symlink to a directory here, and would skip it silently
            check_data_only(Path(root) / name)
        for f in sorted(files):
            check_data_only(Path(root) / f)
            sums[str(rel / f)], size = sparse_copy(Path(root) / f, dst / rel / f, on_bytes)
            total += size
    return total, sums


class DirectoryTarget(StorageTarget):
    """A plain sparse copy per domain and run, with SHA256SUMS, under its final name only once complete."""

    type = "directory"
    schema = SCHEMA

    @property
    def root(self) -> Path:
        return Path(self.settings["path"])

    def _archive_dir(self, archive: str) -> Path:
        src = self.root / archive
        if "/" in archive or archive.startswith(".") or not src.is_dir():
            raise VirtfreezeError("no such archive", path=str(src))
        if src.is_symlink():
            raise VirtfreezeError("the archive is a symlink; refusing to read it", path=str(src),
                                  hint="an archive is a directory of its own in the target")
        return src

    def archive(self, domain, export_dir, manifest):
        if not self.root.is_dir():
            raise VirtfreezeError("target directory does not exist", path=str(self.root), hint="create it first")
        name = archive_name(domain.name)
        taken = 1
        while (self.root / name).exists():  # two runs in the same second: the name has whole seconds
            taken += 1
            name = f"{archive_name(domain.name)}.{taken}"
        partial = self.root / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        t0 = time.monotonic()
        done, whole = [0], tree_bytes(Path(export_dir)) if progress_wanted() else None

        def on_bytes(n: int) -> None:
            done[0] += n
            report_progress(done[0], whole)

        total, sums = copy_tree(Path(export_dir), partial, on_bytes if progress_wanted() else None)
        (partial / "SHA256SUMS").write_text("".join(f"{h}  {p}\n" for p, h in sorted(sums.items())))
        os.rename(partial, self.root / name)
        return ArchiveResult(self.name, name, total, time.monotonic() - t0)

    def archives(self):
        if not self.root.is_dir():
            raise VirtfreezeError("target directory does not exist", path=str(self.root),
                                  hint="check the target's path")
        rows = []
        for entry in os.scandir(self.root):
            parsed = parse_archive_name(entry.name)
            # not: unfinished copies (.<name>.partial), symlinks (see _archive_dir), anything else
            if entry.name.startswith(".") or parsed is None or not entry.is_dir(follow_symlinks=False):
                continue
            domain, made, n = parsed
            size = sum(self.contents(entry.name).values())
            rows.append(((made, n), ArchiveInfo(self.name, entry.name, domain, made, size)))
        return [info for _key, info in sorted(rows, key=lambda row: row[0])]

    def contents(self, archive):
        src = self._archive_dir(archive)
        out = {}
        for root, _dirs, files in os.walk(src):
            for f in files:
                p = Path(root) / f
                rel = str(p.relative_to(src))
                if rel != "SHA256SUMS":
                    out[rel] = os.lstat(p).st_size if p.is_file() and not p.is_symlink() else 0
        return out

    def extract(self, archive, destination, paths=None):
        wanted = None if paths is None else relative_paths(paths)
        src = self._archive_dir(archive)
        check_tree(src)  # before anything is copied
        want = _read_sums(src)
        destination = Path(destination)
        destination.mkdir(mode=0o700)
        if wanted is None:
            _total, sums = copy_tree(src, destination)
            sums.pop("SHA256SUMS", None)
            os.unlink(destination / "SHA256SUMS")
        else:
            sums = {}
            for rel in wanted:
                if rel == "SHA256SUMS" or not os.path.lexists(src / rel):  # not of the export view; absent
                    continue
                if (src / rel).is_dir():
                    _total, got = copy_tree(src / rel, destination / rel)
                    sums.update({f"{rel}/{p}": h for p, h in got.items()})
                else:
                    (destination / rel).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                    sums[rel], _size = sparse_copy(src / rel, destination / rel)
        chosen = [p for p in want if wanted is None or any(p == w or p.startswith(f"{w}/") for w in wanted)]
        bad = sorted(p for p in chosen if sums.get(p) != want[p])
        if bad:
            raise VirtfreezeError(f"checksum mismatch in {', '.join(bad)}", path=str(src))
        return destination

    def in_place(self, archive):
        """The archive's own directory, once every file matches SHA256SUMS (read, not copied)."""
        src = self._archive_dir(archive)
        check_tree(src)
        bad = []
        for rel, digest in _read_sums(src).items():
            [rel] = relative_paths([rel])  # inside the archive, or refused
            with os.fdopen(os.open(src / rel, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fh:
                if hashlib.file_digest(fh, "sha256").hexdigest() != digest:
                    bad.append(rel)
        if bad:
            raise VirtfreezeError(f"checksum mismatch in {', '.join(sorted(bad))}", path=str(src))
        return src


@hookimpl
def virtfreeze_register_targets(register):
    register(DirectoryTarget)
