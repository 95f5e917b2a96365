"""Which domains a command works on: names, globs, --all, and config include/exclude."""

from __future__ import annotations

import fnmatch
import logging

from virtfreeze.config import Config
from virtfreeze.errors import DomainNotFound, UsageError
from virtfreeze.libvirt_boundary import DomainInfo
from virtfreeze.model import DomainRef
from virtfreeze.logs import domain_log

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


def select(domains: list[DomainInfo], patterns: list[str], all_: bool, config: Config) -> list[DomainInfo]:
    """Resolve patterns against the host's domains.

    An exact name always selects that domain. Globs, `--all` and the config's
    `include` never select a domain matched by `exclude`. A name or glob that
    matches nothing is an error, so a typo never silently backs up nothing.
    """
    if all_ and patterns:
        raise UsageError("give domain names or --all, not both")
    by_name = {d.name: d for d in domains}

    def excluded(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, e) for e in config.exclude)

    if all_:
        return [d for d in sorted(domains, key=lambda d: d.name) if not excluded(d.name)]
    from_config = not patterns
    patterns = patterns or config.include
    if not patterns:
        raise UsageError("no domain selected", hint="name domains or globs, use --all, or set include in the config")
    chosen: dict[str, DomainInfo] = {}
    for pat in patterns:
        if pat in by_name:
            if not (from_config and excluded(pat)):
                chosen[pat] = by_name[pat]
            continue
        if not _GLOB_CHARS & set(pat):
            raise DomainNotFound("no such domain", domain=pat, hint="`virsh list --all` shows the domains")
        matches = [d for d in domains if fnmatch.fnmatchcase(d.name, pat) and not excluded(d.name)]
        if not matches:
            raise DomainNotFound(f"no domain matches the glob {pat!r}", hint="`virsh list --all` shows the domains")
        for d in matches:
            chosen[d.name] = d
    return sorted(chosen.values(), key=lambda d: d.name)


def ask_plugins(pm, domains: list[DomainInfo], config: Config) -> tuple[list[DomainInfo], dict[str, str]]:
    """Let the virtfreeze_skip_domain hook leave selected domains out; returns (kept, {name: reason})."""
    kept, skipped = [], {}
    for d in domains:
        reason = pm.hook.virtfreeze_skip_domain(domain=DomainRef(d.name, d.uuid), state=d.state, config=config)
        if reason:
            skipped[d.name] = str(reason)
            domain_log(log, d.name).warning("left out by a plugin: %s", reason)
        else:
            kept.append(d)
    return kept, skipped
