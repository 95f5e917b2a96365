"""Stopping gracefully: SIGTERM/SIGHUP let the domains in progress finish (their thaw included).

systemd stops a unit with SIGTERM; dying then would leave a VM on its
overlay until the next run. Helper threads block these signals so that the
kernel delivers them to the main thread, where Python runs the handler at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

# Set once a stop signal arrived: no new domain is started.
stopping = threading.Event()


def _on_stop(signum, _frame) -> None:
    if not stopping.is_set():
        log.warning("%s: finishing the domains in progress (their thaw included); starting no others",
                    signal.Signals(signum).name)
    stopping.set()


@contextlib.contextmanager
def stop_gracefully() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into `stopping` for the length of the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """The stop signals and SIGINT blocked in this thread for the block: a thread started inside inherits
    that mask from its first instruction (signals_to_main_thread in the thread itself comes later)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {*STOP_SIGNALS, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def signals_to_main_thread() -> None:
    """Block the stop signals and SIGINT in the calling helper thread (pool workers, libvirt's event loop)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {*STOP_SIGNALS, signal.SIGINT})
