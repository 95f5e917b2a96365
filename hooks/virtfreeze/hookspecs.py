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


@hookspec
def virtfreeze_configure(config, command):
    """A command is about to run with this configuration.

    Runs once per command that reads the configuration (``command`` is its
    name: ``freeze``, ``thaw``, ``backup``, ``verify``, ``restore``,
    ``check`` for both `check` and `config check`, ...), after the
    configuration was validated and before any domain is touched. Plugins
    take their own settings from ``config`` (a `Config`; e.g.
    ``config.metrics``, ``config.notify``). Not firstresult: every
    implementation runs; return None (return values are ignored). Raise
    `ConfigError` when the plugin's settings cannot work (a missing library,
    an unreadable file), before keeping any of them: ``freeze``, ``backup``,
    ``verify`` and ``check`` then stop before they change anything; every
    other command (``thaw`` above all) logs a warning and goes on without
    the plugin.
    """


@hookspec(firstresult=True)
def virtfreeze_merge(merge):
    """Merge a domain's overlays back into their recorded base images.

    Runs during `thaw` (and during `freeze` for leftovers of an earlier run)
    for a domain with at least one disk still on a virtfreeze overlay, with
    the domain's lock held and its journal record in phase ``thawing``.

    :param merge: a `virtfreeze.merge_api.DomainMerge`, the whole API a
        merge needs, bound to this domain: ``merge.domain``, ``merge.disks``
        (the `DiskPlan`s still on an overlay: target, base, overlay, ...),
        ``merge.config``, ``merge.strategy`` (``live``, ``iterative`` or
        ``offline``; ``auto`` is resolved by the caller: live first, offline
        when libvirt refuses the live commit), ``merge.record`` (the journal
        record), and methods to read the definitions, run and wait for block
        jobs, pause, save or start the guest, commit offline, re-point the
        definitions, ``note(...)`` marks into the journal *before* each
        mutating step, and ``merge_with(strategy)`` to hand disks on.

    firstresult: the first implementation that returns non-None handled the
    merge and returns a `virtfreeze.model.MergeResult`. Return None to leave
    the domain to the next implementation (not your strategy, or a domain
    state you do not handle). Raise `MergeRefused` when libvirt refused the
    merge before anything changed (the caller may fall back to another
    strategy); raise `VirtfreezeError` on any other failure, leaving every
    disk on a valid chain: the caller keeps the journal and exits 3. The
    caller checks the definitions afterwards and deletes the overlays only
    when no definition points at them. Built in: ``live_commit``,
    ``iterative_commit``, ``offline_commit`` (which also takes every
    shut-off or vanished domain; ``trylast``).
    """


@hookspec
def virtfreeze_merge_recover(merge):
    """Finish what an interrupted merge left: bring back a guest a merge stopped.

    Runs during every `thaw` of a domain that had a journal record, after
    the merges (also when nothing was left to merge: the thaw that follows
    a crash), with the domain's lock held. ``merge`` is the
    `virtfreeze.merge_api.DomainMerge`; ``merge.record`` holds the marks
    merges noted (``saved_by_virtfreeze``, a plugin's own ``plugin_marks``;
    a guest paused through ``merge.guest_paused()`` is resumed by the core
    before this hook runs). Each implementation looks at its own marks
    only, undoes what they say (e.g. start a guest it saved) and clears them
    with ``merge.note(...)``. Not firstresult: every
    implementation runs; return None (return values are ignored). Raise
    `VirtfreezeError` when the guest cannot be brought back: the thaw fails
    and keeps the journal.
    """


@hookspec(firstresult=True)
def virtfreeze_skip_domain(domain, state, config):
    """Decide whether a selected domain is left out of this run.

    Runs during `freeze` and `backup`, once per domain that the command line
    (names, globs, ``--all``) and the config's include/exclude selected,
    before anything is done to it. ``domain`` is a `DomainRef`, ``state``
    its state (``running``, ``paused``, ``shutoff``, ...), ``config`` the
    loaded `Config`.

    firstresult: the first implementation that returns a non-empty string
    leaves the domain out; the string is the reason, logged and reported.
    Return None to keep the domain (the next implementation is asked).
    """


