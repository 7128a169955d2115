"""Real processes for the tests: a Gunicorn master with the project's config, and the exporter.

Everything here waits on conditions with deadlines, never on bare sleeps, and every process a
test starts is killed by pid when the test ends.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gunicorn
import psutil
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from monitor.contract import causes, directory, metrics, state
from monitor.contract.directory import Layout
from monitor.contract.store import Store

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "gunicorn.conf.py"
BIN = Path(sys.executable).parent

# gunicorn 25.1+ opens a control socket by default, at one per-user path that concurrent masters
# would fight over; older releases have neither the socket nor the flag (and reject the flag).
NO_CONTROL_SOCKET = ("--no-control-socket",) if gunicorn.version_info >= (25, 1) else ()

# Run as the unprivileged user `nobody` (as root: setpriv drops to it): another user than the
# directory's owner, or the owner of a directory the tests give it.
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")

# The worker classes the README declares supported, each run through the whole cause table.
# eventlet: Gunicorn 22.0 to 25.x only (26.0 removed its worker), so on the oldest end.
EVENTLET = gunicorn.version_info < (26,) and importlib.util.find_spec("eventlet") is not None
CLASSES = ["sync", "gthread", "uvicorn", "uvicorn.workers", "gevent", "tornado"]
CLASSES += ["eventlet"] if EVENTLET else []
# Subclasses in a user's own module, as uvicorn-gunicorn-docker and many apps ship: resolved
# through the worker-class table as their base (tests/user_workers.py).
SUBCLASSES = ["uvicorn.subclass", "uvicorn.workers.subclass"]
WORKER_CLASSES = {
    "sync": ("sync", "examples.app:app"),
    "gthread": ("gthread", "examples.app:app"),
    "uvicorn": ("uvicorn_worker.UvicornWorker", "examples.app:asgi_app"),
    # uvicorn's own, deprecated, still the most common in existing configs
    "uvicorn.workers": ("uvicorn.workers.UvicornWorker", "examples.app:asgi_app"),
    "gevent": ("gevent", "examples.app:app"),
    "tornado": ("tornado", "examples.app:app"),
    "eventlet": ("eventlet", "examples.app:app"),
    "uvicorn.subclass": ("tests.user_workers.AppWorker", "examples.app:asgi_app"),
    "uvicorn.workers.subclass": ("tests.user_workers.LegacyAppWorker", "examples.app:asgi_app"),
}


@contextlib.contextmanager
def app_process(directory: str | Path, pid: Callable[[], int]) -> Iterator[None]:
    """prometheus_client, in this process, writing as the app process `pid()` into `directory`:
    the library's own multiprocess file format and mmap path, as a worker would. Restored after."""
    from prometheus_client import values

    saved = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue(pid)
    try:
        yield
    finally:
        values.ValueClass = values.MutexValue
        if saved is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved


# A worker hook that fails: the monitor's post_worker_init work raises in every worker.
FAILING_WORKER_HOOK = (
    "import monitor.hooks.worker\n"
    "def _boom(worker):\n"
    "    raise RuntimeError('injected fault')\n"
    "monitor.hooks.worker.instrument = _boom\n"
)


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def http_get(
    url: str,
    timeout: float = 30.0,
    headers: dict | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    """(status, body); status 0 when no HTTP answer came (refused, reset, TLS failure)."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
        return 0, b""


class Master:
    """A Gunicorn master started the way users start it: `gunicorn -c gunicorn.conf.py APP`."""

    def __init__(
        self,
        shared_dir: Path,
        worker: str = "sync",
        workers: int = 2,
        app: str | None = None,
        env: dict | None = None,
        args: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
        log_path: Path | None = None,
        user_hooks: str = "",
    ) -> None:
        worker_class, default_app = WORKER_CLASSES[worker]
        self.dir = Path(shared_dir)
        self.port = free_port()
        self.env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": str(self.dir),
            "GUNICORN_BIND": f"127.0.0.1:{self.port}",
            "GUNICORN_WORKERS": str(workers),
            "GUNICORN_WORKER_CLASS": worker_class,
            "GUNICORN_TIMEOUT": "30",
            "GUNICORN_GRACEFUL_TIMEOUT": "5",
            "GUNICORN_THREADS": "2" if worker == "gthread" else "1",
            "PYTHONPATH": str(ROOT),
            **(env or {}),
        }
        self.cmd = [
            *prefix,
            str(BIN / "gunicorn"),
            "-c",
            str(CONFIG),
            *NO_CONTROL_SOCKET,
            *args,
            app or default_app,
        ]
        self.log_path = log_path or self.dir.parent / f"gunicorn-{self.port}.log"
        if user_hooks:
            # A user's own config: the project's, with their hooks above its wire(globals()).
            config = self.dir.parent / f"gunicorn-{self.port}.conf.py"
            text = CONFIG.read_text().replace("wire(globals())", user_hooks + "wire(globals())")
            config.write_text(text)
            self.cmd[self.cmd.index(str(CONFIG))] = str(config)
        self.proc: subprocess.Popen | None = None
        self.seen_pids: set[int] = set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> Master:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=self.log)
        if wait:
            n = int(self.env["GUNICORN_WORKERS"])
            self.wait_workers(n)
            wait_for(lambda: http_get(self.url + "/", timeout=2)[0] == 200, 15, "app answers")
        return self

    def file(self, kind: str) -> Path:
        """Its file of `kind`: counter, histogram, gauge_max, or master (its state file)."""
        own = self.dir / "gunicorn-monitor"
        if kind == "master":
            return own / f"master-{self.pid}.json"
        return own / f"{kind}_{self.pid}.db"

    def state(self) -> dict:
        path = self.file("master")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def worker_pids(self) -> list[int]:
        pids = [int(p) for p in self.state().get("workers", {})]
        self.seen_pids.update(pids)
        return [p for p in pids if alive(p)]

    def live_children(self) -> list[int]:
        """The master's children by the kernel, not by our state file (which a fault test may
        have removed), without zombies: a killed worker stays a child until the master reaps it.
        """
        return [c.pid for c in psutil.Process(self.pid).children() if alive(c.pid)]

    def kill_a_worker(self, n: int, timeout: float = 10) -> None:
        """SIGKILL one worker and wait until the master has replaced it: n live workers again,
        the killed one not among them."""
        victim = wait_for(lambda: (kids := self.live_children()) and kids[0], timeout, "a worker")
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: victim not in (kids := self.live_children()) and len(kids) == n,
            timeout,
            "a respawn",
        )

    def wait_workers(self, n: int, exclude: set[int] = frozenset(), timeout: float = 20) -> list:
        def ready() -> list[int] | None:
            pids = [p for p in self.worker_pids() if p not in exclude]
            return pids if len(pids) == n and len(self.worker_pids()) == n else None

        return wait_for(ready, timeout, f"{n} workers")

    def heartbeating(self) -> None:
        """Every worker has notified once: Gunicorn never times out a worker before its first
        heartbeat (the file's first mtime is wall-clock time, compared with the monotonic
        clock), and tornado's first one comes a second after it starts serving."""

        def old_enough() -> bool:
            ages = [time.time() - psutil.Process(p).create_time() for p in self.worker_pids()]
            return bool(ages) and min(ages) > 1.5

        wait_for(old_enough, 10, "workers past their first heartbeat")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def output(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is None:
            return
        self.worker_pids()
        # Every process the master started, recorded or not (a worker forked after the last
        # state read, a USR2 master): by pid, taken before the master goes and they are orphans,
        # and with the master stopped first, so that it forks none after the list is taken (a
        # HUP's new workers).
        try:
            os.kill(self.pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
        try:
            spawned = [c.pid for c in psutil.Process(self.pid).children(recursive=True)]
        except psutil.Error:
            spawned = []
        kill_all([self.pid, *self.seen_pids, *spawned])
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


class Exporter:
    """`gunicorn-monitor serve`; `scheme`, `ssl_context` and `headers` are how it is polled and
    scraped (https with a CA, basic auth credentials)."""

    def __init__(
        self,
        shared_dir: Path,
        args: tuple[str, ...] = (),
        env: dict | None = None,
        scheme: str = "http",
        ssl_context: ssl.SSLContext | None = None,
        headers: dict | None = None,
        prefix: tuple[str, ...] = (),
    ):
        self.scheme, self.ssl_context, self.headers = scheme, ssl_context, headers
        self.port = free_port()
        self.dir = Path(shared_dir)
        self.cmd = [
            *prefix,
            str(BIN / "gunicorn-monitor"),
            "serve",
            "--dir",
            str(self.dir),
            "--listen",
            f"127.0.0.1:{self.port}",
            *args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
        return http_get(self.url + path, timeout, self.headers, self.ssl_context)

    def start(self) -> Exporter:
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        wait_for(lambda: self.get("/-/healthy", 2)[0] == 200, 15, "exporter healthy")
        return self

    def scrape(self) -> dict[tuple, float]:
        status, body = self.get("/metrics")
        assert status == 200, body
        return parse(body.decode())

    def kill(self) -> None:
        if self.proc is not None:
            kill_all([self.proc.pid])
            self.proc.wait(10)


# An app with no prometheus_client metrics of its own, WSGI and ASGI: for tests of the hooks
# alone (with the directory removed, the demo app's own library fails the first request of a
# worker that booted before, which is the app's business), and a base for slower variants.
PLAIN_APP = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\\n"]


async def asgi_app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok\\n"})
"""


def write_multiprocess_file(path: Path, entries: list[tuple[Any, str, dict, float]]) -> None:
    """A file in prometheus_client's multiprocess format, as another writer left it: each entry
    (a metrics.Spec, the sample name, its labels, the value)."""
    f = MmapedDict(str(path))
    try:
        for spec, sample, labels, v in entries:
            key = mmap_key(spec.name, sample, list(labels), list(labels.values()), spec.help)
            f.write_value(key, v, 0.0)
    finally:
        f.close()


def write_master(
    layout: Layout, pid: int, spawns: int = 1, crashes: int = 0, stopped: bool = True
) -> None:
    """A master's counts and state, as the recorder writes them (its usual series declared);
    `stopped`: its state says so, as a master's on_exit (or its orphans' counter) leaves it."""
    fd = directory.open_private(layout)
    try:
        s = Store(str(pid))
        for spec in (metrics.WORKER_SPAWNS, metrics.WORKER_RESTARTS, metrics.MASTER_RELOADS):
            s.declare(spec)
        for cause, sig in causes.KNOWN_EXITS:
            s.declare(metrics.WORKER_EXITS, cause=cause, signal=sig)
        s.inc(metrics.WORKER_SPAWNS, spawns)
        if crashes:
            s.inc(metrics.WORKER_EXITS, crashes, cause="crash", signal="none")
            s.observe(metrics.WORKER_LIFETIME, 5.0, cause="crash")
        s.set_max(metrics.LAST_DEPLOY, 1_700_000_000.0 + spawns)
        s.write(fd)
        recorded = {"pid": pid, "start_time": 1.0, "start_ticks": 1, "version": "27.0.1"}
        recorded |= {"worker_class": "sync", "workers": {}}
        state.write(layout, pid, {**recorded, "stopped": stopped}, fd)
    finally:
        os.close(fd)


def promtool_path() -> str | None:
    """Debian's promtool: on PATH, or where scripts/prometheus.sh extracts it."""
    return shutil.which("promtool") or shutil.which(
        "promtool", path=str(ROOT / ".tools" / "root" / "usr" / "bin")
    )


def check_metrics(body: bytes) -> str:
    """`promtool check metrics` on a scrape's text: asserts it passes; returns what promtool
    said, its lint findings."""
    promtool = promtool_path()
    assert promtool, "promtool not found: run `source scripts/prometheus.sh` first"
    check = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60
    )
    output = (check.stdout + check.stderr).decode()
    assert check.returncode == 0, output
    return output


def gone_masters(shared: Path, n: int, first_pid: int = 100_000) -> int:
    """The files of `n` dead masters, each accounted for (its state file says `stopped`, as a
    clean exit leaves it), a day old; returns the spawns they hold.

    Four kinds of master (some crashed workers, some not) written by the recorder's own
    writer once, then copied byte for byte under further pids (only the state file names its
    pid), from `first_pid` on: a range no process has (the caller's choice). What months of
    restarts leave: benchmarks/growth.py's directory, and the tests' smaller ones."""
    layout = directory.Layout(str(shared))
    own = Path(layout.own)
    templates = []
    for kind in range(4):
        pid = 4_000_000 + kind
        write_master(layout, pid, spawns=1 + kind, crashes=kind % 2)
        files = {}
        for path in own.glob(f"*{pid}*"):
            files[path.name.replace(str(pid), "{}")] = path.read_bytes()
            path.unlink()
        templates.append(files)
    day_ago = time.time() - 86400
    spawns = 0
    for i in range(n):
        kind, pid = i % 4, first_pid + i
        for pattern, data in templates[kind].items():
            name = pattern.format(pid)
            if name.startswith("master-"):
                data = data.replace(b'"pid":%d' % (4_000_000 + kind), b'"pid":%d' % pid)
            fd = os.open(own / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.close(fd)
            os.utime(own / name, (day_ago, day_ago))
        spawns += 1 + kind
    return spawns


def parse(text: str) -> dict[tuple, float]:
    """{(sample name, ((label, value), ...)): value} for every sample of a scrape."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def exits(samples: dict[tuple, float]) -> dict[tuple[str, str], float]:
    """The non-zero gunicorn_worker_exits_total series, as {(cause, signal): count}."""
    found = {}
    for (name, labels), value in samples.items():
        if name == "gunicorn_worker_exits_total" and value:
            d = dict(labels)
            found[(d["cause"], d["signal"])] = value
    return found


def value(samples: dict[tuple, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
