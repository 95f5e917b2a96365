"""Fleet operation on a real host: the metrics plugin's textfile scraped over HTTP by a real node_exporter,
after a driver-mode backup and a hook-mode freeze/thaw of writing guests; a failed archive as a failure (and
as an Apprise notification), a domain left frozen as on an overlay."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.host.helpers import assert_all_acked_present, assert_back_on_base
from tests.host.test_restore import RIG_DIRS
from tests.rig.guest import DiskSpec

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"


@pytest.fixture
def node_exporter(tmp_path):
    """A real node_exporter on 127.0.0.1 reading a textfile directory; yields (directory, scrape)."""
    assert os.access(NODE_EXPORTER, os.X_OK), f"{NODE_EXPORTER} missing: `make test` installs prometheus-node-exporter"
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
                             "--collector.textfile", f"--collector.textfile.directory={textfiles}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # it says when it listens
            if "Listening on" in line:
                break
        else:
            pytest.fail(f"node_exporter exited {proc.wait()} before listening")
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log

        def scrape() -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
            assert "node_textfile_scrape_error 0" in text, text[-2000:]
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("virtfreeze_")}

        yield textfiles, scrape
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _env(vf, **extra):
    env = vf.env(**extra)
    env.pop("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD")  # metrics, notify and the targets are entry-point plugins
    return env


def _dom(name: str, **more) -> tuple:
    return tuple(sorted(dict(domain=name, **more).items()))


def test_driver_and_hook_mode_runs_are_scraped_as_their_json_says(guest_factory, vf, tmp_path, node_exporter):
    textfiles, scrape = node_exporter
    driven = guest_factory([DiskSpec("vda", "qcow2")])
    hooked = guest_factory([DiskSpec("vda", "qcow2")])
    (tmp_path / "dir-target").mkdir()
    vf.write_config(metrics={"textfile": str(textfiles / "virtfreeze.prom")},
                    targets={"dir": {"type": "directory", "path": str(tmp_path / "dir-target")}},
                    restore_directories=[str(driven.workdir), *RIG_DIRS])  # the verify's kernel and sockets
    env = _env(vf)
    for g in (driven, hooked):
        g.watcher.wait_acks(20)

    # Driver mode, with a verify of the new archive.
    t0 = time.time()
    out = json.loads(vf("--json", "backup", "--verify", "--verify-seconds", "0", driven.name, env=env).stdout)
    (b,) = out["backups"]
    (v,) = out["verified"]
    assert b["ok"] and v["ok"]
    got = scrape()
    d = _dom(driven.name)
    assert got[("virtfreeze_archive_bytes", _dom(driven.name, target="dir"))] == b["archives"][0]["bytes"] > 0
    assert got[("virtfreeze_archive_duration_seconds", _dom(driven.name, target="dir"))] == pytest.approx(
        b["archives"][0]["seconds"])
    assert got[("virtfreeze_freeze_duration_seconds", d)] == pytest.approx(b["freeze_seconds"])
    assert got[("virtfreeze_thaw_duration_seconds", d)] == pytest.approx(b["thaw_seconds"])
    assert got[("virtfreeze_overlay_merged_bytes", d)] == b["overlay_bytes"]
    assert got[("virtfreeze_strategy", _dom(driven.name, virtfreeze_strategy=b["strategy"]))] == 1
    assert got[("virtfreeze_consistency", _dom(driven.name, virtfreeze_consistency=b["consistency"]))] == 1
    assert got[("virtfreeze_on_overlay", d)] == 0
    assert t0 <= got[("virtfreeze_last_success_timestamp_seconds", d)] <= time.time()
    assert got[("virtfreeze_verify_ok", d)] == 1
    assert got[("virtfreeze_verify_duration_seconds", d)] == pytest.approx(v["seconds"])
    assert got[("virtfreeze_guest_stopped_seconds", _dom(driven.name, phase="freeze"))] >= 0
    assert ("virtfreeze_failures_total", _dom(driven.name, phase="archive")) not in got

    # Hook mode: freeze and thaw are two processes; each keeps the other's series and the driven domain's.
    frozen = json.loads(vf("--json", "freeze", hooked.name, env=env).stdout)["frozen"][0]
    got = scrape()
    h = _dom(hooked.name)
    assert got[("virtfreeze_on_overlay", h)] == 1  # left frozen while the backup tool reads
    assert got[("virtfreeze_freeze_duration_seconds", h)] == pytest.approx(frozen["seconds"])
    assert got[("virtfreeze_guest_stopped_seconds", _dom(hooked.name, phase="freeze"))] == pytest.approx(
        frozen["downtime_seconds"])
    assert ("virtfreeze_last_success_timestamp_seconds", h) not in got
    assert got[("virtfreeze_archive_bytes", _dom(driven.name, target="dir"))] == b["archives"][0]["bytes"]
    hooked.watcher.wait_acks(5, after=time.monotonic())  # it writes into its overlay meanwhile
    thawed = json.loads(vf("--json", "thaw", hooked.name, env=env).stdout)["thawed"][0]
    got = scrape()
    assert got[("virtfreeze_on_overlay", h)] == 0
    assert got[("virtfreeze_thaw_duration_seconds", h)] == pytest.approx(thawed["seconds"])
    assert got[("virtfreeze_overlay_merged_bytes", h)] == thawed["overlay_bytes"] > 0
    assert got[("virtfreeze_guest_stopped_seconds", _dom(hooked.name, phase="thaw"))] == pytest.approx(
        thawed["downtime_seconds"])
    assert got[("virtfreeze_freeze_duration_seconds", h)] == pytest.approx(frozen["seconds"])  # kept
    assert got[("virtfreeze_last_success_timestamp_seconds", h)] > 0
    for g in (driven, hooked):
        g.watcher.wait_acks(5, after=time.monotonic())
        assert_back_on_base(g, vf)
        assert_all_acked_present(g)


def test_a_failed_archive_is_a_failure_in_metrics_and_a_notification(guest_factory, vf, tmp_path, node_exporter,
                                                                     apprise_endpoint):
    textfiles, scrape = node_exporter
    url, received = apprise_endpoint
    g = guest_factory([DiskSpec("vda", "qcow2")])
    urls = tmp_path / "notify.urls"
    urls.write_text(url + "\n")
    urls.chmod(0o600)
    missing_repo = tmp_path / "no-such-repo.borg"  # never initialised: borg create fails
    vf.write_config(metrics={"textfile": str(textfiles / "virtfreeze.prom")}, notify={"urls_file": str(urls)},
                    targets={"nightly": {"type": "borg", "repository": str(missing_repo),
                                         "passphrase_env": "TEST_BORG_PASSPHRASE"}})
    g.watcher.wait_acks(20)
    out = vf("--json", "backup", g.name, expect=1, env=_env(vf, TEST_BORG_PASSPHRASE="x", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes"))
    (b,) = json.loads(out.stdout)["backups"]
    assert not b["ok"] and b["errors"]
    got = scrape()
    d = _dom(g.name)
    assert got[("virtfreeze_failures_total", _dom(g.name, phase="archive"))] == 1
    assert got[("virtfreeze_last_failure_timestamp_seconds", d)] > 0
    assert ("virtfreeze_last_success_timestamp_seconds", d) not in got
    assert got[("virtfreeze_on_overlay", d)] == 0  # the failed archive was still thawed

    (message,) = received  # sent before the command exited
    assert message["type"] == "failure"
    assert f"archive of {g.name}" in message["title"]
    assert g.name in message["message"] and str(missing_repo) in message["message"]

    # A domain left frozen (a hook-mode freeze whose thaw has not run yet) is on an overlay.
    vf("freeze", g.name, env=_env(vf))
    assert scrape()[("virtfreeze_on_overlay", d)] == 1
    vf("thaw", g.name, env=_env(vf))
    assert scrape()[("virtfreeze_on_overlay", d)] == 0

    # A monitoring problem never keeps a VM on its overlay: with the metrics directory gone, a thaw
    # merges without metrics (a warning); a freeze refuses before it touches anything.
    vf("freeze", g.name, env=_env(vf))
    shutil.rmtree(textfiles)
    out = vf("thaw", g.name, env=_env(vf))
    assert "plugin metrics is off for this thaw" in out.stderr and "no such directory" in out.stderr
    refused = vf("freeze", g.name, expect=2, env=_env(vf))
    assert "metrics.textfile" in refused.stderr
    assert_back_on_base(g, vf)
    assert_all_acked_present(g)
