"""Shared fixtures. Host tests (tests/host) get a real libvirtd and guests.

Host tests never skip: if libvirtd cannot be reached, they fail, so CI can
not pass without running them. `make test` prepares the host first.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

HOST_DIR = Path(__file__).parent / "host"
URI = os.environ.get("VIRTFREEZE_TEST_URI", "qemu:///system")


def pytest_collection_modifyitems(items):
    for item in items:
        if HOST_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.host)


_events_started = False


def start_libvirt_event_loop() -> None:
    """Register libvirt's default event loop and run it in a thread (once)."""
    global _events_started
    if _events_started:
        return
    import libvirt

    libvirt.virEventRegisterDefaultImpl()

    def run():
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()
    _events_started = True


@pytest.fixture(scope="session")
def libvirt_conn():
    import libvirt

    start_libvirt_event_loop()
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as e:
        pytest.fail(f"host tests need libvirtd at {URI} (run `make test`, which prepares the host): {e}",
                    pytrace=False)
    yield conn
    conn.close()


@pytest.fixture
def guest_factory(libvirt_conn, tmp_path):
    """Make writing guests; each is destroyed and undefined at teardown, pass or fail."""
    from tests.rig.guest import create_guest

    made = []

    def make(disks=None, **kw):
        workdir = tmp_path / f"guest{len(made)}"
        g = create_guest(libvirt_conn, workdir, disks, **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.remove()
