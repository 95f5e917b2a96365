"""What is frozen right now: from the journal and from the definitions themselves."""

from __future__ import annotations

import os

from virtfreeze.libvirt_boundary import MISSING, PAUSED, RUNNING, SHUTOFF
from virtfreeze import holders
from virtfreeze.merge_api import read_definitions
from virtfreeze.runtime import Runtime
from virtfreeze.thaw import discover, frozen_domains


def planned_strategy(rt: Runtime, name: str, state: str) -> tuple[str, str]:
    """The merge the next thaw will use for a domain, and why."""
    wanted = rt.config.effective(name)
    asked, source = wanted.strategy, wanted.sources["strategy"]
    if state in (SHUTOFF, MISSING):
        return "offline", f"the domain is {'gone' if state == MISSING else 'shut off'}: qemu-img commit"
    if state not in (RUNNING, PAUSED):
        return "none", f"the domain is {state}: start or destroy it first"
    if asked == "auto":
        return "live", (f"auto ({source}): live commit; the rest with the guest paused if it has not caught up "
                        f"in {rt.config.live_converge_timeout:g}s; offline if libvirt refuses it")
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
    for found in frozen_domains(rt):
        if names and found.name not in names:
            continue
        journaled = found.phase != "discovered"
        defs = read_definitions(rt.hv, found.ref)
        record = found if journaled else (discover(rt, found.ref, defs) or found)
        # Not in this journal: another config's may hold it (its state directory, and its holders).
        elsewhere = None if journaled else rt.journal.elsewhere(found.uuid)
        held = record.holders if elsewhere is None else elsewhere[1].holders
        pending = {d.target for d in defs.on_overlay(record.disks)}
        strategy, why = planned_strategy(rt, record.name, defs.state)
        out.append({
            "domain": record.name,
            "uuid": record.uuid,
            "state": "paused (I/O error)" if defs.io_error else defs.state,
            "strategy": strategy,
            "strategy_reason": why,
            "phase": record.phase,
            "since": record.frozen_at or record.started,
            "consistency": record.consistency,
            "journal": journaled,
            "journal_elsewhere": str(elsewhere[0]) if elsewhere else None,
            "on_overlay": bool(pending),
            "disks": [{"target": d.target, "base": d.base, "overlay": d.overlay,
                       "overlay_bytes": _size(d.overlay), "on_overlay": d.target in pending} for d in record.disks],
            "memory_file": record.memory_file,
            "memory_bytes": _size(record.memory_file),
            "export_dir": record.export_dir,
            "holders": [dict(h.to_json(), alive=holders.alive(h)) for h in held],
        })
    return out
