"""Real projects' own Gunicorn configs, as they run them, with the monitor wired in.

Each project under tests/real_configs/ (PROVENANCE.md: repository, path, commit, license) is
copied, `from monitor.hooks import wire; wire(globals())` is appended to its config, and a real
Gunicorn master is started with the project's own command line. What the test changes on that
line, and why, is in the project's `overrides`; nothing else is touched. On one master per
project, in sequence: the app serves; the config's own hooks still run (their effect is
observed); a kill -9, a stray TERM, a HUP, a max_requests recycle and a timeout are each counted
with the right cause and nothing else moves, and the timeout has a capture (`gunicorn-monitor
events --stacks`) naming the request in flight; `gunicorn-monitor doctor` with the same command
line says only true things: what it resolves (the class, the worker count) is what runs.

Run time: 15 to 21 s per project on a shared 2-core machine, about 2 minutes for the eight.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness import (
    BIN,
    NO_CONTROL_SOCKET,
    ROOT,
    Master,
    exits,
    free_port,
    http_get,
    value,
    wait_for,
)

REAL = ROOT / "tests" / "real_configs"
CLI = str(BIN / "gunicorn-monitor")
WIRE = "\nfrom monitor.hooks import wire\nwire(globals())\n"
TIMEOUT = "5"  # seconds: the timeout event is waited for, so every project runs with this one
RECYCLE = "10"  # requests: where a config's own max_requests would take thousands of them
# What stalls a worker past `timeout`: a request that blocks the whole worker (sync: any long
# request; gthread and gevent: only one that holds the GIL or the hub; uvicorn: one that
# blocks the event loop, which /sleep does in the ASGI app).
SLEEP, SPIN = "/sleep?s=60", "/spin?s=60"
STILL = 3.0  # seconds the exit table must stand still before a recycle is taken as over


@dataclass
class Run:
    """What a hook observer needs: the master, when it started, the project's extra ports."""

    master: RealMaster
    started: float
    ports: dict[str, int]


@dataclass
class Project:
    name: str  # its directory under tests/real_configs
    config: str  # the file wire() is appended to
    command: Callable[[int], list[str]]  # the project's command line (after `gunicorn`), by port
    overrides: dict[str, str]  # what the test changed on that line, and why
    stall: str  # the request that stalls a worker past `timeout`
    entry: str  # what doctor must say the worker class is
    env: dict[str, str] = field(default_factory=dict)  # the project's own knobs
    misnamed: frozenset[str] = frozenset()  # names doctor must say Gunicorn ignores
    hooks: Callable[[Run], None] | None = None  # observes the config's own hooks at work
    ports: tuple[str, ...] = ()  # extra ports the project's env takes


WSGI, ASGI = "examples.app:app", "examples.app:asgi_app"
LOOPBACK = "-b 127.0.0.1:PORT: tests send traffic to loopback only"
OUR_APP = "this project's test app instead of theirs"


def _bind(port: int) -> list[str]:
    """What every project's command line gets, after its own flags' places: the bind (loopback
    only), --no-control-socket (Gunicorn 25.1+: concurrent masters would share one control
    socket path), and --timeout TIMEOUT (the timeout event is waited for; argparse lets the
    last --timeout win, so a project's own stays on its line)."""
    return ["-b", f"127.0.0.1:{port}", *NO_CONTROL_SOCKET, "--timeout", TIMEOUT]


def _warehouse_hook(run: Run) -> None:
    # when_ready touches /tmp/app-initialized (the readiness file of their deployment).
    assert os.stat("/tmp/app-initialized").st_mtime >= run.started - 1


def _posthog_hooks(run: Run) -> None:
    # when_ready serves the multiprocess metrics on PROMETHEUS_METRICS_EXPORT_PORT; post_fork
    # starts a thread in each worker that sets its thread-pool gauge.
    url = f"http://127.0.0.1:{run.ports['metrics']}/metrics"
    pids = run.master.worker_pids()

    def gauges() -> bool:
        status, body = http_get(url, timeout=5)
        text = body.decode(errors="replace")
        return status == 200 and all(
            f'gunicorn_max_worker_threads{{pid="{pid}"}} 16.0' in text for pid in pids
        )

    wait_for(gauges, 20, "PostHog's when_ready metrics server with each worker's gauge")


def _fac_hook(run: Run) -> None:
    # post_fork greens psycopg2 and says so, once per worker.
    wait_for(lambda: run.master.output().count("Made Psycopg2 Green") >= 4, 10, "post_fork")


def _galaxy_hooks(run: Run) -> None:
    # pre_fork takes a worker id from what on_starting and nworkers_changed set up (without
    # them every spawn raises in the master), post_fork reads it: the master serving through
    # every respawn below is their effect; none of them may have raised.
    assert "Traceback" not in run.master.output()


