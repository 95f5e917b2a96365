"""Command line: the only place that prints results and chooses exit codes."""

from __future__ import annotations

import contextlib
import errno as errno_mod
import json
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from virtfreeze import __version__, config as config_mod, errors
from virtfreeze.errors import VirtfreezeError
from virtfreeze.progress import SILENT, Progress
from virtfreeze.signals import signals_to_main_thread, stop_gracefully, stopping
from virtfreeze.thread_names import name_this_thread
from virtfreeze.logs import context_of, domain_log

log = logging.getLogger("virtfreeze")

# When several domains fail differently, the exit code tells the worst.
_SEVERITY = [errors.EXIT_ON_OVERLAY, errors.EXIT_FAILED, errors.EXIT_BUSY, errors.EXIT_CONNECT, errors.EXIT_USAGE]

EXIT_CODES_HELP = """\b
Exit codes:
  0  ok
  1  failed, nothing left frozen
  2  usage or configuration error (unknown domain, bad config, missing directory)
  3  a VM is still on an overlay (merge incomplete; state kept; run thaw again)
  4  another virtfreeze run is working on the domain
  5  libvirt could not be reached or refused this user
  behind-guests: its command's (128+N: signal N), else as env(1): 127 not found,
  126 not executable, 125 virtfreeze itself failed; 2 a bad config
"""


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"virtfreeze: {record.levelname.lower()}: {context_of(record)}{record.getMessage()}"
        if record.exc_info:  # only debug records carry one (-v)
            text += "\n" + self.formatException(record.exc_info)
        return text


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time: the progress display puts its proxy there,
    which prints log lines above the progress lines instead of through them."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class TerminalProgress(Progress):
    """The one progress display of a command: a line per domain on stderr, updated in place.

    Only on a terminal (see `_progress_display`). Refreshed by the callers'
    updates, not by a thread of its own: no thread the stop signals could
    be delivered to.
    """

    live = True  # archives report the bytes they read (see targets.report_progress)

    def __init__(self):
        from rich.console import Console
        from rich.live import Live

        self._lines: dict[str, str] = {}
        self._lock = threading.Lock()
        self._live = Live(self._render(), console=Console(file=sys.stderr), auto_refresh=False, transient=True,
                          redirect_stdout=False, redirect_stderr=True)

    def _render(self):
        from rich.console import Group
        from rich.text import Text

        width = max((len(d) for d in self._lines), default=0)
        return Group(*(Text(f"{d.ljust(width)}  {t}", no_wrap=True, overflow="ellipsis")
                       for d, t in sorted(self._lines.items())))

    def update(self, domain: str, text: str) -> None:
        with self._lock:
            self._lines[domain] = text
            self._live.update(self._render(), refresh=True)

    def finish(self, domain: str) -> None:
        with self._lock:
            if self._lines.pop(domain, None) is not None:
                self._live.update(self._render(), refresh=True)

    def __enter__(self):
        self._live.start()
        return self

    def __exit__(self, *exc):
        self._live.stop()


@contextlib.contextmanager
def _progress_display(ctx: "Ctx", rt):
    """Show progress while the block runs, when stderr is a terminal and -q was not given."""
    if ctx.quiet or not sys.stderr.isatty():
        yield
        return
    with TerminalProgress() as display:
        rt.progress = display
        try:
            yield
        finally:
            rt.progress = SILENT


def _setup_logging(verbose: int, quiet: bool) -> None:
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    root = logging.getLogger("virtfreeze")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def _fail(err: VirtfreezeError) -> None:
    click.echo(f"virtfreeze: error: {err}", err=True)


def _worst(codes: list[int]) -> int:
    for code in _SEVERITY:
        if code in codes:
            return code
    return errors.EXIT_OK


class Ctx:
    def __init__(self, connect: str | None, config_path: Path | None, as_json: bool, verbose: int, quiet: bool):
        self.connect = connect
        self.config_path = config_path
        self.as_json = as_json
        self.verbose = verbose
        self.quiet = quiet
        self._rt = None
        self.read_only = False  # `check`: not even a killed verify's leftovers are removed
        _setup_logging(verbose, quiet)

    @property
    def rt(self):
        if self._rt is None:
            from virtfreeze.plugins import configure
            from virtfreeze.runtime import Runtime

            cfg = config_mod.load(self.config_path)
            command = click.get_current_context().info_name
            self._rt = Runtime(cfg, cfg.uri(self.connect), command=command)
            configure(self._rt.pm, cfg, command)  # may refuse a backup: nothing changed yet
            if not self.read_only:
                from virtfreeze.verify import clean_leftovers

                clean_leftovers(self._rt)  # what a killed verify left: no throwaway domain outlives its run
        return self._rt


