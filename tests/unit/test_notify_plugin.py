"""The notify plugin sends through the real Apprise library to a real local HTTP endpoint (Apprise's json://)."""

import pytest

import virtfreeze_notify as notify
from virtfreeze.config import parse
from virtfreeze.errors import ConfigError, LeftOnOverlay
from virtfreeze.model import DomainRef


@pytest.fixture
def endpoint(apprise_endpoint):
    yield apprise_endpoint
    notify.virtfreeze_configure(config=parse({}), command="backup")  # the plugin off again


def test_a_failure_arrives_with_domain_phase_and_what_to_do(endpoint, tmp_path):
    url, received = endpoint
    urls = tmp_path / "notify.urls"
    urls.write_text(f"# the team's channel\n{url}\n")
    urls.chmod(0o600)
    notify.virtfreeze_configure(config=parse({"notify": {"urls_file": str(urls)}}), command="thaw")
    notify.virtfreeze_domain_failed(domain=DomainRef("db1", "1" * 32), phase="thaw",
                                    error=LeftOnOverlay("block commit failed", domain="db1", disk="vda"))
    assert len(received) == 1
    msg = received[0]
    assert msg["type"] == "failure" and "thaw of db1" in msg["title"]
    assert "domain 'db1' disk vda: block commit failed" in msg["message"]
    assert "virtfreeze thaw" in msg["message"]  # still on an overlay: what to do


def test_success_is_sent_only_when_asked_and_only_without_errors(endpoint):
    url, received = endpoint
    notify.virtfreeze_configure(config=parse({"notify": {"urls": [url]}}), command="backup")
    report = {"backups": [{"name": "web", "ok": True}], "skipped": {}, "errors": []}
    notify.virtfreeze_run_finished(command="backup", report=report)
    assert received == []
    notify.virtfreeze_configure(config=parse({"notify": {"urls": [url], "on_success": True}}), command="backup")
    notify.virtfreeze_domain_failed(domain=DomainRef("db1", "1" * 32), phase="freeze",
                                    error=LeftOnOverlay("snapshot failed", domain="db1"))
    notify.virtfreeze_run_finished(command="backup", report=dict(report, errors=[{"domain": "db1"}]))
    assert [m["type"] for m in received] == ["failure"]  # db1's own message; no success, nothing twice
    received.clear()
    notify.virtfreeze_run_finished(command="backup", report=report)
    assert len(received) == 1 and received[0]["type"] == "success" and "web" in received[0]["message"]
    # A failed archive (an entry with ok false) or a domain left frozen for another run is no success.
    notify.virtfreeze_run_finished(command="backup", report=dict(report, backups=[{"name": "web", "ok": False}]))
    notify.virtfreeze_run_finished(command="thaw", report={"thawed": [{"name": "web", "held_by": ["run 7"]}],
                                                           "errors": []})
    assert len(received) == 1


def test_a_command_that_failed_before_any_domain_is_told_once_and_without_secrets(endpoint):
    url, received = endpoint
    notify.virtfreeze_configure(config=parse({"notify": {"urls": [url]}}), command="backup")
    notify.virtfreeze_domain_failed(domain=DomainRef("db1", "1" * 32), phase="archive",
                                    error=LeftOnOverlay("restic failed", path="rest:https://u:s3cret@h/repo"))
    notify.virtfreeze_run_finished(command="backup", report={"backups": [], "errors": [
        {"domain": "db1", "message": "restic failed"},
        {"domain": None, "message": "libvirt unreachable at qemu+ssh://root:pw@h/system"}]})
    assert len(received) == 2  # db1 was told already; the domain-less failure once more
    assert "s3cret" not in received[0]["message"] and "***@h/repo" in received[0]["message"]
    assert "libvirt unreachable" in received[1]["message"] and "pw@" not in received[1]["message"]


def test_bad_settings_are_refused_without_showing_tokens(tmp_path):
    with pytest.raises(ConfigError, match="does not understand the URL nope://") as e:
        notify.virtfreeze_configure(config=parse({"notify": {"urls": ["nope://secret-token@x"]}}), command="backup")
    assert "secret-token" not in str(e.value)
    with pytest.raises(ConfigError, match="cannot read it"):
        notify.virtfreeze_configure(config=parse({"notify": {"urls_file": str(tmp_path / "none")}}),
                                    command="backup")
    with pytest.raises(ConfigError, match="no URL"):
        notify.virtfreeze_configure(config=parse({"notify": {"on_success": True}}), command="backup")
