"""The Grafana dashboard: generated from code, importable, and asking only for metrics we export."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from monitor.contract import causes, metrics

ROOT = Path(__file__).resolve().parents[1]
BUILDER = ROOT / "dashboards" / "build_dashboard.py"
COMMITTED = ROOT / "dashboards" / "gunicorn.json"

# The metric contract, written out here on purpose: a dashboard query may only use these names
# (histograms also as _bucket/_sum/_count) and only these labels (plus job and instance).
COUNTERS = {
    "gunicorn_worker_exits_total": {"cause", "signal"},
    "gunicorn_worker_aborts_total": set(),
    "gunicorn_worker_spawns_total": set(),
    "gunicorn_worker_restarts_total": set(),
    "gunicorn_master_reloads_total": set(),
    "gunicorn_worker_cpu_seconds_total": {"worker"},
    "gunicorn_exporter_files_skipped_total": set(),
    "gunicorn_exporter_errors_total": {"kind"},
    "gunicorn_worker_timeouts_total": {"phase"},
}
GAUGES = {
    "gunicorn_last_deploy_timestamp_seconds": set(),
    "gunicorn_up": set(),
    "gunicorn_workers": set(),
    "gunicorn_workers_desired": set(),
    "gunicorn_worker_memory_bytes": {"worker", "type"},
    "gunicorn_worker_start_time_seconds": {"worker"},
    "gunicorn_master_memory_bytes": {"type"},
    "gunicorn_master_start_time_seconds": set(),
    "gunicorn_build_info": {"version", "worker_class"},
    "gunicorn_exporter_scrape_duration_seconds": set(),
    "gunicorn_workers_stuck_booting": set(),
    "gunicorn_master_heartbeat_age_seconds": set(),
}
HISTOGRAMS = {
    "gunicorn_worker_lifetime_seconds": {"cause"},
    "gunicorn_worker_exit_memory_bytes": {"cause"},
    "gunicorn_worker_boot_seconds": set(),
}
CONTRACT: dict[str, set[str]] = {**COUNTERS, **GAUGES}
for _name, _labels in HISTOGRAMS.items():
    CONTRACT[f"{_name}_bucket"] = _labels | {"le"}
    CONTRACT[f"{_name}_sum"] = _labels
    CONTRACT[f"{_name}_count"] = _labels
COMMON_LABELS = {"job", "instance"}

PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
PROMQL_KEYWORDS |= {"group_left", "group_right", "inf", "nan"}


def load_builder():
    spec = importlib.util.spec_from_file_location("build_dashboard", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = load_builder()


@pytest.fixture(scope="module")
def dash() -> dict:
    return json.loads(COMMITTED.read_text())


def panels(dash: dict) -> list[dict]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def targets(dash: dict) -> list[dict]:
    return [t for p in panels(dash) for t in p.get("targets", [])]


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, matcher text) for every `name{...}` in an expression."""
    return re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr)


