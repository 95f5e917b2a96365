"""The metrics plugin's textfile: each step changes its own series and keeps the others'; counters count on;
the file is always whole, in the text format node_exporter reads."""

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import virtfreeze_metrics as metrics
from virtfreeze.backup import BackupResult
from virtfreeze.config import parse
from virtfreeze.errors import ConfigError, LeftOnOverlay, VirtfreezeError
from virtfreeze.freeze import FreezeResult
from virtfreeze.model import DomainRef
from virtfreeze.targets import ArchiveResult
from virtfreeze.thaw import ThawResult

WEB = DomainRef("web", "0" * 32)


def _scrape(path: Path) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(path.read_text()) for s in f.samples}


@pytest.fixture
def textfile(tmp_path):
    path = tmp_path / "virtfreeze.prom"
    metrics.virtfreeze_configure(config=parse({"metrics": {"textfile": str(path)}}), command="freeze")
    yield path
    metrics.virtfreeze_configure(config=parse({}), command="freeze")


def test_hook_mode_freeze_then_thaw_in_two_processes_keeps_both(textfile):
    frozen = FreezeResult("web", WEB.uuid, "running", "quiesced", {"vda": "/v/web.qcow2"}, seconds=1.5,
                          downtime_seconds=0.0)
    metrics.virtfreeze_domain_done(domain=WEB, step="freeze", result=frozen, command="freeze")
    got = _scrape(textfile)
    assert got[("virtfreeze_on_overlay", (("domain", "web"),))] == 1
    assert got[("virtfreeze_consistency", (("domain", "web"), ("virtfreeze_consistency", "quiesced")))] == 1
    assert got[("virtfreeze_consistency", (("domain", "web"), ("virtfreeze_consistency", "crash")))] == 0
    assert ("virtfreeze_last_success_timestamp_seconds", (("domain", "web"),)) not in got

    # The thaw runs in another process (hook mode): it reads what the freeze wrote and keeps it.
    code = ("import sys; sys.path[:0] = sys.argv[2:]\n"
            "import virtfreeze_metrics as m\n"
            "from virtfreeze.config import parse\nfrom virtfreeze.model import DomainRef\n"
            "from virtfreeze.thaw import ThawResult\n"
            "m.virtfreeze_configure(config=parse({'metrics': {'textfile': sys.argv[1]}}), command='thaw')\n"
            "r = ThawResult('web', '0' * 32, 'live', 4096, 2.25, downtime_seconds=0.012, frozen_by='freeze', own_freeze=True)\n"
            "m.virtfreeze_domain_done(domain=DomainRef('web', '0' * 32), step='thaw', result=r, command='thaw')\n")
    subprocess.run([sys.executable, "-c", code, str(textfile), *sys.path], check=True)
    got = _scrape(textfile)
    assert got[("virtfreeze_freeze_duration_seconds", (("domain", "web"),))] == 1.5  # the freeze's, kept
    assert got[("virtfreeze_thaw_duration_seconds", (("domain", "web"),))] == 2.25
    assert got[("virtfreeze_overlay_merged_bytes", (("domain", "web"),))] == 4096
    assert got[("virtfreeze_guest_stopped_seconds", (("domain", "web"), ("phase", "thaw")))] == 0.012
    assert got[("virtfreeze_strategy", (("domain", "web"), ("virtfreeze_strategy", "live")))] == 1
    assert got[("virtfreeze_on_overlay", (("domain", "web"),))] == 0
    assert got[("virtfreeze_last_success_timestamp_seconds", (("domain", "web"),))] > 0