def _run_guarded(fn, mutates: bool = False, ctx: Ctx | None = None):
    """Turn errors into one line on stderr and their exit code; never a traceback.

    A bug (any other exception) in a command that changes domains exits 3:
    its state is unknown, and `status` then `thaw` is the safe next step.
    Such a command also finishes what it started when asked to stop (SIGTERM,
    e.g. systemd stopping the unit), instead of dying mid-way.
    """
    try:
        with stop_gracefully() if mutates else contextlib.nullcontext():
            code = fn()
    except VirtfreezeError as e:
        _fail(e)
        code = e.exit_code
        rt = ctx._rt if ctx is not None else None
        if rt is not None and not rt.reported:  # failed before any domain's report (e.g. libvirt unreachable)
            _finished(rt, {"errors": [_error_entry(e.domain, e)]})
    except KeyboardInterrupt:
        click.echo("virtfreeze: interrupted; run `virtfreeze status` and `virtfreeze thaw`", err=True)
        code = 130
    except Exception as e:  # noqa: BLE001 - the last resort
        log.debug("internal error", exc_info=True)
        where = "; a VM may be left on an overlay: run `virtfreeze status`, then `virtfreeze thaw`" if mutates else ""
        click.echo(f"virtfreeze: error: internal error {type(e).__name__}: {e}{where} "
                   "(a bug: -v shows the traceback)", err=True)
        code = errors.EXIT_ON_OVERLAY if mutates else errors.EXIT_FAILED
    sys.exit(code)


def _for_each(items, fn, jobs: int):
    """Run fn on every item, `jobs` at once; return (results, [(item, error)])."""
    results, failures = [], []

    def one(item):
        if stopping.is_set():
            return item, None, VirtfreezeError("not started: virtfreeze was asked to stop", domain=item.name,
                                               hint="run the command again")
        try:
            return item, fn(item), None
        except VirtfreezeError as e:
            return item, None, e
        except Exception as e:  # noqa: BLE001 - a bug: report it for this domain, go on with the others
            domain_log(log, item.name).debug("internal error", exc_info=True)
            return item, None, errors.LeftOnOverlay(
                f"internal error {type(e).__name__}: {e}", domain=item.name,
                hint="a bug (-v shows the traceback); it may be left on an overlay: run `virtfreeze status`")

    with ThreadPoolExecutor(max_workers=max(1, jobs), initializer=signals_to_main_thread) as pool:
        for item, result, err in pool.map(one, items):
            if err is None:
                results.append(result)
            else:
                failures.append((item, err))
    return results, failures


def _error_entry(domain: str | None, error) -> dict:
    """One failure as --json and the virtfreeze_run_finished hook show it."""
    return {"domain": domain, "message": str(error), "exit_code": getattr(error, "exit_code", errors.EXIT_FAILED)}


def _report(rt, action: str, results, failures, skipped: dict[str, str] | None = None, **more) -> dict:
    """What --json prints for a command that works on domains; the virtfreeze_run_finished hook gets it too."""
    report = {action: [r.to_json() for r in results], **more, "skipped": skipped or {},
              "errors": [_error_entry(e.domain or item.name, e) for item, e in failures]}
    _finished(rt, report)
    return report


def _finished(rt, report: dict) -> None:
    """Tell the virtfreeze_run_finished hook (once per command)."""
    from virtfreeze.plugins import tell

    rt.reported = True
    tell(rt.pm, "virtfreeze_run_finished", None, command=rt.command, report=report)


def _emit(ctx: Ctx, report: dict, results, failures, line) -> int:
    """Print a command's report (as JSON, or a line per result and per skipped domain) and its failures;
    return the exit code of the worst failure."""
    if ctx.as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for r in results:
            click.echo(line(r))
        for name, reason in report.get("skipped", {}).items():
            click.echo(f"skipped {name}: {reason}")
    for _item, e in failures:
        _fail(e)
    return _worst([e.exit_code for _i, e in failures])