def _uvicorn_docker_hook(run: Run) -> None:
    # The config prints what it resolved when Gunicorn loads it.
    assert '"worker_class": "uvicorn_worker.UvicornWorker"' in run.master.output()


PROJECTS = [
    Project(
        "warehouse",
        "gunicorn-uploads.conf.py",
        lambda port: ["-c", "gunicorn-uploads.conf.py", *_bind(port), WSGI],
        {"bind": LOOPBACK + "; theirs is a unix socket under /var/run/cabotage", "app": OUR_APP},
        SLEEP,
        "gunicorn.workers.sync.SyncWorker (sync)",
        env={"WEB_CONCURRENCY": "2"},  # Gunicorn's own default for `workers`
        hooks=_warehouse_hook,
    ),
    Project(
        "inventree",
        "gunicorn.conf.py",
        lambda port: ["-c", "./gunicorn.conf.py", WSGI, *_bind(port), "--max-requests", RECYCLE],
        {"bind": LOOPBACK, "app": OUR_APP, "max_requests": "10 instead of 1000: run time"},
        SPIN,
        "gunicorn.workers.gthread.ThreadWorker (gthread)",
        env={"INVENTREE_GUNICORN_WORKERS": "2"},
    ),
    Project(
        "posthog",
        "gunicorn.config.py",
        # bin/docker-server, as it was when this config was current.
        lambda port: [
            WSGI,
            "--config",
            "gunicorn.config.py",
            *_bind(port),
            "--log-file",
            "-",
            "--log-level",
            "info",
            "--access-logfile",
            "-",
            "--worker-tmp-dir",
            "/dev/shm",
            "--workers=2",
            "--threads=16",
            "--worker-class=gthread",
            "--limit-request-line=8190",
            "--max-requests",
            RECYCLE,
        ],
        {"bind": LOOPBACK, "app": OUR_APP, "max_requests": "none set: one is added"},
        SPIN,
        "gunicorn.workers.gthread.ThreadWorker (gthread)",
        misnamed=frozenset({"grateful_timeout"}),
        hooks=_posthog_hooks,
        ports=("metrics",),  # PROMETHEUS_METRICS_EXPORT_PORT, theirs 8001
    ),
    Project(
        "azure_search_openai_demo",
        "gunicorn.conf.py",
        # App Service runs `python3 -m gunicorn main:app`: ./gunicorn.conf.py is the default.
        lambda port: [*_bind(port), "--max-requests", RECYCLE, ASGI],
        {"bind": LOOPBACK, "app": OUR_APP, "max_requests": "10 instead of 1000: run time"},
        SLEEP,
        "custom_uvicorn_worker.CustomUvicornWorker (a subclass of uvicorn)",
        misnamed=frozenset({"log_file"}),
    ),
    Project(
        "uvicorn_gunicorn_docker",
        "gunicorn_conf.py",
        # start.sh: `gunicorn -c "$GUNICORN_CONF" "$APP_MODULE"`.
        lambda port: ["-c", "gunicorn_conf.py", *_bind(port), "--max-requests", RECYCLE, ASGI],
        {"bind": LOOPBACK, "app": OUR_APP, "max_requests": "none set: one is added"},
        SLEEP,
        "uvicorn_worker._workers.UvicornWorker (uvicorn)",
        env={"WORKER_CLASS": "uvicorn_worker.UvicornWorker"},  # the image's documented knob
        hooks=_uvicorn_docker_hook,
    ),
    Project(
        "fac",
        "gunicorn.conf.py",
        lambda port: ["-c", "gunicorn.conf.py", *_bind(port), "--max-requests", RECYCLE, WSGI],
        {"bind": LOOPBACK, "app": OUR_APP, "max_requests": "10 instead of 500: run time"},
        SPIN,
        "gunicorn.workers.ggevent.GeventWorker (gevent)",
        hooks=_fac_hook,
    ),
    Project(
        "netbox",
        "gunicorn.conf",
        # contrib/netbox.service: `gunicorn --pid ... --pythonpath ... --config ... netbox.wsgi`
        lambda port: [
            "--config",
            "gunicorn.conf",
            *_bind(port),
            "--error-logfile",
            "-",
            "--max-requests",
            RECYCLE,
            WSGI,
        ],
        {
            "bind": LOOPBACK + "; --pid and --pythonpath name their install paths: left out",
            "app": OUR_APP,
            "errorlog": "- (stderr): /usr/local/netbox does not exist here",
            "max_requests": "none set: one is added",
        },
        SPIN,
        "gunicorn.workers.gthread.ThreadWorker (gthread)",
    ),
    Project(
        "galaxy",
        "lib/galaxy/web_stack/gunicorn_config.py",
        # gravity's command line (and Galaxy's own container scripts).
        lambda port: [
            ASGI,
            "--timeout",
            "300",
            "--pythonpath",
            "lib",
            "-k",
            "galaxy.webapps.galaxy.workers.Worker",
            *_bind(port),
            "--workers=1",
            "--config",
            "python:galaxy.web_stack.gunicorn_config",
            "--max-requests",
            RECYCLE,
        ],
        {
            "bind": LOOPBACK,
            "app": OUR_APP,
            "preload": "--preload left out: with it post_fork imports Galaxy's own app stack",
            "max_requests": "none set: one is added",
        },
        SLEEP,
        "galaxy.webapps.galaxy.workers.Worker (a subclass of uvicorn)",
        env={"PYTHONPATH": "lib"},  # as Galaxy's scripts start it
        hooks=_galaxy_hooks,
    ),
]


