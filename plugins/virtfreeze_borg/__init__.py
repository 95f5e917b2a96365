"""Storage target plugin: one borg archive per domain and run.

The archive holds the export view's layout (domain.xml, disks/, manifest.json,
...) with paths relative to the domain's export directory; its comment holds
the manifest's summary. The passphrase comes from a file, a variable or a
command and reaches borg through its environment, never its command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime, timezone

from virtfreeze import runner
from virtfreeze.hookspecs import hookimpl
from virtfreeze.targets import (
    ArchiveInfo, ArchiveResult, StorageTarget, archive_name, parse_archive_name, progress_wanted, relative_paths,
    report_progress, secret_env, secret_settings, tree_bytes, utc_time,
)

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["repository"],
    "properties": {
        "repository": {"type": "string", "description": "The borg repository.", "example": "/var/backups/vms.borg"},
        "compression": {"type": "string", "description": "borg --compression.", "example": "zstd,3"},
        "extra_args": {"type": "array", "items": {"type": "string"},
                       "description": "More arguments for borg create.", "example": ["--upload-ratelimit", "50000"]},
        **secret_settings("passphrase", "/etc/virtfreeze/borg.pass", "VMS_BORG_PASSPHRASE", ["pass", "show", "borg/vms"]),
        "borg": {"type": "string", "description": "The borg program.", "example": "/usr/bin/borg"},
        "lock_wait": {"type": "integer", "minimum": 0,
                      "description": "Seconds each borg command waits for the repository's lock (borg --lock-wait; "
                                     "borg's own default is 1). Another domain's archive into the same "
                                     "repository holds it (backup --jobs 2 or more: they take turns), and so "
                                     "does any other borg using it (a prune, borgmatic). Default 3600.",
                      "example": 3600},
    },
}

LOCK_WAIT = 3600  # seconds: another domain's whole archive may be ahead in the queue


# `--log-json` lines that are not messages for a person (the rest, e.g. log_message, carry "message")
_NOT_MESSAGES = {"archive_progress", "progress_message", "progress_percent", "file_status"}


def _json_line(line: str) -> dict | None:
    if not line.startswith("{"):
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def progress_bytes(line: str) -> int | None:
    """The bytes read so far, from one stderr line of `borg create --progress --log-json`
    (an unfinished "archive_progress" record's original_size); None for any other line."""
    rec = _json_line(line)
    if rec is None or rec.get("type") != "archive_progress" or rec.get("finished"):
        return None
    size = rec.get("original_size")
    return size if isinstance(size, int) else None


def log_text(stderr: str) -> str:
    """borg's stderr as a person reads it: with --log-json, each message record becomes its message and
    progress records go; any other line stays as it is."""
    out = []
    for line in stderr.splitlines():
        rec = _json_line(line)
        if rec is None:
            out.append(line)
        elif rec.get("type") not in _NOT_MESSAGES and isinstance(rec.get("message"), str):
            out.append(rec["message"])
    return "\n".join(out)


class BorgTarget(StorageTarget):
    """One borg archive per domain and run, made inside the domain's export directory."""

    type = "borg"
    schema = SCHEMA

    def _run(self, args: list[str], what: str, *, extra_env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        s = self.settings
        env = dict(os.environ, BORG_EXIT_CODES="legacy", **secret_env(s, "passphrase", "BORG_PASSPHRASE"),
                   **(extra_env or {}))
        # exit 1: warnings (e.g. a file changed while read)
        return runner.run([s.get("borg", "borg"), "--lock-wait", str(s.get("lock_wait", LOCK_WAIT)), *args],
                          what=f"borg {what}", path=s["repository"], env=env, ok=(0, 1), stderr_text=log_text, **kw)

    def archive(self, domain, export_dir, manifest):
        s = self.settings
        name = archive_name(domain.name)
        comment = json.dumps({k: manifest.get(k) for k in ("domain", "uuid", "frozen_at", "consistency")})
        comment = comment.replace("{", "{{").replace("}", "}}")  # borg expands {placeholders} in comments
        args = ["create", "--json", "--comment", comment]
        follow = {}
        if progress_wanted():  # someone shows it: progress records on stderr (--json's result stays on stdout)
            args[2:2] = ["--progress", "--log-json"]
            total = tree_bytes(export_dir)

            def on_line(line: str) -> None:
                done = progress_bytes(line)
                if done is not None:
                    report_progress(done, total)

            follow = {"on_line": on_line, "stream": "stderr"}
        if s.get("compression"):
            args += ["--compression", s["compression"]]
        args += [*s.get("extra_args", []), f"{s['repository']}::{name}", "."]
        t0 = time.monotonic()
        # A segmented disk is read only where it changed when borg's files cache remembers its segments:
        # one cache per domain, so that the other domains' runs never age its entries out (TTL 20).
        segmented = any(d.get("layout") == "segmented" for d in manifest.get("disks", {}).values())
        extra_env = {"BORG_FILES_CACHE_SUFFIX": f"virtfreeze-{manifest['uuid']}"} if segmented else None
        proc = self._run(args, "create", cwd=export_dir, extra_env=extra_env, **follow)
        stats = json.loads(proc.stdout)["archive"]["stats"]
        return ArchiveResult(self.name, name, stats["original_size"], time.monotonic() - t0)

    def archives(self):
        listed = json.loads(self._run(["list", "--json", self.settings["repository"]], "list").stdout)["archives"]
        rows = []
        for a in listed:
            parsed = parse_archive_name(a["name"])
            if parsed is None:  # another tool's archive in the same repository
                continue
            domain, _named, n = parsed
            made = datetime.fromisoformat(a["time"]).astimezone(timezone.utc)  # borg gives local time, no zone
            rows.append(((made, n), ArchiveInfo(self.name, a["name"], domain, utc_time(made))))
        return [info for _key, info in sorted(rows, key=lambda row: row[0])]

    def contents(self, archive):
        out = self._run(["list", "--json-lines", f"{self.settings['repository']}::{archive}"], "list").stdout
        items = [json.loads(line) for line in out.splitlines() if line.strip()]
        # Paths are relative to the export directory (create ran there on "."); device nodes have size 0.
        return {i["path"]: (i.get("size") or 0) if i.get("type") == "-" else 0 for i in items
                if i.get("type") != "d"}

    def extract(self, archive, destination, paths=None):
        wanted = None if paths is None else relative_paths(paths)
        os.makedirs(destination, mode=0o700)
        if wanted == []:
            return destination  # no PATH would be the whole archive
        # "pp:": each a path (and what is under it), never read as a pattern; one never matched is a warning
        self._run(["extract", "--sparse", f"{self.settings['repository']}::{archive}",
                   *(f"pp:{p}" for p in wanted or [])], "extract",
                  cwd=destination)  # borg never writes outside the working directory
        return destination


@hookimpl
def virtfreeze_register_targets(register):
    register(BorgTarget)
