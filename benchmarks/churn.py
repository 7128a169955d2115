"""Worker churn with faults, against ground truth: is every exit counted once, under its true
cause, while the directory is removed, the disk fills up, HUPs come in storms and the sidecar
is killed?

Thirteen real Gunicorn masters (the project's gunicorn.conf.py, preloaded app) of three worker
classes share one directory, on a small tmpfs mounted for the run, and one real sidecar
(`gunicorn-monitor serve`) serves it, scraped once a second. Each master is given exactly one way
for its workers to die, so the driver's own records are the exact truth (PLANS below):

  max_requests  `max_requests=1` on sync: every request answered is one worker that recycles
  crash         `/exit?code=7`: every request the server closes without answering is one worker
                gone by os._exit(7); one request at a time on gthread and uvicorn, which serve
                several at once
  killed        `kill -9` of a booted worker (psutil, pid reuse checked)
  signal        a stray `kill -TERM` of a booted worker (one signal per worker)
  timeout       `/sleep?s=60` with a 3 s timeout: every request that comes back (500) or is cut
                is one worker aborted for a missed heartbeat (uvicorn: the sleep blocks the
                event loop; one request at a time)
  reload        HUP storms: 2 to 4 HUPs 50 ms apart to a master whose N workers are all booted
                and alone; each HUP Gunicorn handled (its log says `Handling signal: hup`, the
                only place the kernel's merging of pending signals can be seen) retires exactly
                N workers, whether the ones it retires are booted or still booting

Faults, each at a fixed share of the exits (SCHEDULE), while every driver keeps going:
  removed       `rm -rf` of the directory itself, again each time it comes back, for 3 s;
                recreated by the masters, or by the driver (mkdir) as a deploy script does
  full          one file takes every free byte of the tmpfs for 10 s (topped up), then removed
  sidecar       the sidecar SIGKILLed and restarted 2 s later (once while the disk is full)
The masters keep their counts in memory while the directory is gone or full and write them when
it returns: nothing may be lost, doubled or `unknown`, and no counter read from the directory
may go backwards between two scrapes, across sidecar restarts included.

The demo app (examples.app, master sync-app) writes its own prometheus_client files into the
directory, as a user's app does, and the faults reach it; its outcomes stay exact:
- directory gone: the app's counter raises FileNotFoundError, which Gunicorn's sync worker
  takes for a socket error: the request is cut, and the worker still recycles (max_requests);
- disk full: prometheus_client stores through a mapping of a sparse file, and the first store
  into a new worker's file is SIGBUS: the request is cut and the worker dies (`signal`,
  SIGBUS, a crash that pages).
A cut is judged by the fault its request overlapped (the faults never overlap each other).
Every other master serves a plain app with no files there, so its outcomes never depend on the
faults. What the demo app's own counter (demo_requests_total{endpoint="/"}) can be held to,
given that a removal takes its files with it:
- before the first removal, with its requests paused, it equals the requests answered;
- at every scrape, it is at most the requests sent so far;
- at the end, it is at least the requests answered among those sent after the last removal
  ended (their workers' files are all in the directory that is left);
- it goes down only after a removal.

    python benchmarks/churn.py [--exits 10000] [--workers 8]     (as root: it mounts a tmpfs)
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import churn_faults  # noqa: E402
from benchmarks.churn_faults import FULL, REMOVED, SIDECAR, Faults, Tmpfs  # noqa: E402
from monitor.contract.appfiles import parse_name  # noqa: E402
from monitor.sidecar.compaction import read_entries  # noqa: E402
from tests.harness import BIN, WORKER_CLASSES, Master, free_port, http_get, kill_all, wait_for  # noqa: E402

ANY = "*"  # a signal the truth does not know (a timeout's SIGABRT or SIGKILL, a reload's)
CUT = ("RemoteDisconnected", "ConnectionResetError")


@dataclass(frozen=True)
class Plan:
    """One master: its class, its app, and its one way for workers to die."""

    name: str
    worker: str  # a key of tests.harness.WORKER_CLASSES
    drive: str  # "requests", "signals" or "storms"
    shares: dict[str, float]  # cause -> share of --exits
    workers: float = 1.0  # times --workers
    app: str = "plain"  # "demo": examples.app, with its own prometheus_client counter
    env: dict = field(default_factory=dict)
    path: str = ""  # requests: what each one asks
    threads: int = 1  # requests: how many in flight at once


RECYCLE = {"GUNICORN_MAX_REQUESTS": "1"}
SHORT_TIMEOUT = {"GUNICORN_TIMEOUT": "3"}
# Timeouts take seconds each, so they are the smallest shares; a max_requests recycle is the
# dearest exit (a full interpreter teardown), os._exit the cheapest. gthread has no timeout
# master: its workers time out only on a request that holds the GIL, a core for seconds each.
PLANS = [
    Plan("sync-app", "sync", "requests", {"max_requests": 0.14}, app="demo", env=RECYCLE,
         path="/", threads=4),
    Plan("sync-recycle", "sync", "requests", {"max_requests": 0.10}, env=RECYCLE, path="/",
         threads=4),
    Plan("sync-signals", "sync", "signals", {"killed": 0.12, "signal": 0.06}),
    Plan("sync-crash", "sync", "requests", {"crash": 0.15}, path="/exit?code=7", threads=4),
    Plan("sync-timeout", "sync", "requests", {"timeout": 0.045}, workers=2, env=SHORT_TIMEOUT,
         path="/sleep?s=60", threads=16),
    Plan("sync-reload", "sync", "storms", {"reload": 0.12}, workers=2),
    Plan("gthread-crash", "gthread", "requests", {"crash": 0.06}, workers=0.5,
         path="/exit?code=7"),
    Plan("gthread-signals", "gthread", "signals", {"killed": 0.025, "signal": 0.015},
         workers=0.5),
    Plan("gthread-reload", "gthread", "storms", {"reload": 0.04}, workers=0.5),
    Plan("uvicorn-crash", "uvicorn", "requests", {"crash": 0.05}, workers=0.5,
         path="/exit?code=7"),
    Plan("uvicorn-signals", "uvicorn", "signals", {"killed": 0.025, "signal": 0.015},
         workers=0.5),
    Plan("uvicorn-timeout", "uvicorn", "requests", {"timeout": 0.004}, workers=0.5,
         env=SHORT_TIMEOUT, path="/sleep?s=60"),
    Plan("uvicorn-reload", "uvicorn", "storms", {"reload": 0.04}, workers=0.5),
]  # fmt: skip

# (share of --exits, fault). The first removal comes after the app counter's exact check.
SCHEDULE = [
    (0.10, "removed"),
    (0.18, SIDECAR),
    (0.27, "full"),
    (0.37, "removed, recreated"),
    (0.46, SIDECAR),
    (0.55, "full, sidecar"),
    (0.66, "removed"),
    (0.76, "full"),
    (0.85, "removed, recreated"),
    (0.92, SIDECAR),
]

# Counters the sidecar keeps in its own memory, which restart with its process (its self-metrics,
# memory at exit), or follow the worker now in a slot (CPU seconds). Every other gunicorn_
# counter comes from the directory and must never go backwards.
SIDECAR_LOCAL = (
    "gunicorn_exporter_",
    "gunicorn_worker_exit_memory_bytes",
    "gunicorn_worker_cpu_seconds",
)
APP_COUNTER = ("demo_requests_total", (("endpoint", "/"),))

# The app of every master but sync-app: nothing of its own in the shared directory, so what
# becomes of a request never depends on the directory's faults.
PLAIN_APP = """
import os
import time
from urllib.parse import parse_qs


