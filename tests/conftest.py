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


@pytest.fixture
def libvirt_conn(libvirtd_shared):
    import libvirt

    start_libvirt_event_loop()
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as e:
        pytest.fail(f"host tests need libvirtd at {URI} (run `make test`, which prepares the host): {e}",
                    pytrace=False)
    yield conn
    try:
        conn.close()
    except libvirt.libvirtError:
        pass


@pytest.fixture
def libvirtd_shared(request):
    """Share the host with other tests; a test marked `exclusive` has it alone.

    pytest-xdist runs tests in parallel processes. A test that restarts
    libvirtd, or runs a bare `virtfreeze thaw` (which merges every frozen
    domain on the host), must not run beside the others.
    """
    import fcntl

    from tests.rig.guest import SOCKET_DIR

    SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    exclusive = request.node.get_closest_marker("exclusive") is not None
    with open(SOCKET_DIR / "libvirtd.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


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


@pytest.fixture
def apprise_endpoint():
    """A local HTTP server that Apprise's json:// posts to; yields (its json:// URL, the messages received)."""
    import http.server
    import json

    received: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"json://127.0.0.1:{server.server_address[1]}/", received
    server.shutdown()