def bare_names(expr: str) -> list[str]:
    """Identifiers that can only be metric names: not a function, keyword, label or string."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = re.findall(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", text)
    return [n for n in names if n.lower() not in PROMQL_KEYWORDS]


def grouping_labels(expr: str) -> set[str]:
    found = re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
    return {label.strip() for group in found for label in group.split(",") if label.strip()}


def made_labels(expr: str) -> set[str]:
    """Labels the expression itself makes, with label_join or label_replace."""
    return set(re.findall(r'\blabel_(?:join|replace)\(.*?,\s*"(\w+)"', expr))


def matcher_labels(matchers: str) -> set[str]:
    return set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))


# -- (a) the committed JSON is what the code generates ----------------------------------------


def test_committed_dashboard_is_what_the_code_generates():
    result = subprocess.run(
        [sys.executable, str(BUILDER), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


def test_check_reports_a_stale_dashboard_in_one_line(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "gunicorn.json"
    stale.write_text(COMMITTED.read_text().replace('"Gunicorn workers"', '"Edited by hand"'))
    monkeypatch.setattr(builder, "OUTPUT", stale)
    assert builder.main(["--check"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_generation_is_deterministic():
    assert builder.render(builder.build()) == builder.render(builder.build())


# -- (b) structure: importable into any Grafana ------------------------------------------------


def test_panel_ids_are_unique(dash):
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_panels_fit_the_24_column_grid_without_overlapping(dash):
    occupied: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0, p["title"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & occupied, f"{p['title']} overlaps another panel"
        occupied |= cells


def test_every_target_has_ref_id_and_expr(dash):
    assert targets(dash)
    for p in panels(dash):
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t.get("refId") and t.get("expr"), p["title"]


def test_every_datasource_is_the_datasource_variable(dash):
    def refs(node):
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                yield node["datasource"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = list(refs({k: v for k, v in dash.items() if k != "__inputs"}))
    assert found
    for ref in found:
        if ref.get("type") == "grafana":  # the built-in annotations of every dashboard
            assert ref["uid"] == "-- Grafana --"
        else:
            assert ref == {"type": "prometheus", "uid": "${datasource}"}
    for p in panels(dash):
        assert p["datasource"]["uid"] == "${datasource}", p["title"]


def test_import_asks_for_a_prometheus_datasource(dash):
    (ds_input,) = dash["__inputs"]
    assert ds_input["name"] == "DS_PROMETHEUS"
    assert ds_input["type"] == "datasource" and ds_input["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"


def test_job_and_instance_variables_come_from_gunicorn_up(dash):
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    for name in ("job", "instance"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"]["uid"] == "${datasource}"
        assert var["query"].startswith("label_values(gunicorn_up")
        assert var["query"].endswith(f", {name})")
        assert var["includeAll"] and var["allValue"] == ".*"


def test_deploys_are_annotated(dash):
    (deploys,) = [a for a in dash["annotations"]["list"] if a.get("expr")]
    assert "gunicorn_last_deploy_timestamp_seconds" in deploys["expr"]
    assert deploys["datasource"]["uid"] == "${datasource}"


# -- (c) only contract metrics, always scoped by $job and $instance ----------------------------


def test_every_selector_is_a_contract_metric_scoped_by_job_and_instance():
    for expr in builder.raw_queries():
        assert selectors(expr), expr
        for name, matchers in selectors(expr):
            assert name in CONTRACT, f"{name} is not in the metric contract: {expr}"
            assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, expr
            assert matcher_labels(matchers) <= CONTRACT[name] | COMMON_LABELS, expr


def test_no_metric_is_used_without_a_selector():
    for expr in builder.raw_queries():
        names = bare_names(expr)
        assert names == [name for name, _ in selectors(expr)], expr


def test_queries_group_only_by_labels_the_metrics_have():
    for expr in builder.raw_queries():
        labels = set(COMMON_LABELS)
        for name, _ in selectors(expr):
            labels |= CONTRACT[name]
        assert grouping_labels(expr) <= labels | made_labels(expr), expr


def test_the_exits_panels_count_exits_as_the_alerts_do(dash):
    """increase() alone, and a series born at 1 (a first SIGILL) newborn inside the window."""
    (panel,) = [p for p in panels(dash) if p["title"] == "Worker exits by cause"]
    expr = panel["targets"][0]["expr"]
    assert expr == builder.exits_rate("cause")
    exits = 'gunicorn_worker_exits_total{job=~"$job",instance=~"$instance"}'
    assert f"increase({exits}[$__rate_interval])" in expr
    assert f"count_over_time({exits}[$__rate_interval]) < on (job, instance)" in expr
    assert panel["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    for title in ("Worker exits by group", "Exits in range by group"):
        (panel,) = [p for p in panels(dash) if p["title"] == title]
        assert "count_over_time(" in panel["targets"][0]["expr"], title


def test_the_heartbeat_age_is_shown(dash):
    shown = [p["title"] for p in panels(dash) if "heartbeat_age" in json.dumps(p["targets"])]
    assert shown == ["Master heartbeat age", "Master heartbeat age"]  # the stat and the graph


# -- (c2) the exit groups are the contract's ----------------------------------------------------


def contract_group(cause: str, signal_label: str) -> str:
    """The group an exit belongs to, by monitor/contract/causes.py."""
    if causes.crashed(cause, signal_label):
        return "crashes"
    if causes.stray(cause, signal_label):
        return "stray kills"
    for name, group in (
        ("planned", causes.PLANNED),
        ("missing evidence", causes.MISSING_EVIDENCE),
        ("after master death", causes.AFTER_MASTER_DEATH),
        ("other unplanned", causes.UNPLANNED),
    ):
        if cause in group:
            return name
    raise AssertionError(f"{cause} is in no group of the contract")


PAIRS = [(c, s) for c in causes.CAUSES for s in sorted(metrics.SIGNALS)]


def test_every_exit_falls_in_the_group_the_contract_gives_it():
    wrong = [(c, s, builder.group_of(c, s)) for c, s in PAIRS]
    wrong = [(c, s, g) for c, s, g in wrong if g != contract_group(c, s)]
    assert wrong == []
    assert {name for name, _ in builder.EXIT_GROUPS} == {contract_group(c, s) for c, s in PAIRS}


def test_prometheus_groups_the_exits_as_the_contract_does(promtool, tmp_path):
    """The group panel's own PromQL, by promtool, on every (cause, signal) pair, each rising by
    one a minute on its own instance; and a SIGILL born at 1 on another instance."""
    series = [
        {
            "series": f'gunicorn_worker_exits_total{{job="g", instance="{c}/{s}", cause="{c}", '
            f'signal="{s}"}}',
            "values": "0+1x10",
        }
        for c, s in PAIRS
    ]
    series += [
        {
            "series": 'gunicorn_worker_exits_total{job="g", instance="new", cause="unknown", '
            'signal="none"}',
            "values": "0x10",
        },
        {
            "series": 'gunicorn_worker_exits_total{job="g", instance="new", cause="signal", '
            'signal="SIGILL"}',
            "values": "_x9 1",
        },
    ]
    sizes: dict[str, int] = {}
    for c, s in PAIRS:
        sizes[contract_group(c, s)] = sizes.get(contract_group(c, s), 0) + 1
    # Each pair rose by 5 in the 5 minutes; the SIGILL, born inside them, counts its 1.
    expected = [
        {"labels": f'{{group="{name}"}}', "value": n * 5 + (1 if name == "crashes" else 0)}
        for name, n in sizes.items()
    ]
    # 5m windows ($__rate_interval, $__range) over samples a minute apart: increase() is exact.
    case = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": builder.substitute(builder.exits_by_group("$__range")),
                        "eval_time": "10m",
                        "exp_samples": expected,
                    }
                ],
            }
        ],
    }
    path = tmp_path / "groups_test.yml"
    path.write_text(yaml.safe_dump(case))
    result = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


# -- (d) every expression parses --------------------------------------------------------------


def check_rules(promtool: str, exprs: list[str], path: Path) -> subprocess.CompletedProcess:
    rules = [{"record": f"dashboard:query_{i:02d}", "expr": e} for i, e in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )


def test_dashboard_queries_are_substituted():
    queries = builder.dashboard_queries()
    assert len(queries) == len(builder.raw_queries())
    for expr in queries:
        assert "$" not in expr, expr
        assert 'job=~".*",instance=~".*"' in expr


def test_every_expression_parses_with_promtool(promtool, tmp_path):
    queries = builder.dashboard_queries()
    result = check_rules(promtool, queries, tmp_path / "dashboard_rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_promtool_rejects_a_broken_expression(promtool, tmp_path):
    broken = ['sum by (cause (increase(gunicorn_worker_exits_total{job=~".*"}[5m]))']
    result = check_rules(promtool, broken, tmp_path / "broken_rules.yml")
    assert result.returncode != 0