def _act(path, query):
    args = {k: float(v[0]) for k, v in parse_qs(query).items()}
    if path == "/exit":
        os._exit(int(args["code"]))
    if path == "/sleep":
        time.sleep(args["s"])  # under uvicorn, blocks the event loop: the heartbeat stops
    return b"ok\\n"


def app(environ, start_response):
    body = _act(environ.get("PATH_INFO", "/"), environ.get("QUERY_STRING", ""))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]


async def asgi_app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = _act(scope["path"], scope.get("query_string", b"").decode())
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})
"""


def request(port: int, path: str, timeout: float = 120.0) -> int | str:
    """The HTTP status, or the name of the error when no answer came."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__
    finally:
        conn.close()


class Truth:
    """The driver's own record of what it induced, per master; thread-safe."""

    def __init__(self, quotas: dict[tuple[str, str], int]) -> None:
        self.quotas = quotas  # (master, cause) -> exits to induce
        self.claimed: Counter = Counter()
        self.induced: Counter = Counter()  # (master, cause, signal or ANY) -> exits
        self.ambiguous: Counter = Counter()  # outcomes that prove nothing either way
        self.last_at: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def claim(self, master: str, cause: str) -> bool:
        """One more attempt at `cause`, unless its quota is already claimed."""
        with self.lock:
            key = (master, cause)
            if self.stop.is_set() or self.claimed[key] >= self.quotas[key]:
                return False
            self.claimed[key] += 1
            return True

    def left(self, master: str, cause: str) -> int:
        with self.lock:
            return self.quotas[(master, cause)] - self.claimed[(master, cause)]

    def add(self, master: str, cause: str, sig: str, n: int = 1) -> None:
        with self.lock:
            self.induced[(master, cause, sig)] += n
            self.last_at[master] = time.monotonic()

    def total(self) -> int:
        with self.lock:
            return sum(self.induced.values())


