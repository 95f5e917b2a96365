"""The plugin manager: built-in plugins by name, others from the entry-point group.

Set VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD=1 to load only the built-ins (tests do),
and VIRTFREEZE_BLOCK_PLUGINS=name,name to block specific plugins.
"""

from __future__ import annotations

import importlib
import logging
import os

import pluggy

from virtfreeze import hookspecs
from virtfreeze.logs import domain_log

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "virtfreeze"
BUILTIN_PLUGINS = {
    "live_commit": "virtfreeze.merge_live",
    "iterative_commit": "virtfreeze.merge_iterative",
    "offline_commit": "virtfreeze.merge_offline",
}


def get_plugin_manager() -> pluggy.PluginManager:
    """A fresh plugin manager for one invocation."""
    pm = pluggy.PluginManager("virtfreeze")
    pm.add_hookspecs(hookspecs)
    blocked = {b.strip() for b in os.environ.get("VIRTFREEZE_BLOCK_PLUGINS", "").split(",") if b.strip()}
    for name in blocked:
        pm.set_blocked(name)
    for name, module in BUILTIN_PLUGINS.items():
        if name not in blocked:
            pm.register(importlib.import_module(module), name=name)
    if not os.environ.get("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD"):
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


def describe_plugins(pm: pluggy.PluginManager | None = None) -> list[dict]:
    """Name, origin (built-in or distribution), hooks and target types of each loaded plugin."""
    pm = pm or get_plugin_manager()
    dists = {id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(c.name for c in pm.get_hookcallers(plugin) or [])
        registered: list = []
        if hasattr(plugin, "virtfreeze_register_targets"):
            plugin.virtfreeze_register_targets(register=registered.append)
        types = sorted(cls.type for cls in registered)
        source = "built-in" if name in BUILTIN_PLUGINS else f"entry point of {dists.get(id(plugin), '?')}"
        rows.append({"name": name, "source": source, "module": getattr(plugin, "__file__", None),
                     "hooks": hooks, "target_types": types})
    return rows


# Commands that start backups: a plugin that cannot work stops them before anything changes. Every
# other command (thaw above all: it must merge, whatever else is broken) goes on without that plugin.
REFUSING_COMMANDS = {"freeze", "backup", "verify", "check"}


def configure(pm: pluggy.PluginManager, config, command: str | None) -> None:
    """Call each plugin's virtfreeze_configure; a refusal (ConfigError) stops only the commands that
    start backups, and is a warning elsewhere (the plugin then stays off)."""
    from virtfreeze.errors import ConfigError

    given = {"config": config, "command": command}
    for impl in pm.hook.virtfreeze_configure.get_hookimpls():
        try:
            impl.function(**{k: given[k] for k in impl.argnames})
        except ConfigError as e:
            if command in REFUSING_COMMANDS:
                raise
            log.warning("plugin %s is off for this %s: %s", impl.plugin_name, command, e)


def tell(pm: pluggy.PluginManager, hook: str, about: str | None, **kwargs) -> None:
    """Call a reporting hook (results, failures: for metrics and alerts); a plugin's bug is logged,
    for the domain named `about`, and never changes the outcome."""
    try:
        getattr(pm.hook, hook)(**kwargs)
    except Exception as e:  # noqa: BLE001 - any plugin bug
        domain_log(log, about).warning("a %s hook raised %s: %s", hook, type(e).__name__, e)


def report_done(pm: pluggy.PluginManager, domain, step: str, result, command: str | None) -> None:
    tell(pm, "virtfreeze_domain_done", domain.name, domain=domain, step=step, result=result, command=command)


def report_failure(pm: pluggy.PluginManager, domain, phase: str, error: Exception) -> None:
    tell(pm, "virtfreeze_domain_failed", domain.name, domain=domain, phase=phase, error=error)
