"""What one invocation works with: config, libvirt connection, journal, plugins."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pluggy

from virtfreeze.config import Config
from virtfreeze.journal import Journal
from virtfreeze.libvirt_boundary import Hypervisor
from virtfreeze.plugins import get_plugin_manager
from virtfreeze.progress import SILENT, Progress


@dataclass
class Runtime:
    config: Config
    uri: str
    _hv: Hypervisor | None = None
    pm: pluggy.PluginManager = field(default_factory=get_plugin_manager)
    progress: Progress = SILENT  # the CLI puts a terminal display here
    command: str | None = None  # the CLI command running (freeze, thaw, backup, ...), for plugins
    reported: bool = False  # virtfreeze_run_finished was told

    @property
    def hv(self) -> Hypervisor:
        if self._hv is None:
            self._hv = Hypervisor(self.uri)
        return self._hv

    @property
    def journal(self) -> Journal:
        return Journal(self.config.state_directory)

    @property
    def state_dir(self) -> Path:
        return self.config.state_directory

    def memory_base(self) -> Path:
        """Where --memory freezes write their memory images, a directory per domain (memory_directory, or
        the state's)."""
        return self.config.memory_directory or self.config.state_directory / "memory"