class AppRecord:
    """The demo app's requests: sent, and answered with when they were sent; and a gate that
    pauses them for the exact check of its counter."""

    def __init__(self) -> None:
        self.sent = 0
        self.in_flight = 0
        self.answered: list[float] = []  # monotonic send times of the requests answered
        self.lock = threading.Lock()
        self.open = threading.Event()
        self.open.set()


def booted_workers(master: Master, min_age: float = 1.0) -> list[psutil.Process]:
    """The master's live workers that have run for at least min_age seconds (past boot)."""
    now = time.time()
    found = []
    for p in psutil.Process(master.pid).children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and now - p.create_time() >= min_age:
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- what each outcome proves ----------------------------------------------------------------


def judge(plan: Plan, faults: Faults) -> Callable[[int | str, float, float], tuple | None]:
    """(cause, signal) of the exit a request's outcome proves, or None if it proves none."""
    (cause,) = plan.shares

    def max_requests(outcome: int | str, t0: float, t1: float) -> tuple | None:
        if outcome in (200, 500):  # the sync worker counts the request before the app runs
            return "max_requests", "none"
        if outcome in CUT and plan.app == "demo":
            during = faults.during(t0, t1) & {REMOVED, FULL}
            if during == {REMOVED}:  # the app's FileNotFoundError: cut, and it still recycles
                return "max_requests", "none"
            if during == {FULL}:  # prometheus_client's store into an unbacked page
                return "signal", "SIGBUS"
        return None

    def crash(outcome: int | str, t0: float, t1: float) -> tuple | None:
        return ("crash", "none") if outcome in CUT else None

    def timeout(outcome: int | str, t0: float, t1: float) -> tuple | None:
        return ("timeout", ANY) if outcome in (500, *CUT) else None

    return {"max_requests": max_requests, "crash": crash, "timeout": timeout}[cause]


# -- the drivers -----------------------------------------------------------------------------


def drive_requests(
    truth: Truth, plan: Plan, master: Master, faults: Faults, app: AppRecord
) -> None:
    """Requests until the quota is claimed; each outcome judged as `judge` says."""
    (cause,) = plan.shares
    verdict = judge(plan, faults)
    demo = plan.app == "demo"
    while True:
        if demo:
            app.open.wait()
        if not truth.claim(plan.name, cause):
            return
        if demo:
            with app.lock:
                app.sent += 1
                app.in_flight += 1
        t0 = time.monotonic()
        outcome = request(master.port, plan.path)
        t1 = time.monotonic()
        if demo:
            with app.lock:
                app.in_flight -= 1
                if outcome == 200:
                    app.answered.append(t0)
        found = verdict(outcome, t0, t1)
        if found is None:
            during = "/".join(sorted(faults.during(t0, t1))) or "no fault"
            truth.ambiguous[f"{plan.name}: {outcome} ({during})"] += 1
        else:
            truth.add(plan.name, *found)


def drive_signals(truth: Truth, plan: Plan, master: Master) -> None:
    """One signal per booted worker, SIGKILL or SIGTERM in proportion to what is left to do."""
    signalled: list[psutil.Process] = []
    seen: set[tuple[int, float]] = set()
    while not truth.stop.is_set():
        if truth.left(plan.name, "killed") <= 0 and truth.left(plan.name, "signal") <= 0:
            break
        for p in booted_workers(master):
            key = (p.pid, p.create_time())
            if key in seen:
                continue
            kill = truth.left(plan.name, "killed") >= truth.left(plan.name, "signal")
            cause = "killed" if kill else "signal"
            if not truth.claim(plan.name, cause):
                break
            seen.add(key)
            try:
                p.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            except psutil.NoSuchProcess:
                truth.ambiguous[f"{plan.name}: gone before the signal"] += 1
                continue
            truth.add(plan.name, cause, "SIGKILL" if kill else "SIGTERM")
            signalled.append(p)
        time.sleep(0.05)
    # A signalled worker must really have left (a SIGTERM is only a request to leave).
    wait_for(lambda: all(gone(p) for p in signalled), 60, "every signalled worker gone")
    truth.last_at[plan.name] = time.monotonic()


