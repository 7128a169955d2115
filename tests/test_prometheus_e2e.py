"""The alerts and the dashboard against a real Prometheus scraping the real exporter.

One stack per module: a Gunicorn master (sync worker, 2 workers, --timeout 2) started with the
project's gunicorn.conf.py, the gunicorn-monitor sidecar reading its directory, and Prometheus
2.42 on loopback scraping the sidecar every second as job "gunicorn" and evaluating a test copy
of dashboards/rules.yml every second. The copy differs from the file only in its `for:` lines,
each divided by 60 (a minute becomes a second); every expression is byte-identical.

Two stacks, one per episode, each a module fixture:
  1. a deploy: three HUPs (six `reload` exits), which must fire nothing;
  2. a timeout storm on a master Prometheus has watched since before the storm, with no deploy
     in its series: three rounds of two concurrent /sleep?s=60 requests, six WORKER TIMEOUTs,
     which fire GunicornWorkerTimeouts and the outside-deploy alert; then one HUP, after which
     every dashboard panel has data (the deploy annotation included).

Prometheus is the binary from `source scripts/prometheus.sh`; without it these tests fail.
"""

from __future__ import annotations

import importlib.util
import math
import signal
import threading
import time
from dataclasses import dataclass, field

import pytest
import yaml

from tests.harness import ROOT, Exporter, Master, exits, http_get, value, wait_for
from tests.prometheus import Prometheus, binary, shorten_for

RULES = ROOT / "dashboards" / "rules.yml"
BUILDER = ROOT / "dashboards" / "build_dashboard.py"
JOB = "gunicorn"
HUPS = 3
STORM_ROUNDS = 3
WORKERS = 2
OUTSIDE_DEPLOY = "GunicornWorkerTerminationsOutsideDeploy"
TIMEOUT_RATE = 'instance_cause:gunicorn_worker_exits:rate5m{cause="timeout"} * 60'