def test_leftovers_of_a_run_that_died_are_no_success(textfile):
    # A driver-mode backup that died, and a hook-mode run that died (merged at boot or by another run).
    for leftovers in (ThawResult("web", WEB.uuid, "live", 4096, 1.0, frozen_by="backup", own_freeze=False),
                      ThawResult("web", WEB.uuid, "live", 4096, 1.0, frozen_by="freeze", own_freeze=False)):
        metrics.virtfreeze_domain_done(domain=WEB, step="thaw", result=leftovers, command="thaw")
        got = _scrape(textfile)
        assert got[("virtfreeze_on_overlay", (("domain", "web"),))] == 0
        assert ("virtfreeze_last_success_timestamp_seconds", (("domain", "web"),)) not in got


def test_failures_count_on_and_a_failed_thaw_is_on_an_overlay(textfile):
    for _ in range(2):
        metrics.virtfreeze_domain_failed(domain=WEB, phase="archive", error=VirtfreezeError("borg failed"))
    metrics.virtfreeze_domain_failed(domain=WEB, phase="thaw", error=LeftOnOverlay("commit failed"))
    got = _scrape(textfile)
    assert got[("virtfreeze_failures_total", (("domain", "web"), ("phase", "archive")))] == 2
    assert got[("virtfreeze_failures_total", (("domain", "web"), ("phase", "thaw")))] == 1
    assert got[("virtfreeze_on_overlay", (("domain", "web"),))] == 1
    assert got[("virtfreeze_last_failure_timestamp_seconds", (("domain", "web"),))] > 0
    assert "# TYPE virtfreeze_failures_total counter" in textfile.read_text()
    # A failed verify is in verify_ok and the counter, not in last_failure (that one is about backups).
    before = got[("virtfreeze_last_failure_timestamp_seconds", (("domain", "web"),))]
    metrics.virtfreeze_domain_failed(domain=WEB, phase="verify", error=VirtfreezeError("it crashed"))
    got = _scrape(textfile)
    assert got[("virtfreeze_verify_ok", (("domain", "web"),))] == 0
    assert got[("virtfreeze_failures_total", (("domain", "web"), ("phase", "verify")))] == 1
    assert got[("virtfreeze_last_failure_timestamp_seconds", (("domain", "web"),))] == before


def test_driver_mode_success_needs_every_archive_and_a_thaw_inside_backup_is_not_one(textfile):
    thawed = ThawResult("web", WEB.uuid, "live", 10, 1.0)
    metrics.virtfreeze_domain_done(domain=WEB, step="thaw", result=thawed, command="backup")
    assert ("virtfreeze_last_success_timestamp_seconds", (("domain", "web"),)) not in _scrape(textfile)
    failed = BackupResult("web", WEB.uuid, "crash", [ArchiveResult("nightly", "web-x", 1000, 3.0)],
                          errors=["offsite: restic failed"])
    metrics.virtfreeze_domain_done(domain=WEB, step="backup", result=failed, command="backup")
    got = _scrape(textfile)
    assert got[("virtfreeze_archive_bytes", (("domain", "web"), ("target", "nightly")))] == 1000
    assert got[("virtfreeze_archive_duration_seconds", (("domain", "web"), ("target", "nightly")))] == 3.0
    assert ("virtfreeze_last_success_timestamp_seconds", (("domain", "web"),)) not in got
    ok = BackupResult("web", WEB.uuid, "crash", [ArchiveResult("nightly", "web-y", 2000, 1.0)])
    metrics.virtfreeze_domain_done(domain=WEB, step="backup", result=ok, command="backup")
    assert _scrape(textfile)[("virtfreeze_last_success_timestamp_seconds", (("domain", "web"),))] > 0


def test_a_missing_directory_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        metrics.virtfreeze_configure(config=parse({"metrics": {"textfile": str(tmp_path / "no" / "x.prom")}}),
                                     command="backup")


def test_a_garbled_file_is_written_anew(textfile):
    textfile.write_text("this is not { the text format\n")
    metrics.virtfreeze_domain_failed(domain=WEB, phase="freeze", error=VirtfreezeError("x"))
    assert _scrape(textfile)[("virtfreeze_failures_total", (("domain", "web"), ("phase", "freeze")))] == 1