class LogCount:
    """How many times a line appears in a growing log file, read from where it was left."""

    def __init__(self, path: Path, needle: bytes) -> None:
        self.path, self.needle = path, needle
        self.offset, self.tail, self.n = 0, b"", 0

    def count(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        data = self.tail + data
        self.n += data.count(self.needle)
        self.tail = data[-(len(self.needle) - 1) :]
        return self.n


@dataclass
class Storms:
    storms: int = 0
    sent: int = 0
    handled: int = 0


def drive_storms(
    truth: Truth, plan: Plan, master: Master, workers: int, stats: Storms, log: Path
) -> None:
    """HUP storms on a master whose workers are all booted and alone; each HUP Gunicorn handled
    retires exactly `workers` of them."""
    hups = LogCount(log, b"Handling signal: hup")

    def calm(exclude: frozenset[int] = frozenset()) -> bool:
        kids = psutil.Process(master.pid).children()
        booted = booted_workers(master)
        return len(kids) == len(booted) == workers and not exclude & {p.pid for p in kids}

    def settled(exclude: frozenset[int] = frozenset()) -> bool:
        """Calm, and still so a second later with no HUP handled meanwhile (one still queued
        behind a reload that just ended would be)."""
        if not calm(exclude):
            return False
        handled = hups.count()
        time.sleep(1.0)
        return calm(exclude) and hups.count() == handled

    storm = 0
    while truth.claim(plan.name, "reload"):
        wait_for(settled, 180, f"{plan.name}: workers all booted and alone")
        before = hups.count()
        k = 2 + storm % 3  # storms of 2, 3 and 4 HUPs in turn
        storm += 1
        for _ in range(k - 1):
            master.signal(signal.SIGHUP)
            time.sleep(0.05)
        # The workers left when the storm is over are forked after its last HUP was sent.
        last = frozenset(p.pid for p in psutil.Process(master.pid).children())
        master.signal(signal.SIGHUP)
        wait_for(lambda o=last: settled(o), 180, f"{plan.name}: the storm over")
        handled = hups.count() - before
        truth.add(plan.name, "reload", ANY, handled * workers)
        with truth.lock:
            truth.claimed[(plan.name, "reload")] += handled * workers - 1
        stats.storms += 1
        stats.sent += k
        stats.handled += handled


# -- the sidecar and its scrapes -------------------------------------------------------------


class Sidecar:
    """The real exporter process, restartable on the same port."""

    def __init__(self, shared: Path, log: Path) -> None:
        self.shared, self.port, self.log = shared, free_port(), log
        self.proc: subprocess.Popen | None = None
        self.restarts: list[tuple[float, int, float]] = []  # (at, exits, down for)

    def start(self) -> None:
        cmd = [str(BIN / "gunicorn-monitor"), "serve", "--dir", str(self.shared)]
        cmd += ["--listen", f"127.0.0.1:{self.port}"]
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)
        url = f"http://127.0.0.1:{self.port}/-/healthy"
        wait_for(lambda: http_get(url, 2)[0] == 200, 60, "sidecar healthy")

    def kill(self) -> None:
        if self.proc is not None:
            kill_all([self.proc.pid])
            self.proc.wait(10)

    def restart(self, faults: Faults) -> None:
        window = faults.begin(SIDECAR)
        self.kill()
        time.sleep(2)  # exits keep happening while no sidecar runs: that is the point
        self.start()
        down = time.monotonic() - window.began
        faults.end(window, f"SIGKILLed, serving again {down:.1f} s later")