def load_builder():
    spec = importlib.util.spec_from_file_location("build_dashboard", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rules_by_name(text: str) -> dict[str, dict]:
    data = yaml.safe_load(text)
    return {r.get("alert") or r["record"]: r for g in data["groups"] for r in g["rules"]}


@dataclass
class Stack:
    master: Master
    exporter: Exporter
    prom: Prometheus
    instance: str
    notes: dict = field(default_factory=dict)

    def why(self, what: object = "") -> str:
        """Context for an assertion message: what was seen, and the tail of Prometheus' log."""
        return f"{what}\n{self.prom.tail()}"

    def sample(self, expr: str) -> float | None:
        """The value of a one-series expression, or None while it has no result."""
        result = self.prom.query(expr)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def wait(self, condition, timeout: float, what: str, detail=None) -> None:
        """wait_for, failing with what was last seen (`detail()`) and the tail of the log."""
        try:
            wait_for(condition, timeout, what)
        except AssertionError as e:
            seen = f"\nlast seen: {detail()}" if detail else ""
            raise AssertionError(self.why(f"{e}{seen}")) from None

    def settle(self, since: float, evaluations: int = 3) -> None:
        self.wait(lambda: self.prom.evaluated_since(since, evaluations), 15, "rule evaluations")

    def alert_history(self, start: float, end: float) -> list[dict]:
        """Every ALERTS series (pending or firing) at any evaluation between start and end."""
        data = self.prom.api("query_range", query="ALERTS", start=start, end=end, step=1)
        return data["result"]


@dataclass
class Episode:
    start: float
    end: float
    alerts: list[dict]
    rules: list[dict]
    history: list[dict]


def _names(alerts: list[dict]) -> list[tuple[str, str]]:
    return sorted((a["labels"]["alertname"], a["state"]) for a in alerts)


def _stack(tmp_path_factory):
    exe = binary("prometheus")
    if exe is None:
        pytest.fail("prometheus not found: run `source scripts/prometheus.sh`", pytrace=False)
    tmp = tmp_path_factory.mktemp("prometheus-e2e")
    shared = tmp / "multiproc"
    shared.mkdir()
    rules = tmp / "rules.yml"
    rules.write_text(shorten_for(RULES.read_text()))

    master = Master(shared, worker="sync", workers=WORKERS, env={"GUNICORN_TIMEOUT": "2"})
    exporter = Exporter(shared)
    instance = f"127.0.0.1:{exporter.port}"
    prom = Prometheus(tmp / "prometheus", [instance], [rules], JOB)
    try:
        master.start()
        exporter.start()
        prom.start(exe)
        s = Stack(master, exporter, prom, instance)
        # Prometheus 2.42 syncs its targets about 5 s after start: then the first scrape lands.
        s.wait(lambda: s.sample(f'up{{job="{JOB}"}}') == 1, 30, "the first scrape")
        # Until then absent(up{job=~".*gunicorn.*"}) held GunicornExporterDown pending: wait for
        # the evaluations that resolve it, so that each episode starts from a quiet Prometheus.
        s.settle(time.time())
        s.wait(lambda: not prom.alerts(), 15, "no alerts at rest", lambda: _names(prom.alerts()))
        yield s
    finally:
        prom.stop()
        exporter.kill()
        master.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from _stack(tmp_path_factory)


@pytest.fixture(scope="module")
def storm_stack(tmp_path_factory):
    yield from _stack(tmp_path_factory)


@pytest.fixture(scope="module")
def deployed(stack) -> Episode:
    """Three HUPs, each waited for until the new workers run and the old ones are gone."""
    m, e = stack.master, stack.exporter
    start = time.time()
    for _ in range(HUPS):
        old = set(m.worker_pids())
        stack.notes["last_hup"] = time.time()
        m.signal(signal.SIGHUP)
        m.wait_workers(WORKERS, exclude=old, timeout=30)
    want = {("reload", "SIGTERM"): float(HUPS * WORKERS)}
    wait_for(lambda: exits(e.scrape()) == want, 30, f"exporter shows {want}")
    stack.wait(
        lambda: stack.sample("gunicorn_master_reloads_total") == HUPS,
        15,
        "Prometheus ingested the reloads",
        lambda: stack.sample("gunicorn_master_reloads_total"),
    )
    end = time.time()
    stack.settle(end)
    return Episode(
        start, end, stack.prom.alerts(), stack.prom.rules(), stack.alert_history(start, time.time())
    )


def _background_get(url: str) -> threading.Thread:
    t = threading.Thread(target=http_get, args=(url, 60), daemon=True)
    t.start()
    return t


def _timeouts(exporter: Exporter) -> float:
    # Mostly SIGABRT; a worker still unwinding from its SIGABRT at the master's next check gets
    # Gunicorn's SIGKILL, and is a timeout all the same.
    return sum(n for (cause, _), n in exits(exporter.scrape()).items() if cause == "timeout")


@pytest.fixture(scope="module")
def storm(storm_stack) -> Episode:
    """Three rounds of two concurrent requests sleeping past --timeout 2: six WORKER TIMEOUTs."""
    stack = storm_stack
    m, e = stack.master, stack.exporter
    start = time.time()
    for n in range(1, STORM_ROUNDS + 1):
        old = set(m.worker_pids())
        for _ in range(WORKERS):
            _background_get(m.url + "/sleep?s=60")
        timeouts = float(n * WORKERS)
        stack.wait(
            lambda t=timeouts: _timeouts(e) == t,
            30,
            f"{timeouts} timeouts",
            lambda: exits(e.scrape()),
        )
        m.wait_workers(WORKERS, exclude=old, timeout=30)
    total = STORM_ROUNDS * WORKERS
    stored = 'sum(gunicorn_worker_exits_total{cause="timeout"})'
    stack.wait(
        lambda: stack.sample(stored) == total,
        15,
        "Prometheus ingested the timeouts",
        lambda: stack.sample(stored),
    )

    def both_firing() -> bool:
        names = _names(stack.prom.alerts())
        return {("GunicornWorkerTimeouts", "firing"), (OUTSIDE_DEPLOY, "firing")} <= set(names)

    # for: 5m and 10m in rules.yml are 5s and 10s in the test copy.
    stack.wait(
        both_firing,
        40,
        "GunicornWorkerTimeouts and the outside-deploy alert firing",
        lambda: (_names(stack.prom.alerts()), stack.prom.query(TIMEOUT_RATE)),
    )
    end = time.time()
    stack.settle(end)
    return Episode(
        start, end, stack.prom.alerts(), stack.prom.rules(), stack.alert_history(start, time.time())
    )


# -- the test copy of the rules -----------------------------------------------------------------


def test_the_test_copy_differs_only_in_for_durations():
    original = RULES.read_text()
    copy = shorten_for(original)
    old_lines, new_lines = original.splitlines(), copy.splitlines()
    assert len(old_lines) == len(new_lines)
    changed = [(a, b) for a, b in zip(old_lines, new_lines, strict=True) if a != b]
    assert changed, "no for: duration was shortened"
    assert all(a.strip().startswith("for:") and b.strip().startswith("for:") for a, b in changed)

    old, new = rules_by_name(original), rules_by_name(copy)
    assert old.keys() == new.keys()
    for name, rule in old.items():
        assert new[name]["expr"] == rule["expr"], name  # byte-identical expressions
        assert {k: v for k, v in new[name].items() if k != "for"} == {
            k: v for k, v in rule.items() if k != "for"
        }, name
    assert new["GunicornWorkerTimeouts"]["for"] == "5s"
    assert new[OUTSIDE_DEPLOY]["for"] == "10s"


# -- 1. a deploy fires nothing ------------------------------------------------------------------


def test_a_hup_deploy_fires_nothing(stack, deployed):
    assert deployed.alerts == [], stack.why(f"alerts after the deploy: {_names(deployed.alerts)}")
    # Not only at the end: no alert was pending or firing at any evaluation of the deploy.
    seen = sorted({(s["metric"]["alertname"], s["metric"]["alertstate"]) for s in deployed.history})
    assert seen == [], stack.why(f"ALERTS during the deploy: {seen}")

    # The deploy itself is visible to Prometheus: reload exits, reloads, the deploy mark.
    reload_exits = stack.sample('sum(gunicorn_worker_exits_total{cause="reload"})')
    assert reload_exits == HUPS * WORKERS, stack.why()
    assert stack.sample("gunicorn_master_reloads_total") == HUPS, stack.why()
    last_deploy = stack.sample("gunicorn_last_deploy_timestamp_seconds")
    assert last_deploy is not None and last_deploy >= stack.notes["last_hup"] - 0.01, stack.why()
    assert stack.sample(f'up{{job="{JOB}",instance="{stack.instance}"}}') == 1


def test_every_rule_is_loaded_and_evaluates_without_error(stack, storm_stack, deployed, storm):
    expected = rules_by_name(RULES.read_text())
    for where, episode in ((stack, deployed), (storm_stack, storm)):
        loaded = {r["name"]: r for r in episode.rules}
        assert loaded.keys() == expected.keys()
        bad = [
            (name, r["health"], r.get("lastError"))
            for name, r in loaded.items()
            if r["health"] != "ok" or r.get("lastError")
        ]
        assert bad == [], where.why(bad)
        for name in expected:
            assert loaded[name]["query"], name


# -- 2. a timeout storm -------------------------------------------------------------------------


def test_a_timeout_storm_fires_timeouts_and_the_outside_deploy_alert(storm_stack, storm):
    stack = storm_stack
    firing = {a["labels"]["alertname"]: a for a in storm.alerts if a["state"] == "firing"}
    assert {"GunicornWorkerTimeouts", OUTSIDE_DEPLOY} <= firing.keys(), stack.why(
        _names(storm.alerts)
    )
    alert = firing["GunicornWorkerTimeouts"]
    assert alert["labels"] == {
        "alertname": "GunicornWorkerTimeouts",
        "cause": "timeout",
        "instance": stack.instance,
        "job": JOB,
        "severity": "warning",
    }
    assert float(alert["value"]) > 0.1  # timed-out workers per minute, the rule's threshold
    assert alert["annotations"]["runbook_url"].endswith("#gunicornworkertimeouts")
    outside = firing[OUTSIDE_DEPLOY]
    assert outside["labels"] == {
        "alertname": OUTSIDE_DEPLOY,
        "instance": stack.instance,
        "job": JOB,
        "severity": "warning",
    }

    # Nothing else: Sustained (> 1/min for 30 m, 30 s here) may at most be on its way; nothing
    # signalled, OOM-killed or failed to boot, and the target is up.
    allowed = {"GunicornWorkerTimeouts", "GunicornWorkerTimeoutsSustained", OUTSIDE_DEPLOY}
    others = [n for n in _names(storm.alerts) if n[0] not in allowed]
    assert others == [], stack.why(others)
    states = {(s["metric"]["alertname"], s["metric"]["alertstate"]) for s in storm.history}
    assert {name for name, _ in states} <= allowed | {"GunicornWorkersBelowDesired"}, stack.why(
        sorted(states)
    )
    assert ("GunicornWorkersBelowDesired", "firing") not in states, stack.why(sorted(states))


@pytest.fixture(scope="module")
def redeployed(storm_stack, storm) -> float:
    """After the storm, one HUP: a deploy inside the window."""
    m = storm_stack.master
    old = set(m.worker_pids())
    m.signal(signal.SIGHUP)
    m.wait_workers(WORKERS, exclude=old, timeout=30)
    storm_stack.wait(
        lambda: storm_stack.sample("gunicorn_master_reloads_total") == 1,
        15,
        "Prometheus ingested the reload",
    )
    return time.time()


def test_a_deploy_holds_the_outside_deploy_alert(storm_stack, redeployed):
    """The same storm, now inside a deploy window: the rule's `unless` empties it."""
    stack = storm_stack
    expr = rules_by_name(RULES.read_text())[OUTSIDE_DEPLOY]["expr"]
    armed = expr.split("unless on (job, instance)")[0].strip()
    assert stack.prom.query(armed), stack.why("the storm's exit rate is still over threshold")
    stack.wait(lambda: stack.prom.query(expr) == [], 15, "the deploy window holds the alert")
    stack.wait(
        lambda: OUTSIDE_DEPLOY not in {n for n, _ in _names(stack.prom.alerts())},
        15,
        "the outside-deploy alert resolved",
        lambda: _names(stack.prom.alerts()),
    )


# -- 3. every dashboard query has data ----------------------------------------------------------


def test_every_dashboard_query_returns_data(storm_stack, redeployed):
    """Each panel's query, variables substituted, has at least one series with a number in it.

    A NaN everywhere counts as empty: histogram_quantile over buckets that saw no exit gives NaN,
    so the quantile panels only pass because the deploy and the storm observed exits.
    """
    stack = storm_stack
    queries = load_builder().dashboard_queries()
    assert queries
    empty = [expr for expr in queries if not _numbers(stack.prom.query(expr))]
    assert empty == [], stack.why(
        f"{len(empty)} of {len(queries)} dashboard queries returned no data:\n" + "\n".join(empty)
    )


def _numbers(result: list[dict]) -> list[float]:
    values = [float(r["value"][1]) for r in result]
    return [v for v in values if not math.isnan(v)]


def test_the_exporter_and_prometheus_agree(storm_stack, storm):
    """What the sidecar serves is what Prometheus stored: no series lost between the two."""
    stack = storm_stack
    last: list = []

    def agree() -> bool:
        # Prometheus scrapes once a second: the last events may not be stored yet.
        scraped = stack.exporter.scrape()
        last[:] = [
            (
                cause,
                sig,
                stack.sample(
                    f'gunicorn_worker_exits_total{{cause="{cause}",signal="{sig}",job="{JOB}"}}'
                ),
                value(scraped, "gunicorn_worker_exits_total", cause=cause, signal=sig),
            )
            for cause, sig in exits(scraped)
        ]
        return bool(last) and all(stored == want for _, _, stored, want in last)

    try:
        wait_for(agree, 15, "Prometheus to store what the sidecar serves")
    except AssertionError:
        raise AssertionError(stack.why(last)) from None