@click.group(epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="virtfreeze")
@click.option("--connect", "-c", metavar="URI", help="libvirt URI (default: LIBVIRT_DEFAULT_URI, config, qemu:///system).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), metavar="FILE",
              help=f"YAML config file (default {config_mod.DEFAULT_CONFIG}, optional).")
@click.option("-v", "--verbose", count=True, help="More log output on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.pass_context
def cli(click_ctx, connect, config_path, verbose, quiet, as_json):
    """Freeze live libvirt/QEMU VMs for a backup, and merge them back after.

    Run `virtfreeze freeze` before your backup tool reads the export directory
    and `virtfreeze thaw` after it, also when the backup failed.
    """
    click_ctx.obj = Ctx(connect, config_path, as_json, verbose, quiet)


def _output_options(command):
    """--json, -v and -q after the command too (borg and restic users type them there), same meaning."""

    def set_json(click_ctx, _param, value):
        if value:
            click_ctx.find_object(Ctx).as_json = True

    def set_verbose(click_ctx, _param, value):
        if value:
            obj = click_ctx.find_object(Ctx)
            obj.verbose += value
            _setup_logging(obj.verbose, obj.quiet)

    def set_quiet(click_ctx, _param, value):
        if value:
            obj = click_ctx.find_object(Ctx)
            obj.quiet = True
            _setup_logging(obj.verbose, obj.quiet)

    for decorate in (
        click.option("--json", "as_json", is_flag=True, expose_value=False, callback=set_json,
                     help="Machine-readable output on stdout (as before the command)."),
        click.option("-v", "--verbose", count=True, expose_value=False, callback=set_verbose,
                     help="More log output on stderr (as before the command)."),
        click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=set_quiet,
                     help="Only warnings and errors on stderr (as before the command)."),
    ):
        command = decorate(command)
    return command


_domains_arg = click.argument("domains", nargs=-1, metavar="[DOMAIN|GLOB]...")
_all_opt = click.option("--all", "all_", is_flag=True, help="Every domain (config exclude still applies).")


@cli.command()
@_domains_arg
@_all_opt
@click.option("--memory/--no-memory", default=None, help="Also save the memory state (live; the guest keeps running).")
@click.option("--quiesce", type=click.Choice(["auto", "require", "off"]), default=None,
              help="Freeze guest filesystems through the guest agent (default auto: when available).")
@_output_options
@click.pass_obj
def freeze(ctx: Ctx, domains, all_, memory, quiesce):
    """Snapshot domains and expose their stable disks, memory and definition."""

    def run():
        from virtfreeze import export_view
        from virtfreeze.freeze import freeze_domain
        from virtfreeze.selection import ask_plugins, select

        rt = ctx.rt
        cfg = rt.config
        chosen, skipped = ask_plugins(rt.pm, select(rt.hv.domains(), list(domains), all_, cfg), cfg)
        try:
            with _progress_display(ctx, rt):
                results, failures = _for_each(chosen, lambda d: freeze_domain(rt, d, memory=memory,
                                                                              quiesce=quiesce), cfg.jobs)
        finally:
            export_view.write_index(cfg.export_directory)
        return _emit(ctx, _report(rt, "frozen", results, failures, skipped), results, failures, lambda r: (
            f"frozen {r.name} ({r.consistency}): {', '.join(r.disks) or 'no disks'} -> {r.export_dir}"
            + (f" (shared with {'; '.join(r.shared_with)})" if r.shared_with else "")))

    _run_guarded(run, mutates=True, ctx=ctx)


@cli.command()
@_domains_arg
@_all_opt
@click.option("--strategy", type=click.Choice(["auto", "live", "iterative", "offline"]), default=None,
              help="How to merge running guests (default: config, else auto = live, offline if refused).")
@click.option("--force", is_flag=True,
              help="Merge even while another run still holds the freeze (its backup may then fail or lack data).")