class Scraper(threading.Thread):
    """Once a second: every counter sample, and whether any the directory holds went backwards
    since the last scrape (with the faults under way meanwhile); the app's counter with when it
    was read; and the scrapes that said no master is up."""

    def __init__(self, sidecar: Sidecar, app: AppRecord, faults: Faults) -> None:
        super().__init__(daemon=True)
        self.sidecar, self.app, self.faults = sidecar, app, faults
        self.ok = self.failed = 0
        self.durations: list[float] = []
        self.backwards: list[tuple[float, str, float, float, str]] = []
        self.not_up: list[tuple[float, str]] = []
        self.last: dict[tuple, float] = {}
        self.last_at = time.monotonic()
        self.app_seen: list[tuple[float, float, int]] = []  # (monotonic, value, sent by then)
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.start_at = time.monotonic()

    def scrape(self) -> tuple[dict[tuple, float], float | None] | None:
        began = time.monotonic()
        status, body = http_get(f"http://127.0.0.1:{self.sidecar.port}/metrics", 10)
        with self.app.lock:
            sent = self.app.sent  # after the scrape: nothing sent later can be in it
        if status != 200:
            return None
        self.durations.append(time.monotonic() - began)
        samples, up = {}, None
        for family in text_string_to_metric_families(body.decode()):
            if family.name == "gunicorn_up":
                up = family.samples[0].value
            if family.type not in ("counter", "histogram") or family.name.startswith(SIDECAR_LOCAL):
                continue
            for s in family.samples:
                if not s.name.endswith("_created"):
                    samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        if APP_COUNTER in samples:
            self.app_seen.append((time.monotonic(), samples[APP_COUNTER], sent))
        return samples, up

    def once(self) -> dict[tuple, float] | None:
        began = time.monotonic()
        scraped = self.scrape()
        with self.lock:
            if scraped is None:
                self.failed += 1
                return None
            samples, up = scraped
            self.ok += 1
            now = time.monotonic()
            at = now - self.start_at
            during = "/".join(sorted(self.faults.during(self.last_at, now))) or "no fault"
            self.last_at = began
            if up != 1:
                self.not_up.append((at, during))
            for key, before in self.last.items():
                after = samples.get(key)
                if key[0].startswith("gunicorn_") and after is not None and after < before:
                    what = f"{key[0]}{dict(key[1])}"
                    self.backwards.append((at, what, before, after, during))
            self.last = {**self.last, **samples}
            return samples

    def run(self) -> None:
        # Once a second; a scrape slower than that is followed by the next at once.
        next_at = time.monotonic()
        while not self.halt.wait(max(0.0, next_at - time.monotonic())):
            self.once()
            next_at = max(next_at + 1.0, time.monotonic())


def by_cause(samples: dict[tuple, float]) -> Counter:
    """Exits counted per (cause, signal)."""
    pairs: Counter = Counter()
    for (name, labels), v in samples.items():
        if name == "gunicorn_worker_exits_total" and v:
            d = dict(labels)
            pairs[(d["cause"], d["signal"])] += int(v)
    return pairs


def per_master(shared: Path, names: dict[int, str]) -> dict[str, Counter]:
    """Exits per (cause, signal) in each master's own counts file in the directory."""
    found: dict[str, Counter] = {name: Counter() for name in names.values()}
    own = shared / "gunicorn-monitor"
    for entry in os.scandir(own):
        db = parse_name(entry.name)
        pid = db.ident.split("-")[0] if db is not None and db.typ == "counter" else ""
        if not pid.isdigit() or int(pid) not in names:
            continue
        for e in read_entries(entry.path):
            if e.name == "gunicorn_worker_exits_total" and e.value:
                d = dict(e.labels)
                found[names[int(pid)]][(d["cause"], d["signal"])] += int(e.value)
    return found


# -- the run ---------------------------------------------------------------------------------


class Load(threading.Thread):
    """The machine's 1-minute load average, every 5 s (the machine is shared)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(5):
            self.samples.append(os.getloadavg()[0])


def app_checkpoint(app: AppRecord, scraper: Scraper) -> str:
    """The app's requests paused: its counter must come to equal the requests it answered."""
    app.open.clear()
    try:
        wait_for(lambda: app.in_flight == 0, 120, "the app's requests in flight")
        with app.lock:
            answered = len(app.answered)

        def equal() -> bool:
            samples = scraper.once()
            return bool(samples) and samples.get(APP_COUNTER) == answered

        try:
            wait_for(equal, 60, "the app counter")
            return f"equal to the {answered} requests answered: ok"
        except AssertionError:
            seen = scraper.last.get(APP_COUNTER)
            return f"FAILED: {seen} served, {answered} answered"
    finally:
        app.open.set()


