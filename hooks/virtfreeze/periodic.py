"""A helper thread doing one small thing every so often while a block runs (writeback kicks, syncs)."""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

from virtfreeze import signals
from virtfreeze.thread_names import name_this_thread


@contextlib.contextmanager
def every(interval: float, tick: Callable[[], bool | None], name: str,
          setup: Callable[[], None] | None = None) -> Iterator[None]:
    """While inside, call `tick()` every `interval` seconds in a daemon thread (`setup()` first, in that
    thread); a tick returning False ends it early. The thread starts with the stop signals blocked (they
    are the main thread's); leaving the block stops it and waits for it. The kernel knows the thread as
    "vf-" + `name` (its first 15 bytes: what top -H, ps -L and a scheduler trace show)."""
    stop = threading.Event()

    def run() -> None:
        name_this_thread(f"vf-{name}")
        if setup is not None:
            setup()
        while not stop.wait(interval):
            if tick() is False:
                return

    thread = threading.Thread(target=run, name=name, daemon=True)
    with signals.held():
        thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