@_output_options
@click.pass_obj
def thaw(ctx: Ctx, domains, all_, strategy, force):
    """Merge overlays back into the base images and remove the export view.

    Without domains, thaws everything virtfreeze left frozen. Safe to run any
    time: with nothing frozen it does nothing and exits 0. A freeze belongs
    to the run (process session) that made it: a domain another live run
    still holds is left frozen, and merged by the last holder's thaw (or
    with --force); a run that died holds nothing.
    """

    def run():
        from virtfreeze import export_view
        from virtfreeze.model import DomainRef
        from virtfreeze.selection import select
        from virtfreeze.thaw import frozen_domains, thaw_domain

        rt = ctx.rt
        if domains or all_:
            existing = rt.hv.domains()
            known = {d.uuid for d in existing} | {d.name for d in existing}
            # A frozen domain undefined since the freeze is still known to its journal.
            gone = [r.ref for r in rt.journal.all() if r.uuid not in known and (all_ or r.name in domains)]
            names = [n for n in domains if n not in {g.name for g in gone}]
            chosen = select(existing, names, all_, rt.config) if names or all_ else []
            targets = [DomainRef(d.name, d.uuid) for d in chosen] + gone
        else:
            targets = [r.ref for r in frozen_domains(rt)]
        try:
            with _progress_display(ctx, rt):
                results, failures = _for_each(targets, lambda ref: thaw_domain(rt, ref, strategy, force=force),
                                              rt.config.jobs)
        finally:
            export_view.write_index(rt.config.export_directory)
        if not (domains or all_):
            from virtfreeze import guest_view

            guest_view.sweep(rt.state_dir, rt.journal)
        return _emit(ctx, _report(rt, "thawed", results, failures), results, failures, lambda r: (
            f"thawed {r.name} ({r.strategy}, {r.overlay_bytes} overlay bytes, {r.seconds:.2f}s"
            + (f"; stopped {r.stopped_seconds:.2f}s for {r.offline_bytes} bytes" if r.stopped_seconds else "")
            + (f" after {r.rounds} live rounds" if r.rounds else "") + (f"; {r.note}" if r.note else "") + ")"
            if r.strategy else f"left frozen {r.name}: still held by {'; '.join(r.held_by)}" if r.held_by
            else f"{r.name}: nothing frozen"))

    _run_guarded(run, mutates=True, ctx=ctx)


@cli.command()
@_domains_arg
@_all_opt
@click.option("--target", "target_names", multiple=True, metavar="NAME",
              help="Archive to this configured target (repeatable; default: every target).")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Domains backed up at once (default: config jobs).")
@click.option("--memory/--no-memory", default=None, help="Also archive the memory state.")
@click.option("--quiesce", type=click.Choice(["auto", "require", "off"]), default=None, help="As for freeze.")
@click.option("--strategy", type=click.Choice(["auto", "live", "iterative", "offline"]), default=None,
              help="As for thaw.")
@click.option("--verify", "verify_after", is_flag=True,
              help="Verify each new archive right after the domain's backup (as `virtfreeze verify`).")
@click.option("--verify-seconds", type=click.FloatRange(min=0), default=30, show_default=True,
              help="With --verify: how long each restored domain must run.")
