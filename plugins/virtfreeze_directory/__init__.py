"""Storage target plugin: a plain copy per domain and run, for hosts with
neither borg nor restic. Sparse files stay sparse; SHA256SUMS is written with
the copy and checked on extract. A copy appears under its final name only
once complete."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from virtfreeze import runner
from virtfreeze.errors import VirtfreezeError
from virtfreeze.hookspecs import hookimpl
from virtfreeze.targets import ArchiveResult, StorageTarget, archive_name, archive_prefix

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "description": "Directory that receives one sub-directory per domain and run.",
                 "example": "/srv/backup/vms"},
    },
}
CHUNK = 1 << 20


def sparse_copy(src: Path, dst: Path) -> tuple[str, int]:
    """Copy a file, seeking over all-zero chunks; return its sha256 and the bytes read."""
    h = hashlib.sha256()
    zero = bytes(CHUNK)
    size = 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(CHUNK):
            runner.check_cancelled(f"copy of {src}")  # e.g. the domain paused on an I/O error
            h.update(chunk)
            size += len(chunk)
            if chunk == zero[: len(chunk)]:
                fo.seek(len(chunk), os.SEEK_CUR)
            else:
                fo.write(chunk)
        fo.truncate()
        fo.flush()
        os.fsync(fo.fileno())
    shutil.copymode(src, dst)
    return h.hexdigest(), size


def copy_tree(src: Path, dst: Path) -> tuple[int, dict[str, str]]:
    """Copy a tree; return the bytes actually read and each file's sha256 (by relative path)."""
    total, sums = 0, {}
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True, mode=0o700)
        for f in sorted(files):
            sums[str(rel / f)], size = sparse_copy(Path(root) / f, dst / rel / f)
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
        total, sums = copy_tree(Path(export_dir), partial)
        (partial / "SHA256SUMS").write_text("".join(f"{h}  {p}\n" for p, h in sorted(sums.items())))
        os.rename(partial, self.root / name)
        return ArchiveResult(self.name, name, total, time.monotonic() - t0)

    def list_archives(self, domain):
        prefix = archive_prefix(domain.name)
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name.startswith(prefix))

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

    def extract(self, archive, destination):
        src = self._archive_dir(archive)
        want = dict(line.split("  ", 1)[::-1] for line in (src / "SHA256SUMS").read_text().splitlines())
        want = {k.strip(): v for k, v in want.items()}
        Path(destination).mkdir(mode=0o700)
        _total, sums = copy_tree(src, Path(destination))
        sums.pop("SHA256SUMS", None)
        os.unlink(Path(destination) / "SHA256SUMS")
        bad = sorted(p for p in want if sums.get(p) != want[p])
        if bad:
            raise VirtfreezeError(f"checksum mismatch in {', '.join(bad)}", path=str(src))
        return destination


@hookimpl
def virtfreeze_register_targets(register):
    register(DirectoryTarget)
