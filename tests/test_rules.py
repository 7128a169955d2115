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

from monitor.contract import causes, metrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
RULES = DASHBOARDS / "rules.yml"
RULES_TEST = DASHBOARDS / "rules_test.yml"
RUNBOOK = DASHBOARDS / "RUNBOOK.md"
# Every runbook_url is this path in the repository and an anchor; RUNBOOK.md says how to point
# them at where a team hosts it.
RUNBOOK_URL = "dashboards/RUNBOOK.md#"
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


def test_runbook_links_are_a_file_of_this_repository() -> None:
    assert (ROOT / RUNBOOK_URL.split("#")[0]).is_file()
    urls = [r["annotations"]["runbook_url"] for r in alerts(load(RULES))]
    assert urls and all(u.startswith(RUNBOOK_URL) for u in urls)


# The rewrite RUNBOOK.md documents for a team that hosts the runbook elsewhere.
REHOST = (
    "s#runbook_url: dashboards/#"
    "runbook_url: https://git.example.com/ops/gunicorn-monitor/-/blob/main/dashboards/#"
)


def test_the_documented_rewrite_points_every_link_at_another_host(
    promtool: str, tmp_path: Path
) -> None:
    assert f"sed '{REHOST}'" in RUNBOOK.read_text()
    moved = subprocess.run(
        ["sed", REHOST, str(RULES)], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    (tmp_path / RULES.name).write_text(moved)
    assert run(promtool, "check", "rules", tmp_path / RULES.name).returncode == 0
    base = "https://git.example.com/ops/gunicorn-monitor/-/blob/main/"
    original = {r["alert"]: r for r in alerts(load(RULES))}
    for rule in alerts(yaml.safe_load(moved)):
        url = rule["annotations"]["runbook_url"]
        assert url == base + original[rule["alert"]]["annotations"]["runbook_url"], url


# -- the cause groups: rules.yml against monitor/contract/causes.py -----------------------------

# Each alert that acts on a group of the contract, and the (cause, signal) pairs it must page or
# warn on: exactly these, whatever their signal, and a series born at 1 included.
CONTRACT_ALERTS = {
    "GunicornWorkerCrashed": causes.crashed,
    "GunicornWorkerStrayKills": causes.stray,
    "GunicornMonitorMissingEvidence": lambda cause, _: cause in causes.MISSING_EVIDENCE,
}
BIRTH = 10  # minutes: when every series of the generated test is born, at 1


def pair_instance(cause: str, signal_label: str) -> str:
    return f"{cause}/{signal_label}"


def contract_cases(of_causes: tuple[str, ...] = causes.CAUSES) -> dict:
    """A promtool test over every (cause, signal) label pair the exporter may serve.

    Each pair gets its own instance. Case 1: the pair's series is born at 1 at BIRTH, beside
    a series present from the start (a cause outside the contract, which no rule selects): the
    contract alerts fire exactly for the pairs of their group, at once, and resolve 15 minutes
    later. Case 2: every pair rises by one a minute: the unplanned exit rate is exactly the
    UNPLANNED causes'.
    """
    pairs = [(c, s) for c in of_causes for s in sorted(metrics.SIGNALS)]
    born: list[dict] = []
    rising: list[dict] = []
    for cause, sig in pairs:
        labels = f'job="gunicorn", instance="{pair_instance(cause, sig)}"'
        series = f'gunicorn_worker_exits_total{{{labels}, cause="{cause}", signal="{sig}"}}'
        reference = f'gunicorn_worker_exits_total{{{labels}, cause="reference", signal="none"}}'
        born.append({"series": series, "values": f"_x{BIRTH} 1x20"})
        born.append({"series": reference, "values": "0x30"})
        rising.append({"series": series, "values": "0+1x20"})
    names = "|".join(CONTRACT_ALERTS)
    firing = f'count by (alertname, instance) (ALERTS{{alertstate="firing", alertname=~"{names}"}})'
    expected = [
        {"labels": f'{{alertname="{name}", instance="{pair_instance(c, s)}"}}', "value": 1}
        for name, wanted in CONTRACT_ALERTS.items()
        for c, s in pairs
        if wanted(c, s)
    ]
    unplanned = [
        {
            "labels": "instance:gunicorn_worker_unplanned_exits:rate5m"
            f'{{job="gunicorn", instance="{pair_instance(c, s)}"}}',
            "value": 1 / 60,
        }
        for c, s in pairs
        if c in causes.UNPLANNED
    ]
    return {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "every pair born at 1: the contract alerts fire for their group, resolve",
                "interval": "1m",
                "input_series": born,
                "promql_expr_test": [
                    {"expr": firing, "eval_time": f"{BIRTH - 1}m", "exp_samples": []},
                    {"expr": firing, "eval_time": f"{BIRTH}m", "exp_samples": expected},
                    {"expr": firing, "eval_time": f"{BIRTH + 14}m", "exp_samples": expected},
                    {"expr": firing, "eval_time": f"{BIRTH + 15}m", "exp_samples": []},
                ],
            },
            {
                "name": "every pair rising: the unplanned rate counts exactly the UNPLANNED causes",
                "interval": "1m",
                "input_series": rising,
                "promql_expr_test": [
                    {
                        "expr": "instance:gunicorn_worker_unplanned_exits:rate5m > 0",
                        "eval_time": "10m",
                        "exp_samples": unplanned,
                    }
                ],
            },
        ],
    }


def test_the_rules_select_exactly_the_contracts_cause_groups(promtool: str, tmp_path: Path) -> None:
    """No cause or signal list in rules.yml out of step with monitor/contract/causes.py."""
    cases = contract_cases()
    assert cases["tests"][0]["promql_expr_test"][1]["exp_samples"], "no pair expected to fire"
    path = tmp_path / "contract_test.yml"
    path.write_text(yaml.safe_dump(cases))
    result = run(promtool, "test", "rules", path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def test_a_group_out_of_step_with_the_contract_is_caught(promtool: str, tmp_path: Path) -> None:
    """The check above can fail: SIGQUIT dropped from the stop signals of one alert."""
    text = RULES.read_text()
    stops = 'signal=~"SIGTERM|SIGINT|SIGQUIT|SIGHUP"'
    assert text.count(stops) == 1
    (tmp_path / RULES.name).write_text(text.replace(stops, 'signal=~"SIGTERM|SIGINT|SIGHUP"'))
    cases = contract_cases((causes.SIGNAL,))
    cases["rule_files"] = [str(tmp_path / RULES.name)]
    path = tmp_path / "contract_test.yml"
    path.write_text(yaml.safe_dump(cases))
    result = run(promtool, "test", "rules", path)
    assert result.returncode == 1
    assert 'instance="signal/SIGQUIT"' in result.stdout + result.stderr


def test_every_cause_and_signal_the_rules_name_is_in_the_contract() -> None:
    named: dict[str, set[str]] = {"cause": set(), "signal": set()}
    for rule in load(RULES)["groups"]:
        for r in rule["rules"]:
            for label, values in re.findall(r'\b(cause|signal)\s*[=!]~?\s*"([^"]*)"', r["expr"]):
                named[label].update(values.split("|"))
    assert named["cause"] and named["cause"] <= set(causes.CAUSES), named["cause"]
    assert named["signal"] and named["signal"] <= metrics.SIGNALS, named["signal"]