@hookspec
def virtfreeze_before_freeze(domain, state, config):
    """A domain is about to be frozen.

    Runs once per domain, with its lock held, after leftovers of an earlier
    run were merged and before the journal or the snapshot is written, so
    nothing has changed yet. Not firstresult: every implementation runs;
    return None (return values are ignored). Raise `VirtfreezeError` to fail
    the freeze of this domain; it is left exactly as it was.
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


@hookspec
def virtfreeze_register_targets(register):
    """Register the storage target types this plugin provides.

    Called when the configuration is validated (`config check`, `backup`,
    restore) and by `virtfreeze plugins`. Call ``register(cls)`` once per
    type, with a subclass of `virtfreeze.targets.StorageTarget`: its
    ``type`` names it in the config, its ``schema`` validates the settings,
    and each configured target becomes one instance that archives
    (``archive``), lists what an archive holds (``contents``, checked after
    every archive), lists every virtfreeze archive it holds (``archives``,
    for `virtfreeze archives` and `restore`; ``list_archives`` is one
    domain's) and extracts one, whole or some paths (``extract``, for
    `restore`). Two plugins registering the same type is a
    configuration error. Not firstresult: every implementation runs; return
    None (return values are ignored).
    """


@hookspec
def virtfreeze_domain_failed(domain, phase, error):
    """Freezing, archiving or thawing one domain failed.

    Runs once per failure, after virtfreeze did what it could (a failed
    freeze is rolled back; a failed thaw keeps the journal), for alerting
    and metrics. ``phase`` is ``freeze``, ``archive``, ``thaw`` or ``verify``; ``error``
    the `VirtfreezeError` (its ``exit_code`` 3 means the domain is still on
    an overlay). Not firstresult: every implementation runs; return None
    (return values are ignored). An exception raised here is logged and
    does not change the outcome.
    """


@hookspec
def virtfreeze_domain_done(domain, step, result, command):
    """One step of one domain succeeded, for metrics and reports.

    Runs once per domain and step, after the step and with no lock held:
    ``step`` is ``freeze`` (``result`` a `virtfreeze.freeze.FreezeResult`),
    ``thaw`` (a `virtfreeze.thaw.ThawResult`; its ``strategy`` is None when
    nothing was merged, its ``held_by`` non-empty when another run still
    holds the freeze) or ``backup`` (a `virtfreeze.backup.BackupResult`,
    after the domain's thaw; ``result.ok`` is False when an archive failed,
    which `virtfreeze_domain_failed` reported already). ``command`` is the
    command running the step (``backup`` runs freeze and thaw steps too).
    ``result.to_json()`` is what ``--json`` prints for it. Not firstresult:
    every implementation runs; return None (return values are ignored). An
    exception raised here is logged and does not change the outcome.
    """


@hookspec
def virtfreeze_run_finished(command, report):
    """A command that freezes, thaws, backs up or verifies domains finished.

    Runs once, at the end of ``freeze``, ``thaw``, ``backup`` and ``verify``,
    before the command exits. ``report`` is the dict ``--json`` prints (its
    ``errors`` list, empty when every domain succeeded). Not firstresult:
    every implementation runs; return None (return values are ignored). An
    exception raised here is logged and does not change the outcome.
    """


@hookspec
def virtfreeze_verified(domain, result):
    """An archive of ``domain`` (its name) was verified: restored as a throwaway domain, it ran.

    Runs once per successful verify (`virtfreeze verify`, `backup --verify`),
    after the throwaway domain is gone, for metrics and reports; a failed
    verify calls `virtfreeze_domain_failed` with phase ``verify`` instead.
    ``result`` is the `virtfreeze.verify.VerifyResult` (``source``,
    ``how``, ``checks``, ``seconds``, ...). Not firstresult: every
    implementation runs; return None (return values are ignored).
    """