@_output_options
@click.pass_obj
def backup(ctx: Ctx, domains, all_, target_names, jobs, memory, quiesce, strategy, verify_after, verify_seconds):
    """Per domain: freeze, archive to each storage target, thaw.

    Each domain's overlay lives only while its own archive is written. An
    archive failure still thaws the domain and makes the exit code 1.
    """

    def run():
        from virtfreeze.backup import backup_domain
        from virtfreeze.selection import ask_plugins, select
        from virtfreeze.targets import load_targets

        rt = ctx.rt
        cfg = rt.config
        targets = load_targets(cfg.targets, rt.pm, str(cfg.source) if cfg.source else None)
        if not targets:
            raise errors.UsageError("no storage target configured", hint="add `targets:` to the config")
        unknown = [n for n in target_names if n not in targets]
        if unknown:
            raise errors.UsageError(f"unknown target {unknown[0]!r} (configured: {', '.join(sorted(targets))})")
        chosen_targets = [targets[n] for n in (target_names or sorted(targets))]
        chosen, skipped = ask_plugins(rt.pm, select(rt.hv.domains(), list(domains), all_, cfg), cfg)
        with _progress_display(ctx, rt):
            results, failures = _for_each(chosen, lambda d: backup_domain(
                rt, d, chosen_targets, memory=memory, quiesce=quiesce, strategy=strategy), jobs or cfg.jobs)
            verified = _verify_new_archives(rt, results, chosen_targets, verify_seconds) if verify_after else []
        report = _report(rt, "backups", results, failures, skipped, verified=[v.to_json() for v in verified])
        if not ctx.as_json:
            rows = [("DOMAIN", "CONSISTENCY", "TARGET", "ARCHIVE", "BYTES", "FREEZE", "ARCHIVE s", "THAW",
                     "OVERLAY", "RESULT")]
            for r in results:
                for a in r.archives or [None]:
                    rows.append((r.name, r.consistency, a.target if a else "-", a.archive if a else "-",
                                 str(a.bytes) if a else "-", f"{r.freeze_seconds:.2f}s",
                                 f"{a.seconds:.2f}s" if a else "-", f"{r.thaw_seconds:.2f}s", str(r.overlay_bytes),
                                 "ok" if r.ok else "FAILED: " + "; ".join(r.errors)))
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
            for row in rows:
                click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
            for v in verified:
                click.echo(f"verified {v.domain} from {v.source}: {'; '.join(v.checks)}" if v.ok
                           else f"FAILED verify of {v.domain} from {v.source}: {v.error}")
        code = _emit(ctx, report, [], failures, str)  # the table above holds the results
        archive_failed = any(not r.ok for r in results) or any(not v.ok for v in verified)
        return code or (errors.EXIT_FAILED if archive_failed else errors.EXIT_OK)

    _run_guarded(run, mutates=True, ctx=ctx)


