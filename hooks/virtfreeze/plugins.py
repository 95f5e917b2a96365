"""The plugin manager: built-in plugins by name, others from the entry-point group.

Set VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD=1 to load only the built-ins (tests do),
and VIRTFREEZE_BLOCK_PLUGINS=name,name to block specific plugins.
"""

from __future__ import annotations

import importlib
import os

import pluggy

from virtfreeze import hookspecs

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