def run_faults(
    args: argparse.Namespace,
    truth: Truth,
    faults: Faults,
    shared: Path,
    mount: Path,
    sidecar: Sidecar,
    app: AppRecord,
    scraper: Scraper,
    notes: list[str],
) -> None:
    for share, what in SCHEDULE:
        try:
            wait_for(lambda s=share: truth.total() >= s * args.exits or truth.stop.is_set(), 3600)
        except AssertionError:
            return
        if truth.stop.is_set():
            return
        if what.startswith(REMOVED) and faults.first_begin(REMOVED) is None:
            notes.append(f"app counter before the first removal: {app_checkpoint(app, scraper)}")
        if what.startswith(REMOVED):
            churn_faults.remove(shared, faults, 3.0, recreate=what.endswith("recreated"))
        elif what == SIDECAR:
            sidecar.restart(faults)
        elif what.startswith(FULL):
            if what.endswith(SIDECAR):
                restart = threading.Timer(3.0, sidecar.restart, args=(faults,))
                restart.start()
                churn_faults.fill(mount, faults, 10.0)
                restart.join()
            else:
                churn_faults.fill(mount, faults, 10.0)
        time.sleep(5)  # faults never overlap (a request's outcome is judged by the one it met)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", type=int, default=10000, help="worker exits to induce")
    ap.add_argument("--workers", type=int, default=8, help="workers per master (some get more)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("churn.py mounts a tmpfs for the disk-full faults: run it as root", file=sys.stderr)
        return 2
    quotas = {(p.name, c): round(args.exits * s) for p in PLANS for c, s in p.shares.items()}
    truth = Truth(quotas)
    tmp = Path(tempfile.mkdtemp(prefix="gm-churn-"))
    (tmp / "churnapp.py").write_text(PLAIN_APP)
    tmpfs = Tmpfs(tmp / "tmpfs", "64m")
    shared = tmpfs.path / "multiproc"
    shared.mkdir(mode=0o700)
    faults = Faults(truth.total)
    app = AppRecord()
    storms = {p.name: Storms() for p in PLANS if p.drive == "storms"}
    base = {"GUNICORN_PRELOAD_APP": "true", "GUNICORN_GRACEFUL_TIMEOUT": "5"}
    sizes = {p.name: max(2, round(args.workers * p.workers)) for p in PLANS}
    masters: dict[str, Master] = {}
    for p in PLANS:
        env = {**base, **p.env}
        kind = WORKER_CLASSES[p.worker][1].split(":")[1]  # app or asgi_app
        target = None if p.app == "demo" else f"churnapp:{kind}"
        if p.app != "demo":
            env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{tmp}"
        masters[p.name] = Master(
            shared, worker=p.worker, workers=sizes[p.name], app=target, env=env,
            log_path=tmp / f"{p.name}.log",
        )  # fmt: skip
    sidecar = Sidecar(shared, tmp / "sidecar.log")
    scraper = Scraper(sidecar, app, faults)
    load = Load()
    notes: list[str] = []
    classes = sorted({p.worker for p in PLANS})
    print(
        f"churn: {args.exits} exits, {len(masters)} masters ({', '.join(classes)}),"
        f" {sum(sizes.values())} workers, {os.cpu_count()} CPUs,"
        f" load {os.getloadavg()[0]:.1f} at the start"
    )
    print(f"       directory {shared} (tmpfs of 64 MiB), logs in {tmp}")
    drivers: list[threading.Thread] = []
    for p in PLANS:
        m = masters[p.name]
        if p.drive == "requests":
            targs = [(drive_requests, (truth, p, m, faults, app))] * p.threads
        elif p.drive == "signals":
            targs = [(drive_signals, (truth, p, m))]
        else:
            targs = [(drive_storms, (truth, p, m, sizes[p.name], storms[p.name], m.log_path))]
        drivers += [threading.Thread(target=t, args=a, daemon=True) for t, a in targs]
    try:
        for m in masters.values():
            m.start(wait=False)
        for name, m in masters.items():
            wait_for(lambda m=m, n=sizes[name]: len(booted_workers(m, 0.0)) == n, 120, name)
        sidecar.start()
        scraper.start()
        load.start()
        start = time.monotonic()
        scraper.start_at = start
        fault_thread = threading.Thread(
            target=run_faults,
            args=(args, truth, faults, shared, tmpfs.path, sidecar, app, scraper, notes),
            daemon=True,
        )
        fault_thread.start()
        for t in drivers:
            t.start()
        for t in drivers:
            t.join()
        driven = time.monotonic() - start
        truth.stop.set()
        fault_thread.join()
        scraper.halt.set()
        scraper.join()
        load.halt.set()

        # Settle: the last exits reach the counters within a loop turn of their master.
        induced = Counter()
        for (_, cause, _), n in truth.induced.items():
            induced[cause] += n

        def settled() -> dict | None:
            samples = scraper.once()
            if samples is None:
                return None
            counted = Counter()
            for (cause, _), n in by_cause(samples).items():
                counted[cause] += n
            return samples if all(counted[c] >= n for c, n in induced.items()) else None

        try:
            final = wait_for(settled, 120, "counts to reach the induced exits")
        except AssertionError:
            final = scraper.once() or scraper.last
        time.sleep(3)  # and nothing more arrives late (a doubled exit would)
        final = scraper.once() or final
        directory = per_master(shared, {m.pid: name for name, m in masters.items()})
        ok = report(
            truth, final, directory, scraper, faults, storms, app, notes, start, driven, load
        )
        return 0 if ok else 1
    finally:
        scraper.halt.set()
        truth.stop.set()
        load.halt.set()
        sidecar.kill()
        for m in masters.values():
            m.kill()
        tmpfs.close()


# -- the report ------------------------------------------------------------------------------


def _signals(pairs: Counter, cause: str) -> str:
    return ", ".join(f"{s} {n}" for (c, s), n in sorted(pairs.items()) if c == cause) or "-"


def _table(title: str, rows: list[tuple[str, Counter, Counter]]) -> tuple[int, int, list[str]]:
    """Rows of (label, induced (cause, signal) pairs, counted pairs); returns lost, doubled and
    what disagrees."""
    print(f"\n{title:<26}{'induced':>9}{'counted':>9}{'lost':>6}{'doubled':>9}  signals counted")
    lost_total = doubled_total = 0
    wrong: list[str] = []
    for label, pairs, got_pairs in rows:
        causes = sorted(
            {c for c, _ in pairs} | {c for c, _ in got_pairs},
            key=lambda c: -sum(n for (k, _), n in pairs.items() if k == c),
        )
        for cause in causes:
            induced = sum(n for (c, _), n in pairs.items() if c == cause)
            got = sum(n for (c, _), n in got_pairs.items() if c == cause)
            lost, doubled = max(0, induced - got), max(0, got - induced)
            lost_total += lost
            doubled_total += doubled
            known = {s: n for (c, s), n in pairs.items() if c == cause}
            if ANY not in known:  # the truth knows every signal: they must match too
                counted = {s: n for (c, s), n in got_pairs.items() if c == cause}
                if known != counted:
                    wrong.append(f"{label} {cause}: signals induced {known}, counted {counted}")
            if lost or doubled:
                wrong.append(f"{label} {cause}: induced {induced}, counted {got}")
            name = f"{label} {cause}" if label else cause
            sigs = _signals(got_pairs, cause)
            print(f"{name:<26}{induced:>9}{got:>9}{lost:>6}{doubled:>9}  {sigs}")
    return lost_total, doubled_total, wrong


def report(
    truth: Truth,
    final: dict,
    directory: dict[str, Counter],
    scraper: Scraper,
    faults: Faults,
    storms: dict[str, Storms],
    app: AppRecord,
    notes: list[str],
    start: float,
    driven: float,
    load: Load,
) -> bool:
    plans = {p.name: p for p in PLANS}
    induced_pairs: Counter = Counter()
    by_class: dict[str, Counter] = {}
    counted_by_class: dict[str, Counter] = {}
    for (master, cause, sig), n in truth.induced.items():
        induced_pairs[(cause, sig)] += n
        by_class.setdefault(plans[master].worker, Counter())[(cause, sig)] += n
    for master, pairs in directory.items():
        counted_by_class.setdefault(plans[master].worker, Counter()).update(pairs)
    counted = by_cause(final)

    lost, doubled, wrong = _table("all masters (scraped)", [("", induced_pairs, counted)])
    total_induced, total_counted = sum(induced_pairs.values()), sum(counted.values())
    print(f"{'total':<26}{total_induced:>9}{total_counted:>9}{lost:>6}{doubled:>9}")
    rows = [(c, by_class.get(c, Counter()), counted_by_class.get(c, Counter())) for c in by_class]
    _, _, wrong_by_class = _table("per class (directory)", rows)
    in_files = sum(sum(c.values()) for c in directory.values())
    unknown = sum(n for (c, _), n in counted.items() if c == "unknown")

    print()
    print(f"driven in {driven:.0f} s ({total_induced / driven:.1f} exits/s)")
    if load.samples:
        s = load.samples
        print(
            f"machine: {os.cpu_count()} CPUs, 1-minute load {min(s):.1f} to {max(s):.1f}"
            f" (mean {sum(s) / len(s):.1f}) while driving"
        )
    print("faults (seconds from the start, exits counted by the driver then):")
    for w in faults.windows:
        began, ended = w.began - start, (w.ended or w.began) - start
        print(
            f"  +{began:5.0f} s  {w.kind:<8} {w.exits_before:>6} exits, {ended - began:4.1f} s,"
            f" {w.exits_after - w.exits_before:>4} exits meanwhile: {w.detail}"
        )
    for name, s in storms.items():
        print(
            f"  {name}: {s.storms} HUP storms, {s.sent} HUPs sent 50 ms apart,"
            f" {s.handled} handled by Gunicorn (the kernel merges a HUP still pending)"
        )
    took = sorted(scraper.durations) or [0.0]
    print(
        f"scrapes: {scraper.ok} answered, {scraper.failed} failed (sidecar down); each took"
        f" {took[len(took) // 2]:.2f} s median, {took[-1]:.2f} s at most"
    )
    print(f"counters of the directory gone backwards: {len(scraper.backwards) or 'none'}")
    moments = Counter((round(at), during) for at, _, _, _, during in scraper.backwards)
    for (at, during), n in sorted(moments.items()):
        print(f"  +{at} s ({during}): {n} series")
    for at, what, before, after, _ in scraper.backwards[:10]:
        print(f"  +{at:.0f} s {what}: {before:g} -> {after:g}")
    moments = Counter(during for _, during in scraper.not_up)
    print(f"scrapes with gunicorn_up not 1: {sum(moments.values()) or 'none'}", end="")
    print("".join(f"; {n} during {during}" for during, n in sorted(moments.items())))
    print(f"exits in the masters' own files: {in_files} (scraped: {total_counted})")
    print(f"unknown: {unknown}")
    app_ok = _app_report(scraper, faults, app, notes, start)
    errors = {
        dict(labels)["hook"]: v
        for (n, labels), v in final.items()
        if n == "gunicorn_monitor_hook_errors_total" and v
    }
    print(f"hook errors counted: {errors or 'none'}")
    dir_faults = {
        dict(labels)["fault"]: v
        for (n, labels), v in final.items()
        if n == "gunicorn_monitor_directory_faults_total"
    }
    print(f"directory faults counted by the masters: {dir_faults or 'none'}")
    if truth.ambiguous:
        print("outcomes that proved nothing (left out of the truth):")
        for what, n in sorted(truth.ambiguous.items()):
            print(f"  {what}: {n}")
    for line in wrong + wrong_by_class:
        print(f"WRONG: {line}")
    return (
        not wrong
        and not wrong_by_class
        and not unknown
        and not scraper.backwards
        and in_files == total_counted
        and app_ok
    )


def _app_report(
    scraper: Scraper, faults: Faults, app: AppRecord, notes: list[str], start: float
) -> bool:
    """What the demo app's own counter can be held to (the module's docstring says why)."""
    ok = all("FAILED" not in n for n in notes)
    for line in notes:
        print(line)
    over = [(t, v, sent) for t, v, sent in scraper.app_seen if v > sent]
    ok &= not over
    print(f"app counter above the requests sent: {len(over) or 'never'}")
    first_removal = faults.first_begin(REMOVED)
    drops, early = 0, 0
    for (_, before, _), (t, after, _) in zip(scraper.app_seen, scraper.app_seen[1:], strict=False):
        if after < before:
            drops += 1
            early += first_removal is None or t < first_removal
    ok &= not early
    print(f"app counter went down: {drops} times, {early} before the first removal")
    last_removal = faults.last_end(REMOVED) or start
    with app.lock:
        after = sum(t0 > last_removal for t0 in app.answered)
        answered = len(app.answered)
    final = scraper.app_seen[-1][1] if scraper.app_seen else 0.0
    enough = after <= final <= app.sent
    ok &= enough
    print(
        f"app counter at the end: {final:.0f}; requests sent {app.sent}, answered {answered},"
        f" answered after the last removal {after}: {'ok' if enough else 'FAILED'}"
    )
    return ok


if __name__ == "__main__":
    sys.exit(main())
