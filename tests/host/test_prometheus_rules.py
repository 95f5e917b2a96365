"""The Prometheus alert rules in contrib/prometheus, checked and unit-tested
by the real promtool: the rules load, their own promtool tests pass (a 27 h
old backup alerts and a 2 h old one does not, a domain stuck on an overlay,
a first failure, a failed verify), a wrong expectation makes promtool fail,
and the rules only use metrics the metrics plugin writes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES_DIR = Path(__file__).resolve().parents[2] / "contrib" / "prometheus"
RULES = RULES_DIR / "virtfreeze-rules.yml"
RULES_TEST = RULES_DIR / "virtfreeze-rules.test.yml"

# Every metric virtfreeze's metrics plugin writes (the Enums' label names
# are the same as their metric names). A renamed metric must break this test.
METRICS = {
    "virtfreeze_last_success_timestamp_seconds",
    "virtfreeze_last_failure_timestamp_seconds",
    "virtfreeze_failures_total",
    "virtfreeze_freeze_duration_seconds",
    "virtfreeze_thaw_duration_seconds",
    "virtfreeze_archive_duration_seconds",
    "virtfreeze_archive_bytes",
    "virtfreeze_overlay_merged_bytes",
    "virtfreeze_guest_stopped_seconds",
    "virtfreeze_consistency",
    "virtfreeze_strategy",
    "virtfreeze_on_overlay",
    "virtfreeze_frozen_since_timestamp_seconds",
    "virtfreeze_verify_ok",
    "virtfreeze_verify_last_success_timestamp_seconds",
    "virtfreeze_verify_duration_seconds",
}
ALERTS = {"VirtfreezeBackupMissing", "VirtfreezeOnOverlay", "VirtfreezeFailure", "VirtfreezeVerifyFailed"}
METRIC_NAME = re.compile(r"virtfreeze_[a-z_]+")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: it comes with Debian's `prometheus` package "
                    "(scripts/prepare-host.sh installs it)", pytrace=False)
    return path


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_check_rules(promtool):
    proc = run(promtool, "check", "rules", str(RULES))
    assert proc.returncode == 0, f"promtool check rules:\n{proc.stdout}\n{proc.stderr}"
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout, proc.stdout


def test_rule_unit_tests_pass(promtool):
    proc = run(promtool, "test", "rules", str(RULES_TEST))
    assert proc.returncode == 0, f"promtool test rules:\n{proc.stdout}\n{proc.stderr}"
    assert "SUCCESS" in proc.stdout and "FAILED" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_unit_tests_cover_every_alert_firing():
    """The promtool tests expect every alert to fire at least once (and each one stays quiet somewhere)."""
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    evals = [e for t in tests for e in t.get("alert_rule_test", [])]
    assert {e["alertname"] for e in evals if e["exp_alerts"]} == ALERTS
    assert {e["alertname"] for e in evals if not e["exp_alerts"]} >= ALERTS - {"VirtfreezeFailure"}


def wrong_copy(tmp_path: Path, mutate) -> Path:
    """A copy of the promtool test file, with the rules path made absolute and `mutate` applied."""
    doc = yaml.safe_load(RULES_TEST.read_text())
    doc["rule_files"] = [str(RULES_DIR / f) for f in doc["rule_files"]]
    mutate(doc)
    path = tmp_path / "wrong.test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_wrong_expectation_fails(promtool, tmp_path):
    """The promtool tests can fail: one that expects the 26 h alert on the domain backed up 2 h ago does."""
    def expect_healthy_alerts(doc):
        group = next(t for t in doc["tests"] if t["name"] == "backup missing")
        check = next(e for e in group["alert_rule_test"] if e["eval_time"] == "28h")
        check["exp_alerts"].append({
            "exp_labels": {"severity": "critical", "reason": "too_old", "domain": "healthy", "job": "node",
                           "instance": "kvm1:9100"},
            "exp_annotations": {
                "summary": "No virtfreeze backup of healthy on kvm1:9100 for over 26 h",
                "description": "The last successful virtfreeze backup of domain healthy on kvm1:9100 ended 2h 0m 0s ago."},
        })

    proc = run(promtool, "test", "rules", str(wrong_copy(tmp_path, expect_healthy_alerts)))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"promtool passed a wrong expectation:\n{out}"
    assert "FAILED" in out and "alertname: VirtfreezeBackupMissing" in out and 'domain="healthy"' in out, out


def test_wrong_threshold_fails(promtool, tmp_path):
    """The synthetic series sit close to the 26 h threshold: rules waiting 28 h fail the same tests."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["expr"] = rule["expr"].replace("26 * 3600", "28 * 3600")
    assert "28 * 3600" in yaml.safe_dump(doc)
    slack_rules = tmp_path / "slack-rules.yml"
    slack_rules.write_text(yaml.safe_dump(doc, sort_keys=False))

    def use_slack_rules(test_doc):
        test_doc["rule_files"] = [str(slack_rules)]

    proc = run(promtool, "test", "rules", str(wrong_copy(tmp_path, use_slack_rules)))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"promtool passed rules with a 28 h threshold:\n{out}"
    assert "alertname: VirtfreezeBackupMissing" in out and 'domain="stale"' in out, out


def test_rules_use_only_written_metrics():
    """Every virtfreeze_* name in the rules' expressions and annotations, and in the test series, is one the
    metrics plugin writes; each alert has a `for:`, a severity, and annotations naming domain and host."""
    used = set()
    for rule in rules():
        used |= set(METRIC_NAME.findall(rule["expr"]))
        for text in rule.get("annotations", {}).values():
            used |= set(METRIC_NAME.findall(text))
    assert used, "no virtfreeze metric found in the rules"
    assert used <= METRICS, f"the rules use metrics the plugin does not write: {sorted(used - METRICS)}"

    series = {s["series"] for t in yaml.safe_load(RULES_TEST.read_text())["tests"] for s in t["input_series"]}
    in_tests = {m for s in series for m in METRIC_NAME.findall(s)}
    assert in_tests <= METRICS, f"the promtool tests feed metrics the plugin does not write: {sorted(in_tests - METRICS)}"


def test_every_alert_is_complete():
    found = set()
    for rule in rules():
        name = rule["alert"]
        found.add(name)
        assert "for" in rule, f"{name} has no for:"
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, f"{name}: severity"
        for key in ("summary", "description"):
            text = rule.get("annotations", {}).get(key, "")
            assert "$labels.domain" in text and "$labels.instance" in text, f"{name}: {key} must name domain and host"
    assert found == ALERTS
