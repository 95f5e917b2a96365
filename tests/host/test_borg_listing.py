"""The borg target's listing and partial extract with the real borg (prepared by `make test`; never
skipped), in a local time zone that is not UTC."""

import json
import os
import subprocess
import time
from datetime import datetime, timezone

import pytest

from tests.unit.test_target_listing import make_export, tree
from virtfreeze.model import DomainRef


def run_tool(argv, **env):
    subprocess.run(argv, check=True, capture_output=True, env=dict(os.environ, **env))


@pytest.fixture
def local_zone_not_utc(monkeypatch):
    """This process and the commands it runs in America/New_York."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_borg_lists_and_extracts_part_of_an_archive(tmp_path, monkeypatch, local_zone_not_utc):
    from virtfreeze_borg import BorgTarget

    monkeypatch.setenv("BORG_BASE_DIR", str(tmp_path / "borg-home"))  # its cache and security dirs
    monkeypatch.setenv("VF_TEST_PASS", "")
    repo = tmp_path / "repo.borg"
    run_tool(["borg", "init", "-e", "none", str(repo)])
    t = BorgTarget("b", {"repository": str(repo), "passphrase_env": "VF_TEST_PASS"})
    for domain in ("web-1", "web"):
        t.archive(DomainRef(domain, "u"), make_export(tmp_path / domain, domain), {"domain": domain})
    run_tool(["borg", "create", f"{repo}::borgmatic-host-2026", str(tmp_path / "web")])  # another tool's
    listed = t.archives()
    assert [(a.domain, a.size) for a in listed] == [("web-1", None), ("web", None)]
    made = datetime.strptime(listed[0].time, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - made).total_seconds()) < 60  # UTC, whatever the local zone
    assert t.list_archives(DomainRef("web", "u")) == [listed[1].archive]
    out = t.extract(listed[0].archive, tmp_path / "out", paths=["manifest.json", "domain.xml", "nvram.fd"])
    assert tree(out) == ["domain.xml", "manifest.json"]
    assert json.loads((out / "manifest.json").read_text()) == {"domain": "web-1"}
    assert tree(t.extract(listed[0].archive, tmp_path / "none", paths=[])) == []
