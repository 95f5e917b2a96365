"""periodic.every: a helper thread ticking while a block runs, named for what it does, stopped with the block."""

from __future__ import annotations

import threading
from pathlib import Path

from virtfreeze import periodic


def test_ticks_until_told_to_stop_and_is_named_for_the_kernel():
    ticks = []
    told = threading.Event()
    seen = {}

    def tick() -> bool:
        me = threading.current_thread()
        seen["comm"] = Path(f"/proc/self/task/{me.native_id}/comm").read_text().strip()
        ticks.append(me.name)
        if len(ticks) == 3:
            told.set()
            return False  # ends the thread early
        return True

    with periodic.every(0.001, tick, "writeback:a-long-domain-name"):
        assert told.wait(10)
    assert ticks == ["writeback:a-long-domain-name"] * 3  # Python's name stays whole (logs)
    assert seen["comm"] == "vf-writeback:a-"  # the kernel's: 15 bytes
    assert not [t for t in threading.enumerate() if t.name.startswith("writeback:a-long")]


def test_leaving_the_block_stops_and_joins_the_thread():
    calls = []
    with periodic.every(3600, lambda: calls.append(1), "idle"):
        pass  # the first tick would come in an hour: leaving must not wait for it
    assert calls == [] and not [t for t in threading.enumerate() if t.name == "idle"]


def test_a_thread_named_for_the_kernel_keeps_at_most_15_bytes():
    from virtfreeze.thread_names import name_this_thread

    seen = []

    def run():
        name_this_thread("virtfreeze-and-a-long-tail")
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == ["virtfreeze-and-"]
