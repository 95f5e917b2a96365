"""Storage target plugin: one restic snapshot per domain and run.

Tagged `virtfreeze` and `domain=<name>`, with the host name; works with
Debian 12's restic 0.14. The password reaches restic through its
environment, never its command line.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from virtfreeze import runner
from virtfreeze.errors import VirtfreezeError
from virtfreeze.hookspecs import hookimpl
from virtfreeze.targets import ArchiveResult, StorageTarget, secret_env, secret_settings

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
                         "backup")
        summary = [json.loads(line) for line in proc.stdout.splitlines() if '"summary"' in line][-1]
        return ArchiveResult(self.name, summary["snapshot_id"][:8], summary["total_bytes_processed"],
                             time.monotonic() - t0)

    def list_archives(self, domain):
        out = self._run(["snapshots", "--json", "--tag", f"domain={domain.name}"], "snapshots").stdout
        return [s["short_id"] for s in sorted(json.loads(out) or [], key=lambda s: s["time"])]

    def contents(self, archive):
        out = self._run(["ls", "--json", archive], "ls").stdout
        nodes = [n for n in map(json.loads, filter(str.strip, out.splitlines())) if n.get("struct_type") == "node"]
        manifest = next((n["path"] for n in nodes if n.get("name") == "manifest.json" and n.get("type") == "file"),
                        None)
        if manifest is None:
            raise VirtfreezeError("snapshot holds no manifest.json; not a virtfreeze snapshot", path=archive)
        root = manifest[: -len("manifest.json")]  # restic keeps absolute paths: relative to the export directory
        return {n["path"][len(root):]: (n.get("size") or 0) if n.get("type") == "file" else 0
                for n in nodes if n["path"].startswith(root) and n.get("type") != "dir"}

    def extract(self, archive, destination):
        destination = Path(destination)
        destination.mkdir(mode=0o700)
        staging = destination / ".restic-restore"
        self._run(["restore", archive, "--target", str(staging)], "restore")
        manifest = next(staging.rglob("manifest.json"), None)
        if manifest is None:
            raise VirtfreezeError("snapshot holds no manifest.json; not a virtfreeze snapshot", path=archive)
        for item in manifest.parent.iterdir():  # lay it out as the export view was
            item.rename(destination / item.name)
        shutil.rmtree(staging)
        return destination


@hookimpl
def virtfreeze_register_targets(register):
    register(ResticTarget)
