"""What is frozen right now: from the journal and from the definitions themselves."""

from __future__ import annotations

import os

from virtfreeze.libvirt_boundary import MISSING, PAUSED, RUNNING, SHUTOFF
from virtfreeze.model import DiskPlan
from virtfreeze.runtime import Runtime
from virtfreeze.thaw import discover, frozen_domains, on_overlay


def planned_strategy(rt: Runtime, name: str, state: str) -> tuple[str, str]:
    """The merge the next thaw will use for a domain, and why."""
    wanted = rt.config.effective(name)
    asked, source = wanted.strategy, wanted.sources["strategy"]
    if state in (SHUTOFF, MISSING):
        return "offline", f"the domain is {'gone' if state == MISSING else 'shut off'}: qemu-img commit"
    if state not in (RUNNING, PAUSED):
        return "none", f"the domain is {state}: start or destroy it first"
    if asked == "auto":
        return "live", f"auto ({source}): live commit; offline if libvirt refuses it"
    if asked == "iterative":
        return asked, f"{source} says iterative; last overlay: {rt.config.iterative_final_step} " \
                      f"({'guest saved' if rt.config.iterative_final_step == 'save' else 'guest paused'})"
    return asked, f"{source} says {asked}"


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
        journaled = rt.journal.load(ref.uuid)
        record = journaled or discover(rt, ref.uuid, ref.name) or {}
        disks = [DiskPlan.from_json(d) for d in record.get("disks", [])]
        pending = {d.target for d in on_overlay(rt, ref, disks)}
        state = rt.hv.state(ref.uuid)
        strategy, why = planned_strategy(rt, ref.name, state)
        out.append({
            "domain": ref.name,
            "uuid": ref.uuid,
            "state": state,
            "strategy": strategy,
            "strategy_reason": why,
            "phase": record.get("phase"),
            "since": record.get("frozen_at") or record.get("started"),
            "consistency": record.get("consistency"),
            "journal": journaled is not None,
            "on_overlay": bool(pending),
            "disks": [{"target": d.target, "base": d.base, "overlay": d.overlay,
                       "overlay_bytes": _size(d.overlay), "on_overlay": d.target in pending} for d in disks],
            "memory_file": record.get("memory_file"),
            "memory_bytes": _size(record.get("memory_file")),
            "export_dir": record.get("export_dir"),
        })
    return out
