"""Alert delivery end to end: the shipped rules, unchanged, on a real Prometheus that scrapes
real sidecars of real Gunicorn masters, and a real Alertmanager that notifies a webhook.

One Prometheus (scrape and evaluation every second) loads dashboards/rules.yml itself, every
`for:` as shipped (so this takes minutes), and sends to one Alertmanager (every alert its own
notification, a second after it arrives), which posts to a webhook receiver in this process.
Each scenario has its own Gunicorn master (sync, 2 workers) and its own `gunicorn-monitor
serve`: its own target, told apart by instance. All run at once:

  scenario        what the test does                             the alert that must arrive
  timeout storm   a request sleeping past --timeout 2 every ~10 s GunicornWorkerTimeouts (5m)
  stray SIGTERMs  SIGTERM to two workers, from outside            GunicornWorkerStrayKills
  first SIGILL    SIGILL to a worker: a series born at 1          GunicornWorkerCrashed
  sidecar outage  the sidecar killed; restarted once alerted      GunicornExporterDown (1m)
  master death    SIGKILL to the master                           GunicornMasterDown (2m)
  HUP deploy      three HUPs                                      none
  USR2 upgrade    USR2, then TERM to the old master               none

Nothing else may arrive, for any instance: the HUP and USR2 deploys are watched for at least as
long as the slowest alert took. Each arrival is logged with the time it took from the event
(`-o log_cli=true --log-cli-level=INFO` shows the lines; scripts/test.sh does).

The binaries come from `source scripts/prometheus.sh`; without them these tests fail.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import pytest
import yaml

from tests.harness import ROOT, Exporter, Master, exits, http_get, kill_all, value, wait_for
from tests.prometheus import (
    ALERTMANAGER_TEMPLATES,
    Alertmanager,
    Prometheus,
    Webhook,
    binary,
    parse_duration,
)

LOG = logging.getLogger(__name__)
RULES = ROOT / "dashboards" / "rules.yml"
JOB = "gunicorn"
WORKERS = 2
# Beyond an alert's `for:`: the scrape, the evaluations, Alertmanager's second, a loaded machine.
SLACK = 90.0
# The whole module: the slowest alert (5 minutes), the stacks' start, and the slack, with room.
pytestmark = pytest.mark.timeout(1200)


def shipped(alertname: str) -> dict:
    """The alert as rules.yml defines it."""
    rules = yaml.safe_load(RULES.read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == alertname]
    return rule


def shipped_for(alertname: str) -> float:
    """The `for:` of an alert in rules.yml, in seconds."""
    return float(parse_duration(shipped(alertname)["for"]))


@dataclass
class Scenario:
    name: str
    expect: str | None  # the alert that must arrive; None: nothing may
    act: Callable[[Scenario, Webhook], None]
    env: dict = field(default_factory=dict)
    master: Master | None = None
    exporter: Exporter | None = None
    instance: str = ""
    event_at: float | None = None  # when the test caused the event
    arrived_at: float | None = None  # when its alert reached the webhook
    extra_pids: list[int] = field(default_factory=list)  # a USR2 master and its workers
    notes: dict = field(default_factory=dict)
    error: BaseException | None = None

    @property
    def took(self) -> float | None:
        if self.event_at is None or self.arrived_at is None:
            return None
        return self.arrived_at - self.event_at

    def await_alert(self, hook: Webhook, deadline: float) -> None:
        """Until the expected alert for this instance reaches the webhook, or fail."""
        assert self.expect and self.event_at is not None
        labels = {"alertname": self.expect, "instance": self.instance}
        wait_for(lambda: hook.first(**labels), deadline, f"{self.expect} for {self.name}")
        self.arrived_at = hook.first(**labels)
        LOG.info(
            "alert delivered scenario=%s alert=%s for_seconds=%.0f took_seconds=%.1f",
            self.name,
            self.expect,
            shipped_for(self.expect),
            self.took,
        )


# -- what each scenario does --------------------------------------------------------------------


def _timeouts(exporter: Exporter) -> float:
    return sum(n for (cause, _), n in exits(exporter.scrape()).items() if cause == "timeout")


def timeout_storm(s: Scenario, hook: Webhook) -> None:
    """A request that sleeps past --timeout 2, then another about 10 s after each timeout,
    until the alert arrives: the 5-minute rate stays over its threshold for 5 minutes."""
    m, e = s.master, s.exporter
    deadline = shipped_for(s.expect) + SLACK
    labels = {"alertname": s.expect, "instance": s.instance}
    s.event_at = time.time()
    while not hook.first(**labels):
        assert time.time() < s.event_at + deadline, f"no {s.expect} after {deadline}s"
        before = _timeouts(e)
        threading.Thread(target=http_get, args=(m.url + "/sleep?s=60", 60), daemon=True).start()
        wait_for(lambda b=before: _timeouts(e) > b, 30, "a timeout")
        s.notes["timeouts"] = _timeouts(e)
        try:  # the pace of the storm, cut short by the alert's arrival
            wait_for(lambda: hook.first(**labels), 10, "")
        except AssertionError:
            pass
    s.await_alert(hook, 0)


def _stop_a_worker(m: Master, sig: int) -> None:
    """`sig` to one worker from outside, then wait until the master has replaced it."""
    victim = wait_for(lambda: (kids := m.live_children()) and kids[0], 20, "a worker")
    os.kill(victim, sig)
    wait_for(
        lambda: victim not in (kids := m.live_children()) and len(kids) == WORKERS,
        30,
        "a replacement",
    )


def stray_sigterms(s: Scenario, hook: Webhook) -> None:
    s.event_at = time.time()
    for _ in range(2):
        _stop_a_worker(s.master, signal.SIGTERM)
    s.await_alert(hook, SLACK)


def first_sigill(s: Scenario, hook: Webhook) -> None:
    s.event_at = time.time()
    _stop_a_worker(s.master, signal.SIGILL)
    wait_for(
        lambda: exits(s.exporter.scrape()).get(("signal", "SIGILL")) == 1, 20, "SIGILL counted"
    )
    s.await_alert(hook, SLACK)


def sidecar_outage(s: Scenario, hook: Webhook) -> None:
    """The sidecar killed; it must be alerted within a 2-minute outage; then it comes back and
    the alert resolves."""
    s.event_at = time.time()
    s.exporter.kill()
    s.await_alert(hook, 120)
    s.exporter.start()
    back = time.time()
    labels = {"alertname": s.expect, "instance": s.instance}
    wait_for(lambda: hook.first("resolved", **labels), 60, "the outage resolved")
    s.notes["resolved_after_restart"] = hook.first("resolved", **labels) - back
    LOG.info(
        "alert resolved scenario=%s alert=%s after_restart_seconds=%.1f",
        s.name,
        s.expect,
        s.notes["resolved_after_restart"],
    )


def master_death(s: Scenario, hook: Webhook) -> None:
    m = s.master
    m.worker_pids()  # remembered, to be killed at the end: they outlive their master a while
    s.event_at = time.time()
    m.signal(signal.SIGKILL)
    m.wait_exit(10)  # reaped, as a real parent (init, the container runtime) would
    wait_for(lambda: value(s.exporter.scrape(), "gunicorn_up") == 0, 30, "gunicorn_up 0")
    s.await_alert(hook, shipped_for(s.expect) + SLACK)


def hup_deploy(s: Scenario, hook: Webhook) -> None:
    m = s.master
    s.event_at = time.time()
    for _ in range(3):
        old = set(m.worker_pids())
        m.signal(signal.SIGHUP)
        m.wait_workers(WORKERS, exclude=old, timeout=30)
    want = {("reload", "SIGTERM"): 3.0 * WORKERS}
    wait_for(lambda: exits(s.exporter.scrape()) == want, 30, f"{want} counted")


def usr2_upgrade(s: Scenario, hook: Webhook) -> None:
    """USR2, the new master up beside the old one, then TERM to the old master."""
    old = s.master
    old_workers = set(old.worker_pids())
    s.event_at = time.time()
    old.signal(signal.SIGUSR2)

    def new_master() -> int | None:
        for child in psutil.Process(old.pid).children():
            state = old.dir / "gunicorn-monitor" / f"master-{child.pid}.json"
            if child.pid not in old_workers and state.exists():
                return child.pid
        return None

    new_pid = wait_for(new_master, 30, "the new master")
    s.extra_pids.append(new_pid)
    wait_for(
        lambda: value(s.exporter.scrape(), "gunicorn_workers") == 2 * WORKERS, 30, "both masters"
    )
    s.extra_pids.extend(p.pid for p in psutil.Process(new_pid).children())
    old.signal(signal.SIGTERM)
    assert old.wait_exit(30) == 0
    want = {("reload", "SIGTERM"): float(WORKERS)}
    wait_for(lambda: exits(s.exporter.scrape()) == want, 30, f"{want} counted")
    assert value(s.exporter.scrape(), "gunicorn_up") == 1


SCENARIOS = (
    ("timeout storm", "GunicornWorkerTimeouts", timeout_storm, {"GUNICORN_TIMEOUT": "2"}),
    ("stray SIGTERMs", "GunicornWorkerStrayKills", stray_sigterms, {}),
    ("first SIGILL", "GunicornWorkerCrashed", first_sigill, {}),
    ("sidecar outage", "GunicornExporterDown", sidecar_outage, {}),
    ("master death", "GunicornMasterDown", master_death, {}),
    ("HUP deploy", None, hup_deploy, {}),
    ("USR2 upgrade", None, usr2_upgrade, {}),
)
ALERTING = [name for name, expect, _, _ in SCENARIOS if expect]
SILENT = [name for name, expect, _, _ in SCENARIOS if not expect]


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Run:
    scenarios: dict[str, Scenario]
    prom: Prometheus
    hook: Webhook
    loaded_rules: list[dict]
    end: float  # the silent scenarios were watched until then

    def why(self, what: object = "") -> str:
        received = [(a["status"], a["labels"]) for _, a in self.hook.received]
        return f"{what}\nwebhook received: {received}\n{self.prom.tail()}"


def _run(scenarios: list[Scenario], hook: Webhook) -> None:
    """Every scenario on its own thread, at once; an error is kept on its scenario."""

    def one(s: Scenario) -> None:
        try:
            s.act(s, hook)
        except BaseException as e:  # kept for the scenario's own test to report
            s.error = e

    threads = [threading.Thread(target=one, args=(s,), name=s.name) for s in scenarios]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
        assert not t.is_alive(), f"{t.name} still running after 900 s"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    prometheus, alertmanager = binary("prometheus"), binary("prometheus-alertmanager")
    setup = "run `source scripts/prometheus.sh` first"
    if not prometheus or not alertmanager:
        pytest.fail(f"prometheus or prometheus-alertmanager not found: {setup}", pytrace=False)
    for template in ALERTMANAGER_TEMPLATES:
        if not template.is_file():
            pytest.fail(f"{template} missing: {setup}", pytrace=False)
    tmp = tmp_path_factory.mktemp("alert-delivery")
    scenarios = {}
    for name, expect, act, env in SCENARIOS:
        shared = tmp / name.replace(" ", "-") / "multiproc"
        shared.mkdir(parents=True)
        s = Scenario(name, expect, act, env)
        s.master = Master(shared, worker="sync", workers=WORKERS, env=env)
        s.exporter = Exporter(shared)
        s.instance = f"127.0.0.1:{s.exporter.port}"
        scenarios[name] = s
    hook = Webhook().start()
    am = Alertmanager(tmp / "alertmanager", hook.url)
    targets = [s.instance for s in scenarios.values()]
    prom = None
    # A worker ended by SIGILL dumps core by default: not into the working tree.
    core = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, core[1]))
    try:
        for s in scenarios.values():
            s.master.start()
            s.exporter.start()
        am.start(alertmanager)
        prom = Prometheus(tmp / "prometheus", targets, [RULES], JOB, am.address).start(prometheus)
        # Every target scraped; then the evaluations that resolve absent(up) (pending until the
        # first scrapes, about 5 s after Prometheus starts): a quiet start for every scenario.
        wait_for(
            lambda: len(prom.query(f'up{{job="{JOB}"}} == 1')) == len(targets), 60, "every target"
        )
        start = time.time()
        wait_for(lambda: prom.evaluated_since(start, 3), 30, "rule evaluations")
        wait_for(lambda: not prom.alerts(), 30, "no alert pending at rest")
        assert hook.received == [], hook.received
        loaded = prom.rules()

        _run(list(scenarios.values()), hook)
        # The deploys are watched at least as long as the slowest alert took from its event.
        slowest = max((s.took or 0.0) for s in scenarios.values())
        end = max(scenarios[n].event_at or time.time() for n in SILENT) + slowest
        for n in SILENT:
            _watch_silence(hook, scenarios[n].instance, end)
        yield Run(scenarios, prom, hook, loaded, max(end, time.time()))
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, core)
        if prom is not None:
            prom.stop()
        am.stop()
        hook.stop()
        for s in scenarios.values():
            s.exporter.kill()
            s.master.kill()
            kill_all(s.extra_pids)


def _watch_silence(hook: Webhook, instance: str, until: float) -> None:
    """Until `until`, or until something arrives for `instance` (which the test then reports)."""
    remaining = until - time.time()
    if remaining <= 0:
        return
    try:
        wait_for(lambda: hook.alerts(instance=instance), remaining, "")
    except AssertionError:
        pass  # nothing came before the deadline: what was hoped for


# -- the tests ----------------------------------------------------------------------------------


def test_prometheus_evaluates_the_shipped_rules_unchanged(run):
    assert run.prom.config.read_text().count(str(RULES)) == 1  # the file itself, not a copy
    shipped = yaml.safe_load(RULES.read_text())
    names = [r.get("alert") or r["record"] for g in shipped["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in run.loaded_rules) == sorted(names)
    for rule in run.loaded_rules:
        if rule["type"] == "alerting":
            assert rule["duration"] == shipped_for(rule["name"]), rule["name"]


@pytest.mark.parametrize("name", ALERTING)
def test_the_scenario_delivers_its_alert(run, name):
    s = run.scenarios[name]
    if s.error is not None:
        raise AssertionError(run.why(f"{name} failed: {s.error!r}")) from s.error
    assert s.took is not None, run.why(f"{name}: no {s.expect}")
    alert = run.hook.alerts(alertname=s.expect, instance=s.instance)[0][1]
    assert alert["labels"]["job"] == JOB
    assert alert["labels"]["severity"] == shipped(s.expect)["labels"]["severity"]
    assert alert["annotations"]["runbook_url"] == f"dashboards/RUNBOOK.md#{s.expect.lower()}"
    # Not before its `for:`, and in time (an outage within its 2 minutes).
    wait = shipped_for(s.expect)
    limit = 120.0 if s.expect == "GunicornExporterDown" else wait + SLACK
    assert wait <= s.took <= limit, f"{name}: {s.expect} took {s.took:.1f}s"


@pytest.mark.parametrize(
    ("name", "signal_label"), [("first SIGILL", "SIGILL"), ("stray SIGTERMs", "SIGTERM")]
)
def test_the_alert_names_the_signal(run, name, signal_label):
    s = run.scenarios[name]
    alerts = [a for _, a in run.hook.alerts(alertname=s.expect, instance=s.instance)]
    assert alerts, run.why()
    kinds = {(a["labels"]["cause"], a["labels"]["signal"]) for a in alerts}
    assert kinds == {("signal", signal_label)}, run.why()


def test_the_outage_resolves_when_the_sidecar_is_back(run):
    s = run.scenarios["sidecar outage"]
    assert s.notes.get("resolved_after_restart") is not None, run.why(s.error)


@pytest.mark.parametrize("name", SILENT)
def test_the_deploy_delivers_nothing(run, name):
    s = run.scenarios[name]
    if s.error is not None:
        raise AssertionError(run.why(f"{name} failed: {s.error!r}")) from s.error
    slowest = max(run.scenarios[n].took or 0.0 for n in ALERTING)
    assert run.end - s.event_at >= slowest  # watched as long as the slowest alert took
    got = [(a["status"], a["labels"]) for _, a in run.hook.alerts(instance=s.instance)]
    got += [(a["status"], a["labels"]) for _, a in run.hook.alerts("resolved", instance=s.instance)]
    assert got == [], run.why(f"{name} delivered {got}")


def test_nothing_else_is_delivered(run):
    expected = {(s.instance, s.expect) for s in run.scenarios.values() if s.expect}
    got = {(a["labels"].get("instance"), a["labels"]["alertname"]) for _, a in run.hook.received}
    assert got <= expected, run.why(f"unexpected: {sorted(got - expected, key=str)}")
    LOG.info(
        "alert delivery times: %s",
        ", ".join(f"{s.name}={s.took:.1f}s" for s in run.scenarios.values() if s.took),
    )
