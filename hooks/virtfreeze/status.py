"""What is frozen right now: from the journal and from the definitions themselves."""

from __future__ import annotations

import os

from virtfreeze.runtime import Runtime
from virtfreeze.thaw import discover, frozen_domains, on_overlay
from virtfreeze.model import DiskPlan


def _size(path: str | None) -> int | None:
    try:
        return os.stat(path).st_size if path else None
    except OSError:
        return None


def collect(rt: Runtime, names: list[str] | None = None) -> list[dict]:
    """One row per frozen domain (only those named, when names are given)."""
    out = []
    for ref in frozen_domains(rt):
        if names and ref.name not in names:
            continue
        record = rt.journal.load(ref.uuid) or discover(rt, ref.uuid, ref.name) or {}
        disks = [DiskPlan.from_json(d) for d in record.get("disks", [])]
        pending = {d.target for d in on_overlay(rt, ref, disks)}
        out.append({
            "domain": ref.name,
            "uuid": ref.uuid,
            "state": rt.hv.state(ref.uuid),
            "phase": record.get("phase"),
            "since": record.get("frozen_at") or record.get("started"),
            "consistency": record.get("consistency"),
            "journal": rt.journal.load(ref.uuid) is not None,
            "on_overlay": bool(pending),
            "disks": [{"target": d.target, "base": d.base, "overlay": d.overlay,
                       "overlay_bytes": _size(d.overlay), "on_overlay": d.target in pending} for d in disks],
            "memory_file": record.get("memory_file"),
            "memory_bytes": _size(record.get("memory_file")),
            "export_dir": record.get("export_dir"),
        })
    return out
