"""Named storage targets from the config, validated against their plugin's schema."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import jsonschema

from virtfreeze import runner
from virtfreeze.errors import ConfigError, VirtfreezeError


@dataclass(frozen=True)
class Target:
    name: str
    type: str
    settings: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass
class ArchiveResult:
    target: str
    archive: str  # the archive, snapshot or directory name in the target
    bytes: int  # bytes read from the export view
    seconds: float
    verified: bool = False  # the target's own listing holds every data file at its full size


    def to_json(self) -> dict:
        return dict(self.__dict__)


def target_types(pm) -> dict[str, dict]:
    types: dict[str, dict] = {}
    for declared in pm.hook.virtfreeze_target_types():
        types.update(declared or {})
    return types


def load_targets(raw: dict[str, Any], pm, source: str | None = None) -> dict[str, Target]:
    """Check each configured target against its type's schema."""
    types = target_types(pm)
    out = {}
    for name, spec in (raw or {}).items():
        spec = dict(spec or {})
        kind = spec.pop("type", None)
        if kind not in types:
            known = ", ".join(sorted(types)) or "none (is plugin autoload switched off?)"
            raise ConfigError(f"target {name!r}: unknown type {kind!r} (known: {known})", path=source)
        errors = sorted(jsonschema.Draft202012Validator(types[kind]).iter_errors(spec), key=lambda e: e.path)
        if errors:
            e = errors[0]
            if e.validator == "additionalProperties":
                extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
                msg = f"unknown key {', '.join(map(repr, extra))} (allowed: {', '.join(sorted(types[kind]['properties']))})"
            else:
                msg = e.message
            raise ConfigError(f"target {name!r} ({kind}): {msg}", path=source)
        for prefix in {k.rsplit("_", 1)[0] for k in spec if k.endswith(("_file", "_env", "_command"))}:
            group = [f"{prefix}_{way}" for way in ("file", "env", "command")]  # see secret_settings()
            given = [k for k in group if k in spec]
            if len(given) > 1 and all(k in types[kind]["properties"] for k in group):
                raise ConfigError(f"target {name!r} ({kind}): set only one of {', '.join(given)}", path=source)
        out[name] = Target(name, kind, spec)
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


def archive_name(domain: str, when: datetime | None = None) -> str:
    """`{domain}-{UTC timestamp}`, safe as a borg archive or directory name."""
    when = when or datetime.now(timezone.utc)
    safe = re.sub(r"[/\0]", "_", domain)
    return f"{safe}-{when.strftime('%Y-%m-%dT%H:%M:%SZ')}"


def archive_prefix(domain: str) -> str:
    """What every `archive_name` of this domain starts with."""
    return archive_name(domain)[: -len("YYYY-MM-DDTHH:MM:SSZ")]


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
