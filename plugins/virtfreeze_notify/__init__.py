"""Notify plugin: tell people when a domain's backup failed, through Apprise.

Configured by `notify: {urls: [...], urls_file: FILE, on_success: false}`;
off unless set. Each failure (`virtfreeze_domain_failed`: freeze, archive,
thaw or verify) sends one message naming the host, the domain, the phase
and what to do; with `on_success`, a command in which every domain
succeeded sends one summary. Apprise speaks mail, ntfy, Matrix, Slack,
Telegram, healthchecks-style webhooks and more, each by URL. Its URLs often
hold tokens: they come from a 0600 file and never appear in a log line.
A message that cannot be sent is logged and never changes a backup's outcome.
"""

from __future__ import annotations

import logging
import re
import socket
import stat
from pathlib import Path

from virtfreeze.errors import ConfigError
from virtfreeze.hookspecs import hookimpl
from virtfreeze.logs import domain_log

log = logging.getLogger("virtfreeze.plugins.notify")  # in virtfreeze's log tree: -q and -v apply

_sender = None  # an apprise.Apprise with the configured URLs, or None: off
_on_success = False
_told: set[str] = set()  # domains whose failure this command has sent already
_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def _redacted(text: str) -> str:
    """A message without the user:password of any URL in it (e.g. a restic rest: repository)."""
    return _USERINFO.sub(r"\1***@", text)


def _scheme(url: str) -> str:
    """What a log line may say about a URL: its scheme, never its tokens."""
    return url.split("://", 1)[0] + "://…" if "://" in url else "(not a URL)"


def _read_urls(path: Path) -> list[str]:
    try:
        st = path.stat()
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"notify.urls_file: cannot read it: {e.strerror}", path=str(path)) from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("notify.urls_file %s is readable by others (mode %o); its URLs may hold tokens: chmod 600 it",
                    path, stat.S_IMODE(st.st_mode))
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@hookimpl
def virtfreeze_configure(config, command):
    global _sender, _on_success
    settings = config.notify or {}
    _sender, _on_success = None, bool(settings.get("on_success"))
    _told.clear()
    if not settings:
        return
    try:
        import apprise
    except ImportError:
        raise ConfigError("notify: the Python library apprise is not installed",
                          hint="apt install apprise, or pip install 'virtfreeze[notify]'; "
                               "or remove `notify:` from the config") from None
    urls = list(settings.get("urls", []))
    if settings.get("urls_file"):
        urls += _read_urls(Path(settings["urls_file"]))
    if not urls:
        raise ConfigError("notify: no URL to send to", hint="give notify.urls or a notify.urls_file with one URL "
                                                            "per line")
    sender = apprise.Apprise()
    for url in urls:
        if not sender.add(url):
            raise ConfigError(f"notify: Apprise does not understand the URL {_scheme(url)}",
                              hint="see https://github.com/caronc/apprise/wiki for the URL of each service")
    _sender = sender


def _send(title: str, body: str, failure: bool, domain: str | None = None) -> None:
    import apprise

    kind = apprise.NotifyType.FAILURE if failure else apprise.NotifyType.SUCCESS
    try:
        sent = _sender.notify(title=title, body=body, notify_type=kind)
    except Exception as e:  # noqa: BLE001 - a notification must never change the outcome
        sent = False
        log.debug("apprise raised %s: %s", type(e).__name__, e)
    if not sent:
        where = domain_log(log, domain) if domain else log
        where.warning("could not send the notification %r to every notify URL (-v shows why)", title)


@hookimpl
def virtfreeze_domain_failed(domain, phase, error):
    if _sender is None:
        return
    host = socket.gethostname()
    on_overlay = getattr(error, "exit_code", None) == 3
    _told.add(domain.name)
    body = f"{phase} of domain {domain.name} on {host} failed: {_redacted(str(error))}"
    if on_overlay:
        body += ("\nThe domain is still on an overlay (its guest writes into it until it is merged): "
                 "run `virtfreeze status`, then `virtfreeze thaw`.")
    _send(f"virtfreeze on {host}: {phase} of {domain.name} failed", body, True, domain.name)


@hookimpl
def virtfreeze_run_finished(command, report):
    if _sender is None:
        return
    host = socket.gethostname()
    errors = report.get("errors") or []
    untold = [e for e in errors if e.get("domain") not in _told]  # e.g. libvirt unreachable: no domain ran
    if untold:
        body = "\n".join(_redacted(f"{e.get('domain') or 'virtfreeze'}: {e.get('message')}") for e in untold)
        _send(f"virtfreeze on {host}: {command} failed", body, True)
    entries = [e for key, value in report.items() if key not in ("errors", "skipped") and isinstance(value, list)
               for e in value if isinstance(e, dict)]
    # A failed archive or verify is an entry with ok false, a domain another run still holds is not done.
    if not _on_success or errors or not entries or any(e.get("ok") is False or e.get("held_by") for e in entries):
        return
    names = sorted({e.get("name") or e.get("domain") or "?" for e in entries})
    body = f"virtfreeze {command} on {host} succeeded for {len(names)} domain(s): {', '.join(names)}"
    skipped = report.get("skipped") or {}
    if skipped:
        body += f"\nskipped: {', '.join(f'{n} ({why})' for n, why in sorted(skipped.items()))}"
    _send(f"virtfreeze on {host}: {command} OK", body, False)
