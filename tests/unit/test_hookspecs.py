"""Every hook is documented, and the plugin manager loads what it should."""

import inspect

import pytest

from virtfreeze import hookspecs
from virtfreeze.plugins import BUILTIN_PLUGINS, get_plugin_manager

HOOKS = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("virtfreeze_")]


@pytest.mark.parametrize("hook", HOOKS, ids=lambda f: f.__name__)
def test_hook_is_documented(hook):
    doc = inspect.getdoc(hook) or ""
    assert len(doc.split()) >= 20, f"{hook.__name__}: say when it runs, firstresult or not, what None means"
    assert "firstresult" in doc.lower() or "not firstresult" in doc.lower()
    assert "None" in doc


def test_builtins_registered_by_name(monkeypatch):
    monkeypatch.setenv("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = get_plugin_manager()
    assert set(BUILTIN_PLUGINS) <= {name for name, _ in pm.list_name_plugin()}
    # pluggy calls the last of get_hookimpls() first: live before the trylast offline merge
    names = [i.plugin_name for i in pm.hook.virtfreeze_merge.get_hookimpls()]
    assert names[0] == "offline_commit" and set(names) == {"offline_commit", "live_commit", "iterative_commit"}


def test_plugins_can_be_blocked(monkeypatch):
    monkeypatch.setenv("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("VIRTFREEZE_BLOCK_PLUGINS", "live_commit")
    pm = get_plugin_manager()
    assert pm.is_blocked("live_commit")
    assert "live_commit" not in [i.plugin_name for i in pm.hook.virtfreeze_merge.get_hookimpls()]
