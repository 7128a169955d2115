"""The shipped image and docker-compose.yml, run on a real Docker engine, unchanged.

Each scenario brings up its own compose project of the shipped file (the app, the sidecar, the
pause container that holds their pid namespace; Prometheus and Grafana stay down: their images
cannot be pulled here), with a read-only root in both containers and the ports published on
127.0.0.1 only, and takes it down again. Compose v1 (Debian's 1.29) and v2 each run it.

Where no engine can start (no root, no dockerd, a machine that cannot run containers), every
test here skips with one line saying why: the machine's limits are not the project's failure.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests import containers
from tests.containers import Project, Unavailable
from tests.harness import ROOT, check_metrics, exits, parse, promtool_path, value, wait_for
from tests.test_series_budget import AT_REST_4_WORKERS, monitor_series, slots

log = logging.getLogger(__name__)
pytestmark = pytest.mark.timeout(900)  # the first test pays for the engine and the image

WORKERS = 4  # the image's default (gunicorn.conf.py: GUNICORN_WORKERS)
RULES = ROOT / "dashboards" / "rules.yml"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    started = time.monotonic()
    try:
        with containers.engine(tmp_path_factory.mktemp("docker")):
            log.info("engine up in %.1f s", time.monotonic() - started)
            yield
    except Unavailable as e:
        pytest.skip(f"no container engine here: {e}")


@pytest.fixture(scope="module")
def image(engine) -> str:
    started = time.monotonic()
    try:
        how = containers.base_image()
        containers.runs_containers()
    except Unavailable as e:
        pytest.skip(f"no base image here: {e}")
    log.info("base image %s: %s in %.1f s", containers.BASE, how, time.monotonic() - started)
    started = time.monotonic()
    containers.build()
    log.info("built %s in %.1f s", containers.IMAGE, time.monotonic() - started)
    return containers.IMAGE


def project(compose: list[str] | None, version: str):
    if compose is None:
        pytest.skip(f"no compose {version} here (scripts/docker.sh installs both)")
    p = Project(compose, f"gmtest{os.getpid()}{version}")
    started = time.monotonic()
    try:
        yield p
    finally:
        p.down()
        log.info("compose %s project: %.1f s up to down", version, time.monotonic() - started)


@pytest.fixture
def v1(image):
    yield from project(containers.compose_v1(), "v1")


@pytest.fixture
def v2(image):
    yield from project(containers.compose_v2(), "v2")


def at_rest(text: str) -> bool:
    s = parse(text)
    return value(s, "gunicorn_workers") == WORKERS and len(slots(s)) == WORKERS


def master_down_fires(text: str) -> str:
    """promtool evaluates the shipped rules (dashboards/rules.yml) over this scrape, held for 5
    minutes as Prometheus would scrape it: '' if GunicornMasterDown fires, else what it said."""
    series = []
    for (name, labels), val in parse(text).items():
        if val != val or abs(val) == float("inf"):
            continue  # no NaN or infinities in promtool's series notation
        # Labelled as the PodMonitor's relabeling labels them.
        labels = (("instance", "pod:9971"), ("job", "gunicorn"), *labels)
        escaped = ((k, v.replace("\\", "\\\\").replace('"', '\\"')) for k, v in labels)
        selector = ",".join(f'{k}="{v}"' for k, v in escaped)
        series.append({"series": f"{name}{{{selector}}}", "values": f"{val}x20"})
    expr = 'count(ALERTS{alertname="GunicornMasterDown", alertstate="firing"})'
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "promql_expr_test": [
                    {"expr": expr, "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 1}]}
                ],
            }
        ],
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test.yml"
        path.write_text(yaml.safe_dump(test))
        done = subprocess.run(
            [promtool_path(), "test", "rules", str(path)], capture_output=True, text=True
        )
    return "" if done.returncode == 0 else done.stdout + done.stderr


def namespace_processes(p: Project) -> list[str]:
    """Every process in the pod's pid namespace, as the sidecar sees it: 'pid state cmdline'."""
    script = (
        "import os\n"
        "for pid in sorted(int(p) for p in os.listdir('/proc') if p.isdigit()):\n"
        "    try:\n"
        "        state = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0]\n"
        "        cmd = open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ')\n"
        "    except OSError:\n"
        "        continue\n"
        "    print(pid, state, cmd.decode(errors='replace').strip())\n"
    )
    done = p.exec("sidecar", "python", "-c", script)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_compose_v1_and_v2_load_the_file_as_shipped():
    """Debian's compose 1.29 rejects a top-level `name:`; the project name comes from .env."""
    v1, v2 = containers.compose_v1(), containers.compose_v2()
    if v1 is None and v2 is None:
        pytest.skip("no compose here (scripts/docker.sh installs both)")
    for compose in filter(None, (v1, v2)):
        done = subprocess.run([*compose, "config", "--quiet"], cwd=ROOT, capture_output=True)
        assert done.returncode == 0, done.stderr.decode()
    if v2:
        config = subprocess.run(
            [*v2, "config", "--format", "json"], cwd=ROOT, capture_output=True, text=True
        )
        assert yaml.safe_load(config.stdout)["name"] == "gunicorn-monitor"


