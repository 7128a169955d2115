"""The alerting rules: promtool accepts them, their unit tests pass, and every alert is tested,
labelled, and linked to its own section of the runbook.

promtool comes from `source scripts/prometheus.sh`; without it these tests fail, never skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
RULES = DASHBOARDS / "rules.yml"
RULES_TEST = DASHBOARDS / "rules_test.yml"
RUNBOOK = DASHBOARDS / "RUNBOOK.md"
RUNBOOK_URL = (
    "https://github.com/gunicorn-monitor/gunicorn-monitor/blob/main/dashboards/RUNBOOK.md#"
)
SEVERITIES = {"critical", "warning", "info"}


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=60, check=False
    )


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def alerts(rules: dict) -> list[dict]:
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


def records(rules: dict) -> list[dict]:
    return [r for g in rules["groups"] for r in g["rules"] if "record" in r]


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_anchors(markdown: str) -> set[str]:
    return {github_anchor(m) for m in re.findall(r"^#{1,6} +(.+)$", markdown, re.MULTILINE)}


def coverage_gaps(rules: dict, tests: dict) -> list[str]:
    """Alerts without a unit-test case where they fire, or without one where they stay silent."""
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test") or []:
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    gaps = []
    for rule in alerts(rules):
        name = rule["alert"]
        if name not in firing:
            gaps.append(f"{name}: no case where it fires")
        if name not in silent:
            gaps.append(f"{name}: no case where it stays silent")
    return gaps


def untested_records(rules: dict, tests: dict) -> list[str]:
    exprs = " ".join(
        check["expr"] for case in tests["tests"] for check in case.get("promql_expr_test") or []
    )
    return [r["record"] for r in records(rules) if r["record"] not in exprs]


def annotation_problems(rules: dict, runbook: str) -> list[str]:
    """Missing severity/summary/description/runbook_url, or a runbook_url without a section."""
    anchors = runbook_anchors(runbook)
    problems = []
    seen_anchors: dict[str, str] = {}
    for rule in alerts(rules):
        name = rule["alert"]
        if not re.fullmatch(r"Gunicorn[A-Z][A-Za-z0-9]*", name):
            problems.append(f"{name}: not CamelCase with the Gunicorn prefix")
        if "for" not in rule:
            problems.append(f"{name}: no for: field")
        if rule.get("labels", {}).get("severity") not in SEVERITIES:
            problems.append(f"{name}: severity not one of {sorted(SEVERITIES)}")
        notes = rule.get("annotations", {})
        if not notes.get("summary"):
            problems.append(f"{name}: no summary")
        if "{{" not in notes.get("description", ""):
            problems.append(f"{name}: no templated description")
        url = notes.get("runbook_url", "")
        if not url.startswith(RUNBOOK_URL):
            problems.append(f"{name}: runbook_url does not start with {RUNBOOK_URL}")
            continue
        anchor = url.removeprefix(RUNBOOK_URL)
        if anchor not in anchors:
            problems.append(f"{name}: RUNBOOK.md has no heading for #{anchor}")
        if anchor in seen_anchors:
            problems.append(f"{name}: shares #{anchor} with {seen_anchors[anchor]}")
        seen_anchors[anchor] = name
    return problems


# -- promtool ---------------------------------------------------------------------------------


def test_promtool_accepts_the_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rules_pass_every_promtool_lint(promtool: str) -> None:
    result = run(promtool, "check", "rules", "--lint=all", "--lint-fatal", RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rule_unit_tests_pass(promtool: str) -> None:
    result = run(promtool, "test", "rules", RULES_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_wrong_expectation_fails_the_unit_tests(promtool: str, tmp_path: Path) -> None:
    """The harness above can fail: one changed number in one expected description is caught."""
    shutil.copy(RULES, tmp_path / RULES.name)
    text = RULES_TEST.read_text()
    assert "at 2.00 per minute" in text
    wrong = text.replace("at 2.00 per minute", "at 3.00 per minute", 1)
    (tmp_path / RULES_TEST.name).write_text(wrong)
    result = run(promtool, "test", "rules", tmp_path / RULES_TEST.name)
    assert result.returncode == 1
    assert "FAILED" in result.stdout + result.stderr


def test_broken_promql_fails_the_check(promtool: str, tmp_path: Path) -> None:
    broken = tmp_path / RULES.name
    broken.write_text(RULES.read_text().replace("sum by (job, instance, cause) (", "sum by (", 1))
    assert run(promtool, "check", "rules", broken).returncode == 1


# -- coverage and documentation ---------------------------------------------------------------


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    rules, tests = load(RULES), load(RULES_TEST)
    assert alerts(rules), "rules.yml defines no alerts"
    assert coverage_gaps(rules, tests) == []


def test_an_alert_without_a_silent_case_is_reported() -> None:
    rules = {"groups": [{"rules": [{"alert": "GunicornX"}, {"alert": "GunicornY"}]}]}
    fires = [{"exp_labels": {"severity": "warning"}}]
    tests = {
        "tests": [
            {"alert_rule_test": [{"alertname": "GunicornX", "exp_alerts": fires}]},
            {"alert_rule_test": [{"alertname": "GunicornX", "exp_alerts": []}]},
            {"alert_rule_test": [{"alertname": "GunicornY", "exp_alerts": fires}]},
        ]
    }
    assert coverage_gaps(rules, tests) == ["GunicornY: no case where it stays silent"]


def test_every_recording_rule_is_unit_tested() -> None:
    rules = load(RULES)
    for rule in records(rules):
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]
    assert untested_records(rules, load(RULES_TEST)) == []


def test_every_alert_is_labelled_and_has_a_runbook_section() -> None:
    assert annotation_problems(load(RULES), RUNBOOK.read_text()) == []


def test_a_runbook_url_without_a_heading_is_reported() -> None:
    rule = {
        "alert": "GunicornWorkerTimeouts",
        "for": "5m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "s",
            "description": "{{ $labels.instance }}",
            "runbook_url": RUNBOOK_URL + "gunicornworkertimeouts",
        },
    }
    rules = {"groups": [{"rules": [rule]}]}
    assert annotation_problems(rules, "# Runbook\n\n## GunicornWorkerTimeouts\n") == []
    assert annotation_problems(rules, "# Runbook\n\n## GunicornWorkerOOMKills\n") == [
        "GunicornWorkerTimeouts: RUNBOOK.md has no heading for #gunicornworkertimeouts"
    ]


def test_the_runbook_explains_how_to_change_thresholds() -> None:
    assert "changing-thresholds" in runbook_anchors(RUNBOOK.read_text())
