"""Progress of the domains a command works on, as the core reports it.

The core says what each domain is doing (`update`) and when it is done
(`finish`); it never writes to the terminal. The CLI installs a display
(`cli.TerminalProgress`: one line per domain, updated in place) when stderr
is a terminal; otherwise this silent one stays, and the logs tell the story.
"""

from __future__ import annotations


class Progress:
    """Receives progress; this base class shows nothing."""

    def update(self, domain: str, text: str) -> None:
        """`domain` is now doing `text` (e.g. "disk vda: committing 45%", "round 2: 3 MiB left")."""

    def finish(self, domain: str) -> None:
        """`domain` is done with this command (its line goes away)."""


SILENT = Progress()
