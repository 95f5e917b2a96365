"""Storage targets: the object each target type is, and the named targets of the config.

A plugin registers a `StorageTarget` subclass per type through the
`virtfreeze_register_targets` hook, into a table the core owns; each
configured target is validated against its type's schema and becomes one
instance, which the core asks to archive, list, check and extract.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import jsonschema

from virtfreeze import runner
from virtfreeze.errors import ConfigError, VirtfreezeError


@dataclass
class ArchiveResult:
    target: str
    archive: str  # the archive, snapshot or directory name in the target
    bytes: int  # bytes read from the export view
    seconds: float
    verified: bool = False  # the target's own listing holds every data file at its full size


    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ArchiveInfo:
    """One virtfreeze archive in a target, as `StorageTarget.archives` lists it."""

    target: str
    archive: str  # what `extract` and `contents` take: the archive, snapshot (short id) or directory name
    domain: str
    time: str  # when it was made: ISO 8601 UTC, whole seconds (as in `archive_name`)
    size: int | None = None  # bytes of the export view it holds, when the target's listing tells

    def to_json(self) -> dict:
        return dict(self.__dict__)


class StorageTarget:
    """One configured storage target. Subclass it per type and register the class.

    Class attributes: ``type`` (the name used in the config's ``type:``) and
    ``schema`` (a JSON schema of the settings: an object, every property with
    a ``description`` and an ``example``, ``additionalProperties: false``).
    An instance has ``name`` (the config's key) and ``settings`` (validated).
    Every method raises `VirtfreezeError` on failure, naming the path.
    """

    type: ClassVar[str]
    schema: ClassVar[dict]

    def __init__(self, name: str, settings: dict[str, Any]):
        self.name = name
        self.settings = settings

    def archive(self, domain, export_dir: Path, manifest: dict) -> ArchiveResult:
        """Archive one frozen domain's export view (`domain` a `DomainRef`, `export_dir` its directory,
        `manifest` the dict of its manifest.json), during `backup`, before the thaw."""
        raise NotImplementedError

    def contents(self, archive: str) -> dict[str, int] | None:
        """What an archive holds, from the target's own listing: path relative to the export directory
        -> bytes (0 for anything that is not a regular file). `backup` checks every new archive
        against the frozen sizes with it. None: this target cannot list (the archive is reported
        as not verified)."""
        return None

    def archives(self) -> list[ArchiveInfo]:
        """Every virtfreeze archive in this target, of every domain, oldest first (empty when none);
        anything else the target holds (another tool's archives) is left out. For the `archives`
        and `restore` commands."""
        raise NotImplementedError

    def list_archives(self, domain) -> list[str]:
        """The archives of one domain (a `DomainRef`) in this target, oldest first (empty when none).
        By default picked from `archives`."""
        names = {domain.name, safe_domain_name(domain.name)}  # names in archives are `archive_name`'s
        return [a.archive for a in self.archives() if a.domain in names]

    def extract(self, archive: str, destination: Path, paths: list[str] | None = None) -> Path:
        """Extract one archive into `destination` (a new directory), laid out as the export view was
        (domain.xml, disks/, manifest.json, ...); nothing is written outside it. Returns it.

        `paths` (relative to the export directory, e.g. ``["manifest.json", "domain.xml"]``; a
        directory brings everything under it) extracts only those, so that a restore can read the
        manifest without fetching the disks; one the archive lacks is simply absent, and an empty
        list extracts nothing. None: the whole archive. Check them with `relative_paths`."""
        raise NotImplementedError

    def in_place(self, archive: str) -> Path | None:
        """A directory laid out as the export view that holds this archive and may be read where it is
        (its integrity checked first), for a verify that reads disks through overlays instead of a
        copy; None (the default): extract it."""
        return None


# -- progress of an archive, for a display ---------------------------------------------------------

ProgressSink = Callable[[int, "int | None"], None]
_progress_sink: contextvars.ContextVar[ProgressSink | None] = contextvars.ContextVar("progress_sink", default=None)


def report_progress(done_bytes: int, total_bytes: int | None = None) -> None:
    """For a plugin's `archive`: `done_bytes` of the export view read so far, of `total_bytes` (None:
    not known). Call it as often as the tool tells (the core throttles what it shows); nothing
    happens when no one listens. Never raises: a display is no reason to fail an archive."""
    sink = _progress_sink.get()
    if sink is not None:
        sink(done_bytes, total_bytes)


def progress_wanted() -> bool:
    """Whether `report_progress` goes anywhere (a terminal shows it): a plugin may ask its tool for
    progress output only then, and leave its output as it was otherwise."""
    return _progress_sink.get() is not None


@contextlib.contextmanager
def progress_to(sink: ProgressSink | None) -> Iterator[None]:
    """Inside the block, `report_progress` in this thread goes to `sink` (None: nowhere). The sink must
    not raise."""
    token = _progress_sink.set(sink)
    try:
        yield
    finally:
        _progress_sink.reset(token)


def tree_bytes(top: Path) -> int:
    """The bytes of the regular files under `top` (symlinks not followed): an archive's total for
    `report_progress` when the tool does not tell."""
    total = 0
    for root, _dirs, files in os.walk(top):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def target_types(pm) -> dict[str, type[StorageTarget]]:
    """The table of target types: every plugin's `virtfreeze_register_targets` registers into it."""
    types: dict[str, type[StorageTarget]] = {}

    def register(cls: type[StorageTarget]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, StorageTarget)):
            raise ConfigError(f"a plugin registered {cls!r}, not a StorageTarget subclass")
        if cls.type in types and types[cls.type] is not cls:
            raise ConfigError(f"two plugins register the target type {cls.type!r}: {types[cls.type].__module__} "
                              f"and {cls.__module__}", hint="block one with VIRTFREEZE_BLOCK_PLUGINS")
        types[cls.type] = cls

    pm.hook.virtfreeze_register_targets(register=register)
    return types


