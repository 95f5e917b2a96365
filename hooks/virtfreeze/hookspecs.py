"""The virtfreeze lifecycle as pluggy hooks.

Every hook is called with keyword arguments. Built-in behaviour is itself a
plugin (the live and offline merges), registered under its name by
`virtfreeze.plugins`; third-party plugins come from the `virtfreeze`
entry-point group.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("virtfreeze")
hookimpl = pluggy.HookimplMarker("virtfreeze")


@hookspec(firstresult=True)
def virtfreeze_merge(hv, domain, disks, config):
    """Merge a domain's overlays back into their recorded base images.

    Runs during `thaw` (and during `freeze` for leftovers of an earlier run)
    for a domain with at least one disk still on a virtfreeze overlay, with
    the domain's lock held and its journal in phase ``thawing``.

    :param hv: the `virtfreeze.libvirt_boundary.Hypervisor` connection.
    :param domain: `virtfreeze.model.DomainRef` of the domain.
    :param disks: list of `virtfreeze.model.DiskPlan` still on their overlays.
    :param config: the loaded `virtfreeze.config.Config`.

    firstresult: the first implementation that returns non-None handled the
    merge, and its return value names the strategy used (e.g. ``"live"``).
    Return None to leave the domain to the next implementation (for example
    because it is not running). On failure raise `VirtfreezeError`, leaving
    every disk on a valid chain: the caller keeps the journal and exits 3.
    Built in: ``live_commit`` (running or paused domains) and
    ``offline_commit`` (shut-off or vanished domains, ``trylast``).
    """


@hookspec
def virtfreeze_after_freeze(domain, manifest):
    """A domain is frozen and its export view is complete.

    Runs once per domain, after the journal says ``frozen`` and before the
    backup tool reads the view. ``manifest`` is the dict written to
    manifest.json. Not firstresult: every implementation runs; return None
    (return values are ignored). Raising fails the freeze of this domain,
    which is then rolled back.
    """


@hookspec
def virtfreeze_after_thaw(domain, strategy, overlay_bytes):
    """A domain is back on its base images; overlays and export view are gone.

    ``strategy`` names the merge used (None when there was nothing to merge),
    ``overlay_bytes`` the size of the overlays merged. Not firstresult:
    every implementation runs; return None (return values are ignored).
    """