class RealMaster(Master):
    """A master started by a project's own command line, in its directory."""

    def __init__(self, shared_dir: Path, cmd: list[str], env: dict, cwd: Path, port: int):
        self.dir, self.cmd, self.env, self.cwd, self.port = Path(shared_dir), cmd, env, cwd, port
        self.log_path = cwd.parent / "gunicorn.log"
        self.proc: subprocess.Popen | None = None
        self.seen_pids: set[int] = set()

    def start(self, workers: int) -> RealMaster:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, cwd=self.cwd, stdout=self.log, stderr=self.log
        )
        self.wait_workers(workers, timeout=60)
        wait_for(lambda: http_get(self.url + "/", timeout=2)[0] == 200, 30, "the app answers")
        return self


def _doctor(run_dir: Path, env: dict, argv: list[str], shared: Path) -> dict:
    out = subprocess.run(
        [CLI, "doctor", "--dir", str(shared), "--json", "--", "gunicorn", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=run_dir,
        env=env,
    )
    assert "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    report = json.loads(out.stdout)
    checks: dict[str, list[dict]] = {}
    for c in report["checks"]:
        checks.setdefault(c["check"], []).append(c)
    assert report["ok"] and out.returncode == 0, report
    return checks


def _workers_said(checks: dict) -> int:
    return int(re.search(r"\): (\d+) worker\(s\)", checks["worker_class"][0]["why"]).group(1))


def _judge_doctor(project: Project, checks: dict, master: RealMaster | None) -> None:
    """Only true things: each line checked against the project and, with a master, the server."""
    assert checks["worker_class"][0]["level"] == "ok"
    assert checks["worker_class"][0]["why"].startswith(project.entry + ":"), checks
    assert checks["hooks"][0]["level"] == "ok"
    assert checks["timeout"][0]["why"] == f"timeout {TIMEOUT}s"  # the last --timeout wins
    said = {c["why"].split("`")[1].split(" ")[0] for c in checks.get("unknown_name", [])}
    assert said == set(project.misnamed), checks.get("unknown_name")
    keeps = "(sync)" not in project.entry  # every class here but sync holds connections open
    assert ("keepalive" in checks) == keeps, checks.get("keepalive")
    assert ("timeout_scope" in checks) == ("(sync)" not in project.entry)
    if master is not None:
        assert checks["processes"][0]["why"] == f"master(s) {master.pid} visible"
        assert len(master.worker_pids()) == _workers_said(checks)


class Events:
    """One event at a time, and the whole exit table checked after each."""

    def __init__(self, master: RealMaster, exporter) -> None:
        self.m, self.e = master, exporter
        self.expected: Counter = Counter()

    def settle(self, what: str, timeout: float = 45) -> dict:
        want = {k: float(v) for k, v in self.expected.items() if v}
        wait_for(lambda: exits(self.e.scrape()) == want, timeout, what)
        return want

    def replaced(self, n: int, gone: set[int]) -> None:
        self.m.wait_workers(n, exclude=gone, timeout=60)

    def kill(self, n: int, sig: signal.Signals, cause: str) -> None:
        victim = self.m.worker_pids()[0]
        os.kill(victim, sig)
        self.expected[(cause, sig.name)] += 1
        self.settle(f"{sig.name} to worker {victim} counted as {cause}")
        self.replaced(n, {victim})

    def reload(self, n: int) -> None:
        old = set(self.m.worker_pids())
        self.m.signal(signal.SIGHUP)
        self.expected[("reload", "SIGTERM")] += len(old)
        self.settle("HUP retires every old worker as reload")
        self.replaced(n, old)

    def recycle(self, n: int, limit: int) -> None:
        """Requests until a worker leaves after max_requests: counted as max_requests, nothing
        else. Requests sent while the first one leaves may bring others to their limit too
        (a gevent worker looks at its flag once a second): all of them are waited for, until
        the table has stood still for STILL seconds with every slot filled again."""
        key = ("max_requests", "none")
        base = self.expected[key]
        for i in range(limit):
            assert http_get(self.m.url + "/", timeout=30)[0] == 200
            if i % 5 == 4 and exits(self.e.scrape()).get(key, 0) > base:
                break
        last: dict = {"table": None, "since": time.monotonic()}

        def still() -> dict | None:
            table = exits(self.e.scrape())
            if table != last["table"] or len(self.m.worker_pids()) != n:
                last.update(table=table, since=time.monotonic())
                return None
            return table if time.monotonic() - last["since"] >= STILL else None

        table = wait_for(still, 60, "the recycles to end")
        assert table.get(key, 0) > base, f"no max_requests exit: expected {base}, saw {table}"
        self.expected[key] = int(table[key])
        self.settle("only max_requests moved")

    def timeout(self, n: int, stall: str) -> dict:
        """A request past `timeout`: one exit counted as timeout (by whatever signal ended it),
        nothing else; returns the journal's exit record."""
        before = set(self.m.worker_pids())
        threading.Thread(target=http_get, args=(self.m.url + stall, 90), daemon=True).start()

        seen: dict = {}

        def counted() -> tuple | None:
            now = seen["exits"] = exits(self.e.scrape())
            new = {k: v for k, v in now.items() if self.expected.get(k, 0) != v}
            if len(new) == 1 and next(iter(new))[0] == "timeout":
                key = next(iter(new))
                if new[key] == self.expected.get(key, 0) + 1:
                    return key
            return None

        try:
            key = wait_for(counted, 60, f"a request to {stall} counted as timeout")
        except AssertionError as e:
            raise AssertionError(f"{e}; expected {dict(self.expected)}, saw {seen}") from None
        self.expected[key] += 1
        self.settle("only the timeout moved")
        records = [r for r in _journal(self.m.dir) if r.get("event") == "exit"]
        record = [r for r in records if r.get("cause") == "timeout"][-1]
        assert record["pid"] in before
        self.replaced(n, {record["pid"]})
        return record


def _journal(shared: Path) -> list[dict]:
    out = subprocess.run(
        [CLI, "events", "--dir", str(shared)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def _capture_block(shared: Path, name: str) -> str:
    out = subprocess.run(
        [CLI, "events", "--stacks", "--dir", str(shared)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for block in out.stdout.split("\n\n"):
        if f"file: {name}" in block:
            return block
    raise AssertionError(f"no capture {name} in:\n{out.stdout}")


@pytest.mark.timeout(420)
@pytest.mark.parametrize("project", PROJECTS, ids=[p.name for p in PROJECTS])
def test_a_real_projects_config_runs_wired_and_every_exit_is_true(
    project, shared_dir, tmp_path, make_exporter
):
    run_dir = tmp_path / project.name
    shutil.copytree(REAL / project.name, run_dir)
    with open(run_dir / project.config, "a") as f:
        f.write(WIRE)
    port = free_port()
    ports = {name: free_port() for name in project.ports}
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(shared_dir),
        "PROMETHEUS_METRICS_EXPORT_PORT": str(ports.get("metrics", 0)),
        **project.env,
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project.env.get("PYTHONPATH"), str(ROOT)) if p)
    env.pop("GUNICORN_CMD_ARGS", None)
    argv = project.command(port)

    # doctor first, with the same command line: what it resolves is what must then run.
    checks = _doctor(run_dir, env, argv, shared_dir)
    _judge_doctor(project, checks, None)
    n = _workers_said(checks)

    started = time.time()
    m = RealMaster(shared_dir, [sys.executable, "-m", "gunicorn", *argv], env, run_dir, port)
    try:
        m.start(n)
        _judge_doctor(project, _doctor(run_dir, env, argv, shared_dir), m)
        if project.hooks is not None:
            project.hooks(Run(m, started, ports))
        e = make_exporter()
        ev = Events(m, e)
        ev.settle("a clean start")
        ev.kill(n, signal.SIGKILL, "killed")
        ev.kill(n, signal.SIGTERM, "signal")
        ev.reload(n)
        # At most max_requests + jitter + 1 requests reach one worker before it leaves (each
        # config's own: warehouse 32 + 8; elsewhere RECYCLE + at most 50).
        ev.recycle(n, limit=101 * n + 10)
        record = ev.timeout(n, project.stall)
        block = _capture_block(shared_dir, record["capture"])
        assert "phase request" in block, block
        assert f"GET {project.stall.split('?')[0]}" in block, block
        assert value(e.scrape(), "gunicorn_monitor_hook_errors_total") == 0
        if project.hooks is not None:
            project.hooks(Run(m, started, ports))  # still at work after every respawn
    finally:
        m.kill()
