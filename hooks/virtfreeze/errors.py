"""Errors that carry the domain, disk and path they concern, and their exit code.

Only the CLI turns them into a message and an exit status; everything below it
raises these instead of printing.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # failed, nothing left frozen
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_ON_OVERLAY = 3  # a VM is still on an overlay: merge incomplete, state kept
EXIT_BUSY = 4  # another virtfreeze run holds the domain
EXIT_CONNECT = 5  # libvirt could not be reached or refused us
EXIT_WRAPPER_FAILED = 125  # behind-guests itself failed, not its command (as env(1); 126/127: cannot run it)


class VirtfreezeError(Exception):
    """A failure worth one clear line: what, where, and what to do."""

    exit_code = EXIT_FAILED

    def __init__(
        self,
        message: str,
        *,
        domain: str | None = None,
        disk: str | None = None,
        path: str | None = None,
        hint: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.domain = domain
        self.disk = disk
        self.path = path
        self.hint = hint

    def where(self) -> str:
        parts = []
        if self.domain is not None:
            parts.append(f"domain {self.domain!r}")
        if self.disk is not None:
            parts.append(f"disk {self.disk}")
        if self.path is not None:
            parts.append(f"path {self.path!r}")
        return " ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        text = f"{where}: {self.message}" if where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class UsageError(VirtfreezeError):
    """The command line or configuration asks for something that cannot be."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """The configuration file is missing keys, has unknown ones, or bad values."""


class DomainNotFound(UsageError):
    """A named domain does not exist, or a glob matched none."""


class LeftOnOverlay(VirtfreezeError):
    """A domain still runs on a virtfreeze overlay; the journal keeps its state."""

    exit_code = EXIT_ON_OVERLAY


class MergeRefused(VirtfreezeError):
    """libvirt refused a merge strategy before anything changed (e.g. AppArmor, old QEMU)."""


class NotReadyToPivot(VirtfreezeError):
    """A pivot came before the commit was ready (libvirt: "not ready for pivot yet"); wait, then retry."""


class CommitNotReady(VirtfreezeError):
    """An active commit did not become ready to pivot in time: the guest writes faster than it copies."""


class DomainBusy(VirtfreezeError):
    """Another virtfreeze run is working on this domain right now."""

    exit_code = EXIT_BUSY


class ConnectionFailed(VirtfreezeError):
    """libvirt could not be reached, or refused this user."""

    exit_code = EXIT_CONNECT
