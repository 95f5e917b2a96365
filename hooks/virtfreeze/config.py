"""The YAML configuration: schema (every option described, with an example),
loading, and validation that names the offending key."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from virtfreeze.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/virtfreeze/config.yaml")
DEFAULT_URI = "qemu:///system"

_QUIESCE = {"type": "string", "enum": ["auto", "require", "off"]}
_STRATEGY = {"type": "string", "enum": ["auto", "live", "iterative", "offline"]}

_LAYOUT = {"type": "string", "enum": ["image", "segmented"]}

_DOMAIN_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "description": "Settings for one domain, by name.",
    "properties": {
        "exclude_disks": {
            "type": "array", "items": {"type": "string"},
            "description": "Disk targets never snapshotted nor exported (e.g. scratch or swap disks).",
            "example": ["vdb"],
        },
        "memory": {
            "type": "boolean",
            "description": "Also save the memory state (a live, running-restorable backup).",
            "example": True,
        },
        "quiesce": dict(_QUIESCE, description="Override the global quiesce setting.", example="require"),
        "strategy": dict(_STRATEGY, description="Override the global merge strategy.", example="iterative"),
        "export_layout": dict(_LAYOUT, description="Override the global export layout.", example="segmented"),
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "connect": {
            "type": "string",
            "description": "libvirt connection URI. Overridden by --connect and LIBVIRT_DEFAULT_URI.",
            "example": "qemu:///system",
        },
        "include": {
            "type": "array", "items": {"type": "string"},
            "description": "Domain names or globs selected when no domain is named on the command line.",
            "example": ["web-*", "db1"],
        },
        "exclude": {
            "type": "array", "items": {"type": "string"},
            "description": "Domain names or globs never selected by globs, include or --all.",
            "example": ["scratch-*"],
        },
        "export_directory": {
            "type": "string",
            "description": "Where the export view (domain.xml, disks/, manifest.json, paths.txt) appears.",
            "example": "/run/virtfreeze/export",
        },
        "state_directory": {
            "type": "string",
            "description": "Durable state: journal, locks, memory images (unless memory_directory is set), saved "
                           "definitions. On disk, not tmpfs.",
            "example": "/var/lib/virtfreeze",
        },
        "memory_directory": {
            "type": ["string", "null"], "pattern": "^/",
            "description": "Where a --memory freeze writes each domain's memory image (a 0700 directory per "
                           "domain, the image 0600, removed by thaw; it must be this user's and writable by it "
                           "alone, or the freeze refuses). Unset: state_directory/memory. A tmpfs "
                           "(e.g. /dev/shm/virtfreeze) shortens the guest's pause at the end of the freeze, "
                           "since libvirt then has no fdatasync of the image to wait for, but holds each image in "
                           "host RAM until the archive is done: up to the guest's memory size per domain frozen "
                           "at once; a freeze that does not fit fails and leaves the guest running on its disks.",
            "example": "/dev/shm/virtfreeze",
        },
        "overlay_directory": {
            "type": ["string", "null"],
            "description": "Where overlays are created. Unset: beside each base image (block devices: under state_directory).",
            "example": "/var/lib/virtfreeze/overlays",
        },
        "export_layout": dict(_LAYOUT, description=(
            "How disks appear in the export view: image (each base image as one file, read whole by every "
            "run) or segmented (the guest-visible bytes as fixed-size segment files, disks/<target>.segments/; "
            "borg and restic then read only the segments that changed since the last run: a dirty bitmap "
            "tells for qcow2 disks of running domains, segment hashes for the rest)."), example="image"),
        "segment_size": {
            "type": "integer", "enum": [1 << n for n in range(20, 31)],
            "description": "Segmented layout: bytes per segment, a power of two from 1 MiB to 1 GiB. Smaller "
                           "segments re-read less after scattered writes (4 MiB: 10 % of a disk changed in 4 MiB "
                           "pieces reads 10 %; 16 MiB: 34 %); more segments cost more file-cache entries (a "
                           "1 TiB disk is 262144 files of 4 MiB). Changing it makes the next run read every disk "
                           "whole.",
            "example": 4194304,
        },
        "memory": {
            "type": "boolean",
            "description": "Save every domain's memory state too (as --memory).",
            "example": False,
        },
        "quiesce": dict(_QUIESCE, description="Quiesce filesystems through the guest agent: auto, require or off.",
                        example="auto"),
        "quiesce_timeout": {
            "type": "number", "exclusiveMinimum": 0,
            "description": "Seconds to wait for the guest agent to freeze filesystems.",
            "example": 10,
        },
        "jobs": {
            "type": "integer", "minimum": 1,
            "description": "How many domains are frozen or thawed at once.",
            "example": 4,
        },
        "lock_wait": {
            "type": "number", "minimum": 0,
            "description": "Seconds a freeze or thaw waits for another virtfreeze run that is working on the same "
                           "domain (overlapping schedules often hold it for a moment only) before it gives up "
                           "with exit 4.",
            "example": 10,
        },
        "commit_ready_timeout": {
            "type": "number", "exclusiveMinimum": 0,
            "description": "Seconds to wait for a live commit to become ready to pivot before giving up (the chain stays valid).",
            "example": 3600,
        },
        "live_converge_timeout": {
            "type": "number", "exclusiveMinimum": 0,
            "description": "Strategy auto: seconds a live commit may take to catch up with the guest's writes; "
                           "after that the rest is merged with the guest's vCPUs paused (milliseconds to seconds) "
                           "instead of waiting up to commit_ready_timeout.",
            "example": 600,
        },
        "commit_bandwidth": {
            "type": "integer", "minimum": 0,
            "description": "Bytes per second a commit copies while the guest runs (0: no limit). A copy at full "
                           "speed stalls a writing guest (its flushes wait behind the host's writeback of the "
                           "base); held to this rate, with the base written back as it goes, it does not. A live "
                           "commit's limit is lifted once it has caught up (for the pivot), or when it has not "
                           "caught up in twice the time its overlay needs at this rate (the guest out-writes it); "
                           "an overlay holding less than a second's copy is copied at full speed.",
            "example": 104857600,
        },
        "pivot_attempts": {
            "type": "integer", "minimum": 1,
            "description": "How often a pivot is tried (with backoff) before giving up.",
            "example": 5,
        },
        "strategy": dict(_STRATEGY, description=(
            "How thaw merges a running guest's overlays: live (active commit + pivot, no downtime), "
            "iterative (live rounds, then a short stop for the last small overlay), offline (stop the "
            "guest for the whole merge), auto (live; offline when libvirt refuses the live commit)."),
            example="auto"),
        "iterative_factor": {
            "type": "number", "exclusiveMinimum": 1,
            "description": "Iterative merge: do another live round while each round's overlay is at least this many times smaller than the last.",
            "example": 2,
        },
        "iterative_max_rounds": {
            "type": "integer", "minimum": 1,
            "description": "Iterative merge: at most this many live rounds before the offline step.",
            "example": 5,
        },
        "iterative_final_step": {
            "type": "string", "enum": ["auto", "pause", "save"],
            "description": "Iterative merge: how the last small overlay is merged. pause: the guest's vCPUs stop "
                           "while QEMU commits it (nothing writes, so it converges at once; milliseconds). save: "
                           "the guest is saved to disk, qemu-img commits, the guest is restored (seconds: QEMU "
                           "stops and starts again). auto: pause, and save when libvirt refuses the commit.",
            "example": "auto",
        },
        "overlay_min_free": {
            "type": "integer", "minimum": 0,
            "description": "Bytes that must be free on each overlay's filesystem for a freeze to start: the guest "
                           "writes into its overlay until the thaw, and a full filesystem pauses it with an I/O "
                           "error.",
            "example": 1073741824,
        },
        "iterative_threshold": {
            "type": "integer", "minimum": 0,
            "description": "Iterative merge: stop the live rounds once the remaining overlays hold fewer bytes than this.",
            "example": 1048576,
        },
        "archive_priority": {
            "type": "object",
            "additionalProperties": False,
            "description": "How `backup` runs the archive tools (borg, restic, the directory copy), so that the "
                           "guests do not notice: CPU nice, I/O class, a cgroup CPU weight, and optionally a "
                           "limit on their writes to the images' disks. "
                           "{nice: 0, ionice: none, cpu_weight: null, writeback_interval: null} runs them as "
                           "any other process.",
            "example": {"nice": 19, "ionice": "idle", "cpu_weight": 10},
            "properties": {
                "nice": {"type": "integer", "minimum": 0, "maximum": 19,
                         "description": "CPU nice of the archive tools (19: lowest).", "example": 19},
                "ionice": {"type": "string", "enum": ["idle", "best-effort", "none"],
                           "description": "I/O scheduling class (honoured by BFQ, and by mq-deadline since Linux "
                                          "5.15; the none scheduler ignores it).",
                           "example": "idle"},
                "cpu_weight": {"type": ["integer", "null"], "minimum": 1, "maximum": 10000,
                               "description": "cgroup CPU weight of the archive tools (everything else has 100; "
                                              "cgroup v2 cpu.weight or v1 cpu.shares); null: no cgroup.",
                               "example": 10},
                "write_bps": {"type": ["integer", "null"], "minimum": 1048576,
                              "description": "The most bytes per second the archive tools may write to a disk that "
                                             "holds a frozen guest's overlay or base image (a partition's or an "
                                             "LV's disk beneath), for a borg/restic repository or a directory "
                                             "target on the images' disk: the guests' own flushes then no longer "
                                             "queue behind the archive's. A cgroup: v2 io.max, or v1 blkio, which "
                                             "limits the writes a tool submits itself (its fsyncs) and the "
                                             "writeback virtfreeze starts for it (writeback_interval), not the "
                                             "kernel's own; the directory target's in-process copy only on "
                                             "v1. It slows such an archive; a repository on another disk or host "
                                             "is not affected. null: no limit.",
                              "example": 209715200},
                "writeback_interval": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 10,
                                       "description": "Seconds between two starts of the writeback of what the "
                                                      "archive tools (and the directory target's copy) write to "
                                                      "a disk holding a frozen guest's images, while they run: "
                                                      "a repository there then reaches the disk in small steps "
                                                      "instead of in one burst at the tool's final flush, which "
                                                      "the guests' own writes would wait behind (borg 1.2 "
                                                      "flushes a segment only as it closes it). Default 0.025; "
                                                      "null: the kernel decides when.",
                                       "example": 0.025},
            },
        },
        "restore_directories": {
            "type": "array", "items": {"type": "string", "pattern": "^/"},
            "description": "Directories a restore may write disks and other files of a domain into, besides "
                           "--disk-dir, the storage pools' directories and /var/lib/libvirt (an archive naming any "
                           "other place is refused).",
            "example": ["/srv/vms"],
        },
        "verify_directory": {
            "type": ["string", "null"],
            "description": "Scratch space of `verify` (on disk, not tmpfs: a restored archive's disks go there "
                           "unless they are read in place). Unset: state_directory/verify.",
            "example": "/var/lib/virtfreeze/verify",
        },
        "metrics": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "required": ["textfile"],
            "description": "The metrics plugin: per-domain results in node_exporter's textfile format (needs "
                           "prometheus_client). Unset: off. Freeze, thaw, backup and verify each update their "
                           "own series and keep the others.",
            "example": {"textfile": "/var/lib/prometheus/node-exporter/virtfreeze.prom"},
            "properties": {
                "textfile": {"type": "string", "pattern": "^/.*\\.prom$",
                             "description": "The file node_exporter's textfile collector reads (an absolute "
                                            "path ending in .prom, in --collector.textfile.directory).",
                             "example": "/var/lib/prometheus/node-exporter/virtfreeze.prom"},
            },
        },
        "notify": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "description": "The notify plugin: tell people when a domain's freeze, archive, thaw or verify failed "
                           "(and, if asked, when a run succeeded), through Apprise URLs (mail, ntfy, Matrix, "
                           "Slack, webhooks, ...; needs apprise). Unset: off.",
            "example": {"urls_file": "/etc/virtfreeze/notify.urls", "on_success": False},
            "properties": {
                "urls": {"type": "array", "items": {"type": "string"},
                         "description": "Apprise URLs. They often hold tokens: prefer urls_file.",
                         "example": ["ntfys://ntfy.example.org/vm-backups"]},
                "urls_file": {"type": "string", "pattern": "^/",
                              "description": "A file (0600) with one Apprise URL per line; # starts a comment.",
                              "example": "/etc/virtfreeze/notify.urls"},
                "on_success": {"type": "boolean",
                               "description": "Also send one summary when freeze, thaw, backup or verify "
                                              "succeeded for every domain.",
                               "example": False},
            },
        },
        "targets": {
            "type": "object",
            "description": "Named storage targets for `virtfreeze backup`; the other keys are the settings of that "
                           "type, each plugin's own (see `virtfreeze plugins`).",
            "example": {"nightly": {"type": "borg", "repository": "/var/backups/vms.borg",
                                    "passphrase_file": "/etc/virtfreeze/borg.pass"}},
            "additionalProperties": {
                "type": "object",
                "required": ["type"],
                "description": "One storage target.",
                "example": {"type": "directory", "path": "/srv/backup/vms"},
                "properties": {"type": {"type": "string", "description": "Target type: borg, restic, directory, "
                                                                         "or one a plugin adds.", "example": "borg"}},
            },
        },
        "domains": {
            "type": "object",
            "additionalProperties": _DOMAIN_SCHEMA,
            "description": "Per-domain settings, keyed by domain name.",
            "example": {"db1": {"exclude_disks": ["vdb"], "quiesce": "require"}},
        },
    },
}


@dataclass
class DomainSettings:
    exclude_disks: list[str] = field(default_factory=list)
    memory: bool | None = None
    quiesce: str | None = None
    strategy: str | None = None
    export_layout: str | None = None


@dataclass(frozen=True)
class Effective:
    """The settings one domain gets in one run, and where each came from."""

    memory: bool
    quiesce: str
    strategy: str
    sources: dict[str, str]  # setting -> "command line", "domain setting" or "configuration"


@dataclass
class Config:
    connect: str | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    export_directory: Path = Path("/run/virtfreeze/export")
    state_directory: Path = Path("/var/lib/virtfreeze")
    memory_directory: Path | None = None
    overlay_directory: Path | None = None
    export_layout: str = "image"
    segment_size: int = 4 << 20
    memory: bool = False
    quiesce: str = "auto"
    quiesce_timeout: float = 10.0
    jobs: int = 4
    lock_wait: float = 10.0
    commit_ready_timeout: float = 3600.0
    live_converge_timeout: float = 600.0
    commit_bandwidth: int = 100 << 20
    pivot_attempts: int = 5
    strategy: str = "auto"
    iterative_factor: float = 2.0
    iterative_max_rounds: int = 5
    iterative_threshold: int = 1 << 20
    overlay_min_free: int = 1 << 30
    iterative_final_step: str = "auto"
    archive_priority: dict = field(default_factory=lambda: {"nice": 19, "ionice": "idle", "cpu_weight": 10})
    restore_directories: list[str] = field(default_factory=list)
    verify_directory: Path | None = None
    metrics: dict | None = None
    notify: dict | None = None
    targets: dict[str, dict] = field(default_factory=dict)
    domains: dict[str, DomainSettings] = field(default_factory=dict)
    source: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """Every setting as the program understood it, defaults included (for `config check`)."""
        out = {}
        for f in fields(self):
            if f.name == "source":
                continue
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif f.name == "domains":
                value = {name: asdict(s) for name, s in value.items()}
            out[f.name] = value
        return out

    def for_domain(self, name: str) -> DomainSettings:
        return self.domains.get(name, DomainSettings())

    def export_layout_of(self, name: str) -> str:
        """The domain's own export_layout, else the global one."""
        return self.for_domain(name).export_layout or self.export_layout

    def effective(self, name: str, *, memory: bool | None = None, quiesce: str | None = None,
                  strategy: str | None = None) -> Effective:
        """Memory, quiesce and strategy for one domain: the command line (None: not given) wins,
        then the domain's own setting, then the global one."""
        domain = self.for_domain(name)
        values, sources = {}, {}
        for key, asked in (("memory", memory), ("quiesce", quiesce), ("strategy", strategy)):
            for value, source in ((asked, "command line"), (getattr(domain, key), "domain setting"),
                                  (getattr(self, key), "configuration")):
                if value is not None:
                    values[key], sources[key] = value, source
                    break
        return Effective(**values, sources=sources)

    def uri(self, cli_uri: str | None) -> str:
        return cli_uri or os.environ.get("LIBVIRT_DEFAULT_URI") or self.connect or DEFAULT_URI


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "top level"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        keys = ", ".join(repr(k) for k in extra)
        return f"unknown key {keys} at {where}" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    return f"{where}: {error.message}"


def parse(data: Any, source: Path | None = None) -> Config:
    """Validate a loaded YAML document and turn it into a Config."""
    if data is None:
        data = {}
    errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(data), key=lambda e: e.path)
    if errors:
        raise ConfigError(_describe(errors[0]), path=str(source) if source else None,
                          hint="see `virtfreeze --help` and the README's configuration section")
    cfg = Config(source=source)
    for key, value in data.items():
        if key == "domains":
            cfg.domains = {name: DomainSettings(**(s or {})) for name, s in value.items()}
        elif key in ("export_directory", "state_directory") or (
                key in ("overlay_directory", "verify_directory", "memory_directory") and value):
            setattr(cfg, key, Path(value))
        else:
            setattr(cfg, key, value)
    return cfg


def load(path: Path | None) -> Config:
    """Load the config file; the default path is optional, an explicit one is not."""
    explicit = path is not None
    path = Path(path) if explicit else DEFAULT_CONFIG
    try:
        text = path.read_text()
    except FileNotFoundError:
        if explicit:
            raise ConfigError("config file not found", path=str(path), hint="check --config") from None
        return Config()
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror}", path=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {str(e).splitlines()[0]}", path=str(path)) from None
    return parse(data, path)