@cli.command("behind-guests", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- COMMAND [ARGS]...")
@click.pass_obj
def behind_guests(ctx: Ctx, command):
    """Run an archive tool as `backup` runs its own (hook mode).

    COMMAND runs at `archive_priority` (nice 19, I/O class idle, a small
    cgroup CPU weight), and what it writes to a disk holding a frozen
    domain's images is sent to disk while it runs, not in one burst at its
    end (and held to `write_bps`, if set). Between freeze and thaw:
    `virtfreeze behind-guests -- borg create ...`; borgmatic: `local_path:`
    contrib/borgmatic/borg-behind-guests. Exits with COMMAND's exit code
    (128+N when signal N ended it); its own failures, as env(1): 127 COMMAND
    not found, 126 not executable, 125 anything else (2: a bad config).
    """

    def run():
        from virtfreeze import priority, runner
        from virtfreeze.journal import Journal

        try:
            cfg = config_mod.load(ctx.config_path)

            def unreadable(e: Exception) -> None:
                log.warning("behind-guests: %s; the disks of the frozen domains it names are not spared", e)

            frozen = Journal(cfg.state_directory).readable(unreadable)
            log.debug("behind %d frozen domain(s): %s", len(frozen), ", ".join(r.name for r in frozen) or "none")
            with priority.archiving(priority.Priority.from_config(cfg.archive_priority),
                                    [path for record in frozen for path in record.images()]):
                return runner.run_through(list(command))
        except runner.CannotRun as e:
            e.exit_code = {errno_mod.ENOENT: 127, 0: errors.EXIT_WRAPPER_FAILED}.get(e.errno, 126)
            raise
        except VirtfreezeError as e:
            if e.exit_code != errors.EXIT_USAGE:  # never 1: borgmatic takes borg's 1 for a warning
                e.exit_code = errors.EXIT_WRAPPER_FAILED
            raise
        except Exception as e:  # noqa: BLE001 - a bug: one line, and an exit code no tool's warning has
            log.debug("internal error", exc_info=True)
            failed = VirtfreezeError(f"internal error {type(e).__name__}: {e} (a bug: -v shows the traceback)")
            failed.exit_code = errors.EXIT_WRAPPER_FAILED
            raise failed from None

    _run_guarded(run)


@cli.command()
@_domains_arg
@click.option("--target", "target_names", multiple=True, metavar="NAME",
              help="Only this configured target (repeatable; default: every target).")
@_output_options
@click.pass_obj
def archives(ctx: Ctx, domains, target_names):
    """List the restorable archives in the configured targets, newest first.

    Domains are names or globs matched against the archived domain's name
    (it need not exist any more).
    """

    def run():
        from virtfreeze.restore import configured_targets, list_archives

        found = list_archives(configured_targets(ctx.rt, target_names), list(domains))
        if ctx.as_json:
            click.echo(json.dumps({"archives": [a.to_json() for a in found]}, indent=2))
        elif not found:
            click.echo("no archives")
        else:
            rows = [("DOMAIN", "TARGET", "ARCHIVE", "TIME")] + [(a.domain, a.target, a.archive, a.time) for a in found]
            widths = [max(len(r[i]) for r in rows) for i in range(3)]
            for r in rows:
                click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
        return errors.EXIT_OK

    _run_guarded(run)


@cli.command()
@click.argument("domain", required=False, metavar="[DOMAIN]")
@click.option("--target", "target_name", metavar="NAME", help="Restore from this configured target "
              "(default: whichever holds the newest archive).")
@click.option("--archive", metavar="NAME|latest", default="latest", show_default=True,
              help="Which archive (as `virtfreeze archives` lists them).")
@click.option("--from", "from_dir", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="Restore from an extracted archive (e.g. `borgmatic extract`) or a domain's export view.")
@click.option("--name", metavar="NEW", help="Restore as a new domain beside the original: new UUID, new MAC "
              "addresses, files of its own.")
@click.option("--disk-dir", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="Write the disks here (default: where they were; block devices: /var/lib/libvirt/images).")
@click.option("--replace", is_flag=True, help="Overwrite a shut-off domain of the same name and its own files.")
@click.option("--start/--no-start", default=None,
              help="Start the domain (default: the state it had when frozen: running, paused or shut off).")
@click.option("--memory/--no-memory", default=None,
              help="Resume from the archived memory state (default, when there is one) or cold-boot.")
@_output_options
@click.pass_obj
def restore(ctx: Ctx, domain, target_name, archive, from_dir, name, disk_dir, replace, start, memory):
    """Restore a domain from an archive: its disks, definition, NVRAM, TPM state and memory state.

    \b
    In place (default): same name, UUID and paths; refused (exit 2) when the
    domain or any file exists, unless --replace and the domain is shut off.
    With --name NEW: a new domain that runs beside the original. Files are
    written only to --disk-dir, the storage pools' directories,
    /var/lib/libvirt and the config's restore_directories.
    """

    def run():
        from virtfreeze.restore import Source, choose_archive, configured_targets, restore as do_restore

        if (domain is None) == (from_dir is None):
            raise errors.UsageError("name the DOMAIN to restore from a target, or give --from DIR (not both)")
        rt = ctx.rt
        if from_dir is not None:
            source = Source(directory=from_dir)
        else:
            source = choose_archive(configured_targets(rt, [target_name] if target_name else []), domain, archive)
        with _progress_display(ctx, rt):
            result = do_restore(rt, source, name=name, disk_dir=disk_dir, replace=replace, start=start,
                                memory=memory)
        if ctx.as_json:
            click.echo(json.dumps({"restore": result.to_json()}, indent=2))
        else:
            how = "resumed from memory" if result.from_memory else {"shutoff": "defined, not started"}.get(
                result.state, "cold-booted")
            click.echo(f"restored {result.name}{' (new domain)' if result.new else ''} from {result.source}: "
                       f"{result.state}, {how}; {len(result.files)} files, {result.bytes >> 20} MiB "
                       f"in {result.seconds:.1f}s")
        return errors.EXIT_OK

    _run_guarded(run, mutates=True)


@cli.command()
@_domains_arg
@click.option("--target", "target_names", multiple=True, metavar="NAME",
              help="Verify archives in this configured target (repeatable; default: every target).")
@click.option("--archive", metavar="NAME|latest", default="latest", show_default=True,
              help="Which archive of each domain (as `virtfreeze archives` lists them).")
@click.option("--from", "from_dir", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="Verify an extracted archive instead: one domain's directory, or an export root holding "
                   "several (e.g. a borgmatic archive extracted).")
@click.option("--seconds", type=click.FloatRange(min=0), default=30, show_default=True,
              help="How long the restored domain must run without crashing, pausing or shutting off.")
@click.option("--check-command", metavar="CMD", help="A command (split like a shell would, never run by one) "
              "that decides, run once the domain ran: VIRTFREEZE_VERIFY_DOMAIN names the throwaway domain.")
@click.option("--keep-on-failure", is_flag=True, help="Keep a failed verify's domain and files for inspection.")
@_output_options
@click.pass_obj
def verify(ctx: Ctx, domains, target_names, archive, from_dir, seconds, check_command, keep_on_failure):
    """Prove archives restore and run: each is restored as an isolated throwaway domain
    (verify-DOMAIN-ID, no network), must run, and is removed.

    Exit 0 when every archive verified, 1 when one failed, 2 for bad input.
    The original domains are never touched.
    """

    def run():
        import shlex

        from virtfreeze.restore import Source, choose_archive, configured_targets, list_archives
        from virtfreeze.verify import verify as verify_one

        rt = ctx.rt
        command = shlex.split(check_command) if check_command else None
        if from_dir is not None:
            if domains:
                raise errors.UsageError("give DOMAINs to verify from targets, or --from DIR (not both)")
            if (from_dir / "manifest.json").exists():
                sources = [Source(directory=from_dir)]
            else:  # an export root (e.g. a whole borgmatic archive, extracted): each domain in it
                sources = [Source(directory=d) for d in sorted(from_dir.iterdir())
                           if (d / "manifest.json").exists() and not d.is_symlink()]
            if not sources:
                raise errors.UsageError("no manifest.json in it or in its directories", path=str(from_dir),
                                        hint="give an extracted archive, a domain's export view or an export root")
        else:
            targets = configured_targets(rt, target_names)
            names = sorted({a.domain for a in list_archives(targets, list(domains))})
            if not names:
                raise errors.UsageError("no archive to verify" + (f" of {', '.join(domains)}" if domains else ""),
                                        hint="`virtfreeze archives` lists them")
            sources = [choose_archive(targets, n, archive) for n in names]
        results = []
        with _progress_display(ctx, rt):
            for source in sources:
                if stopping.is_set():
                    break
                results.append(verify_one(rt, source, seconds=seconds, check_command=command,
                                          keep_on_failure=keep_on_failure))
        report = {"verified": [r.to_json() for r in results],
                  "errors": [_error_entry(r.domain, r.error) for r in results if not r.ok]}
        _finished(rt, report)
        if ctx.as_json:
            click.echo(json.dumps({"verified": report["verified"]}, indent=2))
        else:
            for r in results:
                if r.ok:
                    click.echo(f"verified {r.domain} from {r.source}: {'; '.join(r.checks)}; network: {r.network}; "
                               f"{r.seconds:.1f}s (restore {r.restore_seconds:.1f}s)")
                else:
                    click.echo(f"FAILED {r.domain} from {r.source}: {r.error}"
                               + (f"; kept: {r.kept}" if r.kept else ""))
        return errors.EXIT_OK if all(r.ok for r in results) and len(results) == len(sources) else errors.EXIT_FAILED

    _run_guarded(run, mutates=True, ctx=ctx)


def _verify_new_archives(rt, results, targets, seconds: float) -> list:
    """`backup --verify`: each archive the run made, verified one after another (after every thaw)."""
    from virtfreeze.restore import Source
    from virtfreeze.verify import verify as verify_one

    by_name = {t.name: t for t in targets}
    out = []
    for r in results:
        for a in r.archives:
            if stopping.is_set():
                return out
            if a.target in by_name:
                try:
                    out.append(verify_one(rt, Source(target=by_name[a.target], archive=a.archive, domain=r.name),
                                          seconds=seconds))
                except VirtfreezeError as e:  # never the reason the backup's own results go unprinted
                    from virtfreeze.verify import VerifyResult

                    out.append(VerifyResult(r.name, f"{a.target}:{a.archive}", "-", False, "-", "-", error=str(e)))
    return out


@cli.command()
@_domains_arg
@_all_opt
@_output_options
@click.pass_obj
def check(ctx: Ctx, domains, all_):
    """Say what will work, before the first night: the host, then each domain. Changes nothing.

    One finding per line: ok, warning or error. Exit 0 when nothing is an
    error, 1 otherwise, 2 for usage errors. Without domains: the host only.
    """

    def run():
        import fnmatch

        from virtfreeze.check import ERROR, findings
        from virtfreeze.selection import select

        ctx.read_only = True
        rt = ctx.rt
        every = rt.hv.domains()
        chosen, missing = [], []
        if all_ or domains:
            if all_:
                chosen = select(every, [], True, rt.config)
            else:
                names = {d.name for d in every}
                for pat in domains:
                    matches = [d for d in every if d.name == pat or fnmatch.fnmatchcase(d.name, pat)]
                    if not matches and (pat not in names):
                        missing.append(pat)
                    chosen += [d for d in matches if d not in chosen]
        found = findings(rt, chosen, missing)
        if ctx.as_json:
            click.echo(json.dumps({"findings": [f.to_json() for f in found]}, indent=2))
        else:
            for f in found:
                click.echo(f"{f.level.upper():7}  {f.scope}: {f.topic}: {f.message}")
        return errors.EXIT_FAILED if any(f.level == ERROR for f in found) else errors.EXIT_OK

    _run_guarded(run)


@cli.command()
@_output_options
@click.pass_obj
def plugins(ctx: Ctx):
    """List the loaded plugins, where they come from, and their hooks."""
    from virtfreeze.plugins import describe_plugins

    rows = describe_plugins(ctx.rt.pm if ctx._rt else None)
    if ctx.as_json:
        click.echo(json.dumps({"plugins": rows}, indent=2))
    else:
        for r in rows:
            extra = f" targets: {', '.join(r['target_types'])}" if r["target_types"] else ""
            click.echo(f"{r['name']} ({r['source']}): {', '.join(r['hooks'])}{extra}")


@cli.group("config")
def config_group():
    """Inspect the configuration file."""


@config_group.command("check")
@_output_options
@click.pass_obj
def config_check(ctx: Ctx):
    """Validate the config (targets too, against their plugin's schema) and print what was understood.

    Exit 0 when valid, 2 with the offending key's name when not. Does not
    connect to libvirt.
    """

    def run():
        import yaml

        from virtfreeze.targets import load_targets

        cfg = ctx.rt.config
        source = str(cfg.source) if cfg.source else None
        targets = load_targets(cfg.targets, ctx.rt.pm, source)
        understood = cfg.to_json()
        understood["targets"] = {t.name: {"type": t.type, **t.settings} for t in targets.values()}
        if ctx.as_json:
            click.echo(json.dumps({"source": source, "valid": True, "config": understood}, indent=2))
        else:
            click.echo(f"# {source or f'no file at {config_mod.DEFAULT_CONFIG}: defaults'}: valid")
            click.echo(yaml.safe_dump(understood, sort_keys=False, default_flow_style=False), nl=False)
        return errors.EXIT_OK

    _run_guarded(run)


@cli.command()
@click.argument("domains", nargs=-1, metavar="[DOMAIN]...")
@_output_options
@click.pass_obj
def status(ctx: Ctx, domains):
    """Show frozen domains (all, or those named); exit 3 when any is on an overlay."""

    def run():
        from virtfreeze.status import collect

        rows = collect(ctx.rt, list(domains))
        if ctx.as_json:
            click.echo(json.dumps({"frozen": rows}, indent=2))
        elif not rows:
            click.echo("nothing frozen")
        else:
            for r in rows:
                sizes = ", ".join(f"{d['target']} {d['overlay_bytes'] or 0} B" for d in r["disks"])
                mem = f", memory {r['memory_bytes']} B" if r["memory_bytes"] else ""
                since = (f"since {r['since']} ({r['consistency']})" if r["journal"] else
                         f"in the journal of state_directory {r['journal_elsewhere']}" if r["journal_elsewhere"]
                         else "no journal")
                click.echo(f"{r['domain']}: {r['phase']} {since}, state {r['state']}, "
                           f"overlays: {sizes or 'none'}{mem}; thaw: {r['strategy']} ({r['strategy_reason']})")
                for h in r["holders"]:
                    click.echo(f"  held by session {h['sid']} ({h['command'] or '?'}) since {h['since']}"
                               + ("" if h["alive"] else " — gone: holds nothing"))
        return errors.EXIT_ON_OVERLAY if any(r["on_overlay"] for r in rows) else errors.EXIT_OK

    _run_guarded(run)


def main() -> None:
    name_this_thread("virtfreeze")  # not "python3" in top and ps (its threads: vf-...)
    cli()
