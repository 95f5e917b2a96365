"""Metrics plugin: each domain's last results in node_exporter's textfile format.

Configured by `metrics: {textfile: /var/lib/prometheus/node-exporter/virtfreeze.prom}`;
off unless set. Every step that finishes (a freeze, a thaw, a backup, a
verify, a failure) reads the file, changes its own series and writes it
again, atomically (prometheus_client's `write_to_textfile`: a temporary file
renamed over the old one), under a lock: `freeze` and `thaw` are separate
processes in hook mode, and each keeps what the other wrote. Counters
(`virtfreeze_failures_total`) go on counting across runs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from virtfreeze.errors import ConfigError
from virtfreeze.hookspecs import hookimpl
from virtfreeze.journal import write_atomic
from virtfreeze.logs import domain_log

log = logging.getLogger("virtfreeze.plugins.metrics")  # in virtfreeze's log tree: -q and -v apply

CONSISTENCIES = ("quiesced", "crash", "memory", "shutoff", "none")
STRATEGIES = ("live", "iterative", "offline")


@dataclass(frozen=True)
class Family:
    name: str  # the sample's name, as scraped
    type: str  # gauge or counter
    help: str
    labels: tuple[str, ...]


FAMILIES = {f.name: f for f in (
    Family("virtfreeze_last_success_timestamp_seconds", "gauge",
           "When the domain's last backup succeeded (driver mode: every archive written and thawed; hook mode: "
           "its `freeze` merged back by `thaw` after the backup tool ran).", ("domain",)),
    Family("virtfreeze_last_failure_timestamp_seconds", "gauge",
           "When a freeze, archive or thaw of the domain last failed (verify: virtfreeze_verify_ok).", ("domain",)),
    Family("virtfreeze_failures_total", "counter",
           "Failures of the domain by phase (freeze, archive, thaw, verify).", ("domain", "phase")),
    Family("virtfreeze_freeze_duration_seconds", "gauge", "How long the domain's last freeze took.", ("domain",)),
    Family("virtfreeze_thaw_duration_seconds", "gauge",
           "How long the domain's last thaw (the merge back) took.", ("domain",)),
    Family("virtfreeze_archive_duration_seconds", "gauge",
           "How long the domain's last archive to each target took (driver mode).", ("domain", "target")),
    Family("virtfreeze_archive_bytes", "gauge",
           "Bytes the domain's last archive to each target held (before deduplication and compression).",
           ("domain", "target")),
    Family("virtfreeze_overlay_merged_bytes", "gauge",
           "Bytes the guest wrote during its last backup, merged back by the thaw.", ("domain",)),
    Family("virtfreeze_guest_stopped_seconds", "gauge",
           "Seconds the guest was not running during the last freeze or thaw (libvirt lifecycle events).",
           ("domain", "phase")),
    Family("virtfreeze_consistency", "gauge",
           "The consistency the last freeze obtained: 1 for that one, 0 for the others.",
           ("domain", "virtfreeze_consistency")),
    Family("virtfreeze_strategy", "gauge",
           "The merge the last thaw used: 1 for that one, 0 for the others.", ("domain", "virtfreeze_strategy")),
    Family("virtfreeze_on_overlay", "gauge",
           "1 while the domain is frozen (its guest writes into an overlay), as of virtfreeze's last step.",
           ("domain",)),
    Family("virtfreeze_frozen_since_timestamp_seconds", "gauge",
           "When the domain's current (or last) freeze was taken.", ("domain",)),
    Family("virtfreeze_verify_ok", "gauge", "1 when the domain's last verify passed, 0 when it failed.", ("domain",)),
    Family("virtfreeze_verify_last_success_timestamp_seconds", "gauge",
           "When a verify of the domain last passed.", ("domain",)),
    Family("virtfreeze_verify_duration_seconds", "gauge", "How long the domain's last verify took.", ("domain",)),
)}

Labels = tuple[tuple[str, str], ...]
Samples = dict[str, dict[Labels, float]]


class Textfile:
    """The metrics file: read, changed and written under one lock."""

    def __init__(self, path: Path):
        self.path = path
        self._lock_path = path.with_name(f".{path.name}.lock")  # node_exporter reads *.prom only
        self._threads = threading.Lock()

    def check(self) -> None:
        """Refuse before the command starts when the file cannot be written."""
        directory = self.path.parent
        if not directory.is_dir():
            raise ConfigError("metrics.textfile: no such directory", path=str(directory),
                              hint="create it, or point metrics.textfile into node_exporter's "
                                   "--collector.textfile.directory")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError("metrics.textfile: the directory is not writable for this user", path=str(directory))

    def read(self) -> Samples:
        from prometheus_client.parser import text_string_to_metric_families

        samples: Samples = {}
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return samples
        try:
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name in FAMILIES:  # a series this version no longer writes is dropped
                        samples.setdefault(s.name, {})[_key(s.labels)] = s.value
        except ValueError as e:  # a file someone edited: start again rather than fail every run
            log.warning("metrics file %s is not in the text format (%s); writing it anew", self.path, e)
            return {}
        return samples

    def write(self, samples: Samples) -> None:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        class Collector:
            def collect(self):
                for name, family in FAMILIES.items():
                    kind = CounterMetricFamily if family.type == "counter" else GaugeMetricFamily
                    metric = kind(name, family.help, labels=family.labels)
                    for labels, value in sorted(samples.get(name, {}).items()):
                        by_name = dict(labels)
                        metric.add_metric([by_name.get(label, "") for label in family.labels], value)
                    yield metric

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector())
        # A temporary file of our own (O_EXCL: never through a symlink someone put there, and not named
        # *.prom), renamed over the old one: node_exporter reads the whole old file or the whole new one.
        write_atomic(self.path, generate_latest(registry), mode=0o644)

    def update(self, change) -> None:
        """Read the file, let `change(samples)` set what it knows, write it back: one step at a time."""
        with self._threads:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                samples = self.read()
                change(samples)
                self.write(samples)
            finally:
                os.close(fd)


_textfile: Textfile | None = None


def _key(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _set(samples: Samples, name: str, value: float, **labels: str) -> None:
    samples.setdefault(name, {})[_key(labels)] = float(value)


def _get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get(name, {}).get(_key(labels))


def _one_of(samples: Samples, name: str, chosen: str, states: tuple[str, ...], domain: str) -> None:
    for state in states:
        _set(samples, name, 1 if state == chosen else 0, domain=domain, **{name: state})


def _update(domain: str, change) -> None:
    if _textfile is None:
        return
    try:
        _textfile.update(change)
    except Exception as e:  # noqa: BLE001 - metrics never change a backup's outcome, nor stop other plugins
        domain_log(log, domain).warning("cannot write metrics file %s: %s", _textfile.path,
                                        getattr(e, "strerror", None) or e)


@hookimpl
def virtfreeze_configure(config, command):
    global _textfile
    _textfile = None  # off until the settings are known to work
    settings = config.metrics or {}
    if not settings.get("textfile"):
        return
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError("metrics: the Python library prometheus_client is not installed",
                          hint="apt install python3-prometheus-client, or pip install 'virtfreeze[metrics]'; "
                               "or remove `metrics:` from the config") from None
    textfile = Textfile(Path(settings["textfile"]))
    textfile.check()  # refused: the plugin stays off
    _textfile = textfile


@hookimpl
def virtfreeze_domain_done(domain, step, result, command):
    name, now = domain.name, time.time()

    def change(s: Samples) -> None:
        if step == "freeze":
            _set(s, "virtfreeze_freeze_duration_seconds", result.seconds, domain=name)
            _set(s, "virtfreeze_guest_stopped_seconds", result.downtime_seconds, domain=name, phase="freeze")
            _one_of(s, "virtfreeze_consistency", result.consistency, CONSISTENCIES, name)
            if result.disks and not (result.shared_with and _get(s, "virtfreeze_on_overlay", domain=name)):
                _set(s, "virtfreeze_frozen_since_timestamp_seconds", now, domain=name)  # joined: the first freeze's
            _set(s, "virtfreeze_on_overlay", 1 if result.disks else 0, domain=name)
        elif step == "thaw":
            if result.held_by:  # another run still holds the freeze: nothing changed
                return
            if result.strategy:
                _set(s, "virtfreeze_thaw_duration_seconds", result.seconds, domain=name)
                _set(s, "virtfreeze_overlay_merged_bytes", result.overlay_bytes, domain=name)
                _set(s, "virtfreeze_guest_stopped_seconds", result.downtime_seconds, domain=name, phase="thaw")
                _one_of(s, "virtfreeze_strategy", result.strategy, STRATEGIES, name)
                if command == "thaw" and result.frozen_by == "freeze" and result.own_freeze:
                    # Hook mode: the run that froze it had its backup tool read it (the tool's own exit
                    # status is the tool's to report) and merged it back. Leftovers of a run that died,
                    # merged by another run or at boot, are no success.
                    _set(s, "virtfreeze_last_success_timestamp_seconds", now, domain=name)
            _set(s, "virtfreeze_on_overlay", 0, domain=name)
        elif step == "backup":
            _set(s, "virtfreeze_freeze_duration_seconds", result.freeze_seconds, domain=name)  # as --json has them
            _set(s, "virtfreeze_thaw_duration_seconds", result.thaw_seconds, domain=name)
            for archived in result.archives:
                _set(s, "virtfreeze_archive_duration_seconds", archived.seconds, domain=name, target=archived.target)
                _set(s, "virtfreeze_archive_bytes", archived.bytes, domain=name, target=archived.target)
            if result.ok:
                _set(s, "virtfreeze_last_success_timestamp_seconds", now, domain=name)

    _update(name, change)


@hookimpl
def virtfreeze_domain_failed(domain, phase, error):
    name, now = domain.name, time.time()

    def change(s: Samples) -> None:
        before = _get(s, "virtfreeze_failures_total", domain=name, phase=phase) or 0
        _set(s, "virtfreeze_failures_total", before + 1, domain=name, phase=phase)
        if phase == "verify":  # verify_ok says it; a failed check of an old archive is no failed backup
            _set(s, "virtfreeze_verify_ok", 0, domain=name)
        else:
            _set(s, "virtfreeze_last_failure_timestamp_seconds", now, domain=name)
        if getattr(error, "exit_code", None) == 3:  # still on an overlay
            _set(s, "virtfreeze_on_overlay", 1, domain=name)

    _update(name, change)


@hookimpl
def virtfreeze_verified(domain, result):
    now = time.time()

    def change(s: Samples) -> None:
        _set(s, "virtfreeze_verify_ok", 1, domain=domain)
        _set(s, "virtfreeze_verify_last_success_timestamp_seconds", now, domain=domain)
        _set(s, "virtfreeze_verify_duration_seconds", result.seconds, domain=domain)

    _update(domain, change)