def test_the_sidecar_starts_alone_then_serves_the_app_read_only_with_its_control_socket(v1):
    """Compose v1: the sidecar first (as a pod may start it), then the app; both read-only."""
    v1.up("sidecar")
    wait_for(lambda: v1.get(v1.metrics_port, "/-/healthy")[0] == 200, 60, "the sidecar")
    assert v1.get(v1.metrics_port, "/-/ready")[0] == 503  # no master yet: not ready
    text = v1.scrape()
    assert text is not None and value(parse(text), "gunicorn_up") == 0
    check_metrics(text.encode())
    assert v1.healthcheck("sidecar").returncode == 0

    v1.up("app")
    text = v1.wait_scrape(at_rest, f"{WORKERS} workers sampled")
    assert v1.get(v1.app_port, "/")[0] == 200
    assert v1.get(v1.metrics_port, "/-/ready")[0] == 200
    check_metrics(text.encode())
    assert len(monitor_series(parse(text))) <= AT_REST_4_WORKERS
    for service in ("app", "sidecar", "pause"):
        assert v1.inspect(service, "{{.HostConfig.ReadonlyRootfs}}") == "true", service
    assert v1.healthcheck("app").returncode == 0

    # gunicornc, as the README says to run it, through the control socket on its tmpfs.
    shown = v1.run("exec", "-T", "app", "gunicornc", "-c", "show workers")
    assert f"Total: {WORKERS} workers" in shown, shown
    for trouble in ("Read-only file system", "Control server error", "Traceback"):
        assert trouble not in v1.logs("app"), v1.logs("app")
        assert trouble not in v1.logs("sidecar"), v1.logs("sidecar")

    # A stray kill -TERM on a worker, from inside the pod.
    worker = int(v1.get(v1.app_port, "/pid")[1])
    done = v1.exec("app", "python", "-c", f"import os; os.kill({worker}, 15)")
    assert done.returncode == 0, done.stderr
    text = v1.wait_scrape(
        lambda t: exits(parse(t)).get(("signal", "SIGTERM")) == 1 and at_rest(t),
        "the stray SIGTERM counted and its replacement sampled",
    )
    assert exits(parse(text)) == {("signal", "SIGTERM"): 1}
    check_metrics(text.encode())


def test_the_master_dies_alone_and_the_sidecar_reports_it(v1):
    """The master SIGKILLed from the host (an OOM kill): the sidecar, in the pause container's
    namespace and not the master's, lives on and serves gunicorn_up 0, and GunicornMasterDown's
    expression fires on it; the master's workers leave no process behind. A new app container
    is found again by the same sidecar."""
    v1.up("app", "sidecar")
    v1.wait_scrape(at_rest, f"{WORKERS} workers sampled")
    sidecar = v1.inspect("sidecar", "{{.State.StartedAt}}")
    v1.kill_from_host("app")
    wait_for(lambda: not v1.running("app"), 30, "the app container to stop")
    text = v1.wait_scrape(lambda t: value(parse(t), "gunicorn_up") == 0, "gunicorn_up 0")
    # The same sidecar process, not one Docker restarted after the master took it down.
    assert v1.running("sidecar") and v1.running("pause")
    assert v1.inspect("sidecar", "{{.State.StartedAt}}") == sidecar
    assert v1.inspect("sidecar", "{{.RestartCount}}") == "0"
    check_metrics(text.encode())
    assert master_down_fires(text) == ""
    assert v1.get(v1.metrics_port, "/-/ready")[0] == 503

    def only_the_pods_own() -> bool:
        procs = namespace_processes(v1)
        return not any(" Z " in p or "gunicorn -c" in p for p in procs)

    wait_for(only_the_pods_own, 30, "no worker or zombie left of the dead master")

    v1.up("app")
    v1.wait_scrape(
        lambda t: value(parse(t), "gunicorn_up") == 1 and at_rest(t), "the new master found"
    )
    assert v1.get(v1.metrics_port, "/-/ready")[0] == 200


def test_the_sidecar_dies_alone_and_the_app_serves_on(v2):
    """Compose v2, the app first: the sidecar SIGKILLed from the host is restarted by Docker,
    and the app never stops serving or restarts."""
    v2.up("app")
    wait_for(lambda: v2.get(v2.app_port, "/")[0] == 200, 60, "the app")
    v2.up("sidecar")
    v2.wait_scrape(at_rest, f"{WORKERS} workers sampled")
    started = v2.inspect("app", "{{.State.StartedAt}}")
    v2.kill_from_host("sidecar")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the app answers all along the sidecar's absence
        assert v2.get(v2.app_port, "/", timeout=5)[0] == 200
    text = v2.wait_scrape(at_rest, "the restarted sidecar")
    check_metrics(text.encode())
    assert int(v2.inspect("sidecar", "{{.RestartCount}}")) >= 1
    assert v2.inspect("app", "{{.State.StartedAt}}") == started
    assert v2.inspect("app", "{{.RestartCount}}") == "0"


def test_the_apps_healthcheck_survives_a_timeout_storm(v2):
    """Every worker busy: HTTP to the app goes unanswered, but its healthcheck connects to the
    port the master listens on, which the kernel accepts: Docker never sees it unhealthy."""
    v2.up("app", "sidecar")
    v2.wait_scrape(at_rest, f"{WORKERS} workers sampled")
    busy = [
        threading.Thread(target=v2.get, args=(v2.app_port, "/sleep?s=8", 30))
        for _ in range(WORKERS)
    ]
    for t in busy:
        t.start()
    try:
        wait_for(lambda: v2.get(v2.app_port, "/", timeout=2)[0] == 0, 10, "every worker busy")
        started = time.monotonic()
        assert v2.healthcheck("app").returncode == 0
        assert time.monotonic() - started < 5
    finally:
        for t in busy:
            t.join(30)
