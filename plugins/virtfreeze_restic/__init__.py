"""Storage target plugin: one restic snapshot per domain and run.

Tagged `virtfreeze` and `domain=<name>`, with the host name; works with
Debian 12's restic 0.14. The password reaches restic through its
environment, never its command line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import time
from datetime import datetime
from pathlib import Path

from virtfreeze import runner
from virtfreeze.errors import VirtfreezeError
from virtfreeze.hookspecs import hookimpl
from virtfreeze.targets import (
    ArchiveInfo, ArchiveResult, StorageTarget, progress_wanted, relative_paths, report_progress, secret_env,
    secret_settings, utc_time,
)

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["repository"],
    "properties": {
        "repository": {"type": "string", "description": "The restic repository.", "example": "/var/backups/vms.restic"},
        "extra_args": {"type": "array", "items": {"type": "string"},
                       "description": "More arguments for restic backup.", "example": ["--limit-upload", "5000"]},
        **secret_settings("password", "/etc/virtfreeze/restic.pass", "VMS_RESTIC_PASSWORD", ["pass", "show", "restic/vms"]),
        "restic": {"type": "string", "description": "The restic program.", "example": "/usr/bin/restic"},
    },
}


def status_progress(line: str) -> tuple[int, int | None] | None:
    """(bytes done, total bytes or None while restic still counts) from one stdout line of
    `restic backup --json` (a "status" message); None for any other line."""
    if '"status"' not in line:
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or rec.get("message_type") != "status":
        return None
    done, total = rec.get("bytes_done", 0), rec.get("total_bytes")  # bytes_done is left out while 0
    if not isinstance(done, int):
        return None
    return done, (total if isinstance(total, int) else None)


def _report_status(line: str) -> None:
    status = status_progress(line)
    if status is not None:
        report_progress(*status)


class ResticTarget(StorageTarget):
    """One restic snapshot per domain and run, tagged `virtfreeze` and `domain=<name>`."""

    type = "restic"
    schema = SCHEMA

    def _run(self, args: list[str], what: str, **kw) -> subprocess.CompletedProcess:
        s = self.settings
        env = dict(os.environ, RESTIC_REPOSITORY=s["repository"], **secret_env(s, "password", "RESTIC_PASSWORD"))
        return runner.run([s.get("restic", "restic"), *args], what=f"restic {what}", path=s["repository"], env=env,
                          **kw)

    def archive(self, domain, export_dir, manifest):
        t0 = time.monotonic()
        proc = self._run(["backup", "--json", "--tag", "virtfreeze", "--tag", f"domain={domain.name}",
                          "--host", socket.gethostname(), *self.settings.get("extra_args", []), str(export_dir)],
                         "backup", **({"on_line": _report_status} if progress_wanted() else {}))
        summary = [json.loads(line) for line in proc.stdout.splitlines() if '"summary"' in line][-1]
        return ArchiveResult(self.name, summary["snapshot_id"][:8], summary["total_bytes_processed"],
                             time.monotonic() - t0)

    def archives(self):
        out = self._run(["snapshots", "--json", "--tag", "virtfreeze"], "snapshots").stdout
        rows = []
        for snap in json.loads(out) or []:
            domain = next((t[len("domain="):] for t in snap.get("tags") or [] if t.startswith("domain=")), None)
            if domain is None:  # tagged by hand, not made by virtfreeze
                continue
            made = datetime.fromisoformat(snap["time"])  # with its zone; nanoseconds are cut to micro
            rows.append((made, ArchiveInfo(self.name, snap["short_id"], domain, utc_time(made))))
        return [info for _made, info in sorted(rows, key=lambda row: row[0])]

    def _listing(self, archive: str) -> tuple[str, list[dict]]:
        """The export directory's absolute path in the snapshot (ending in '/'; restic keeps absolute
        paths), found by its manifest.json, and the snapshot's nodes."""
        out = self._run(["ls", "--json", archive], "ls").stdout
        nodes = [n for n in map(json.loads, filter(str.strip, out.splitlines())) if n.get("struct_type") == "node"]
        manifests = [n["path"] for n in nodes if n.get("name") == "manifest.json" and n.get("type") == "file"]
        if not manifests:
            raise VirtfreezeError("snapshot holds no manifest.json; not a virtfreeze snapshot", path=archive)
        manifest = min(manifests, key=lambda p: p.count("/"))  # the export root's, not one deeper down
        return manifest[: -len("manifest.json")], nodes

    def contents(self, archive):
        root, nodes = self._listing(archive)
        return {n["path"][len(root):]: (n.get("size") or 0) if n.get("type") == "file" else 0
                for n in nodes if n["path"].startswith(root) and n.get("type") != "dir"}

    def _supports_sparse(self) -> bool:
        """`restore --sparse` exists since restic 0.15 (Debian 12 ships 0.14)."""
        out = runner.run([self.settings.get("restic", "restic"), "version"], what="restic version").stdout
        m = _VERSION_RE.search(out or "")
        return bool(m) and (int(m.group(1)), int(m.group(2))) >= (0, 15)

    def extract(self, archive, destination, paths=None):
        wanted = None if paths is None else relative_paths(paths)
        root, nodes = self._listing(archive)
        destination = Path(destination)
        destination.mkdir(mode=0o700)
        staging = destination / ".restic-restore"
        includes = []
        if wanted is not None:
            # Only paths the snapshot holds, each under the export root, as a pattern that matches just
            # itself (and what is under it); with none left, there is nothing to restore.
            held = {n["path"] for n in nodes}
            includes = [arg for p in wanted if root + p in held for arg in ("--include", glob_escape(root + p))]
            if not includes:
                return destination
        sparse = self._supports_sparse()
        self._run(["restore", archive, "--target", str(staging), *includes, *(["--sparse"] if sparse else [])],
                  "restore")
        restored = staging / root.lstrip("/")
        if not sparse:  # restic < 0.15 writes holes as zeros: punch them again, in place (no copy)
            for image in (p for p in restored.rglob("*")  # regular files only: never through a symlink
                          if stat.S_ISREG(p.lstat().st_mode) and p.lstat().st_size >= 1 << 20):
                runner.run(["fallocate", "--dig-holes", str(image)], what="fallocate --dig-holes",
                           path=str(image), install_hint="install util-linux")
        for item in restored.iterdir() if restored.is_dir() else ():  # lay it out as the export view was
            item.rename(destination / item.name)
        shutil.rmtree(staging)
        return destination


_VERSION_RE = re.compile(r"restic (\d+)\.(\d+)")


def glob_escape(path: str) -> str:
    """`path` as a restic pattern that matches only itself: its wildcard characters escaped."""
    return re.sub(r"([\\*?\[])", r"\\\1", path)


@hookimpl
def virtfreeze_register_targets(register):
    register(ResticTarget)