def load_targets(raw: dict[str, Any], pm, source: str | None = None) -> dict[str, StorageTarget]:
    """Check each configured target against its type's schema; one object per target."""
    types = target_types(pm)
    out = {}
    for name, spec in (raw or {}).items():
        spec = dict(spec or {})
        kind = spec.pop("type", None)
        if kind not in types:
            known = ", ".join(sorted(types)) or "none (is plugin autoload switched off?)"
            raise ConfigError(f"target {name!r}: unknown type {kind!r} (known: {known})", path=source)
        schema = types[kind].schema
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(spec), key=lambda e: e.path)
        if errors:
            e = errors[0]
            if e.validator == "additionalProperties":
                extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
                msg = f"unknown key {', '.join(map(repr, extra))} (allowed: {', '.join(sorted(schema['properties']))})"
            else:
                msg = e.message
            raise ConfigError(f"target {name!r} ({kind}): {msg}", path=source)
        for prefix in {k.rsplit("_", 1)[0] for k in spec if k.endswith(("_file", "_env", "_command"))}:
            group = [f"{prefix}_{way}" for way in ("file", "env", "command")]  # see secret_settings()
            given = [k for k in group if k in spec]
            if len(given) > 1 and all(k in schema["properties"] for k in group):
                raise ConfigError(f"target {name!r} ({kind}): set only one of {', '.join(given)}", path=source)
        out[name] = types[kind](name, spec)
    return out


def short_of_data(sizes: dict[str, int], contents: dict[str, int]) -> list[tuple[str, int, int | None]]:
    """The data files an archive lacks: (path, bytes frozen, bytes archived or None when absent).

    `sizes` is the manifest's (relative path -> bytes of the frozen file),
    `contents` the target's listing of the archive (relative path -> bytes).
    """
    return [(path, want, contents.get(path)) for path, want in sorted(sizes.items())
            if contents.get(path) != want]


def describe_shortfall(path: str, want: int, got: int | None) -> str:
    """One phrase for `short_of_data`'s finding."""
    if got is None:
        return f"{path} is missing (frozen: {want} bytes)"
    hint = " (a device node instead of its data?)" if got == 0 else ""
    return f"{path} holds {got} of {want} bytes{hint}"


TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # UTC, whole seconds: archive names and `ArchiveInfo.time`
ARCHIVE_NAME = re.compile(r"(?P<domain>.+)-(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)(?:\.(?P<n>[0-9]+))?")


def safe_domain_name(domain: str) -> str:
    """The domain's name as `archive_name` writes it (no '/' or NUL; libvirt allows neither anyway)."""
    return re.sub(r"[/\0]", "_", domain)


def archive_name(domain: str, when: datetime | None = None) -> str:
    """`{domain}-{UTC timestamp}`, safe as a borg archive or directory name."""
    when = when or datetime.now(timezone.utc)
    return f"{safe_domain_name(domain)}-{when.strftime(TIME_FORMAT)}"


def parse_archive_name(name: str) -> tuple[str, str, int] | None:
    """An `archive_name` taken apart: (domain, UTC time as written, collision number), or None when
    `name` is not one. The domain may hold '-' (the timestamp is the name's end); the directory
    target's `.N` suffix (two archives in one second) is the number, 1 without it."""
    m = ARCHIVE_NAME.fullmatch(name)
    if m is None:
        return None
    try:
        datetime.strptime(m["time"], TIME_FORMAT)
    except ValueError:  # e.g. month 13: not a name virtfreeze made
        return None
    return m["domain"], m["time"], int(m["n"] or 1)


def utc_time(when: datetime) -> str:
    """A time as `ArchiveInfo.time` has it; a naive one is local time (as borg's listings give)."""
    return when.astimezone(timezone.utc).strftime(TIME_FORMAT)


def relative_paths(paths: list[str]) -> list[str]:
    """`extract`'s `paths`, normalised (no "./", no trailing '/', each once, in order); one that is
    absolute or leaves the export directory is an error, so an extract never writes outside its
    destination."""
    if isinstance(paths, str):
        raise TypeError("paths is a list of paths, not one string")
    out: list[str] = []
    for path in paths:
        norm = posixpath.normpath(path) if path else ""
        if norm in ("", ".", "..") or norm.startswith(("/", "../")) or "\0" in norm:
            raise VirtfreezeError(f"{path!r} is not a path inside an archive",
                                  hint="give paths relative to the export directory, e.g. manifest.json")
        if norm not in out:
            out.append(norm)
    return out


def secret_settings(prefix: str, example_file: str, example_env: str, example_command: list[str]) -> dict:
    """Schema properties of the settings `secret_env` reads: `<prefix>_file`, `_env`, `_command`."""
    return {
        f"{prefix}_file": {"type": "string", "description": f"File holding the {prefix}.", "example": example_file},
        f"{prefix}_env": {"type": "string", "description": f"Environment variable holding the {prefix}.",
                          "example": example_env},
        f"{prefix}_command": {"type": "array", "items": {"type": "string"},
                              "description": f"Command (no shell) that prints the {prefix}.",
                              "example": example_command},
    }


def secret_env(settings: dict, prefix: str, env_name: str) -> dict[str, str]:
    """A secret for the backup tool, from a file, another variable or a command — never argv.

    Settings `<prefix>_file`, `<prefix>_env`, `<prefix>_command` fill `env_name`.
    """
    env: dict[str, str] = {}
    if settings.get(f"{prefix}_file"):
        path = settings[f"{prefix}_file"]
        try:
            with open(path) as fh:
                env[env_name] = fh.read().rstrip("\n")
        except OSError as e:
            raise VirtfreezeError(f"cannot read the {prefix} file: {e.strerror}", path=path,
                                  hint=f"fix {prefix}_file in the target's settings") from None
    elif settings.get(f"{prefix}_env"):
        var = settings[f"{prefix}_env"]
        if var not in os.environ:
            raise VirtfreezeError(f"environment variable {var} is not set", hint=f"it holds the {prefix}")
        env[env_name] = os.environ[var]
    elif settings.get(f"{prefix}_command"):
        cmd = settings[f"{prefix}_command"]
        proc = runner.run(cmd, what=f"{prefix}_command", path=cmd[0] if cmd else None,
                          hint=f"fix {prefix}_command in the target's settings")
        env[env_name] = proc.stdout.rstrip("\n")
    return env
