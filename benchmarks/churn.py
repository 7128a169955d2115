"""Worker churn against ground truth: is every exit counted exactly once, under its true cause?

Several real Gunicorn masters (the project's gunicorn.conf.py, sync workers, preloaded app) share
one directory, and one real sidecar (`gunicorn-monitor serve`) serves it. Each master is given
exactly one way for its workers to die, so the driver's own records are the exact truth:

  max_requests  `max_requests=1`: every 200 answered on `/` is one worker that served its request
                and recycles; nothing else ends workers there
  killed        `kill -9` of a booted worker of the "signals" master (psutil, pid reuse checked)
  signal        a stray `kill -TERM` of a booted worker of the same master (one signal per worker)
  crash         `/exit?code=7`: every request the server closes without answering is one worker
                gone by os._exit(7)
  timeout       `/sleep?s=60` on a master with a 3 s timeout: every request that comes back (500)
                or is cut is one worker aborted for a missed heartbeat
  reload        SIGHUP to a master whose N workers are all booted: exactly those N retire

The sidecar is SIGKILLed and restarted twice (at a third and two thirds of the exits); a scraper
reads /metrics once a second throughout. At the end, once the counts settle, it prints induced vs
counted per cause, lost and doubled exits (both must be 0), whether any counter of the directory
went backwards between two scrapes (counters the sidecar keeps in memory are left out), and
the app's own multiprocess counter against the requests it answered.

    python benchmarks/churn.py [--exits 10000] [--workers 8]
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
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.harness import BIN, Master, free_port, http_get, kill_all, wait_for  # noqa: E402

# Share of --exits per cause; timeouts take seconds each, so they are the smallest share.
# A max_requests recycle is the dearest exit (a full interpreter teardown), os._exit the cheapest.
SHARES = {
    "max_requests": 0.25,
    "killed": 0.20,
    "signal": 0.10,
    "crash": 0.25,
    "timeout": 0.05,
    "reload": 0.15,
}
# Counters the sidecar keeps in its own memory, which restart with its process (its self-metrics,
# memory at exit), or follow the worker now in a slot (CPU seconds). Every other counter comes
# from the directory and must never go backwards.
SIDECAR_LOCAL = (
    "gunicorn_exporter_",
    "gunicorn_worker_exit_memory_bytes",
    "gunicorn_worker_cpu_seconds",
    "process_",
    "python_",
)


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
    """The driver's own record of what it induced; thread-safe."""

    def __init__(self, quotas: dict[str, int]) -> None:
        self.quotas = quotas
        self.induced: Counter = Counter()
        self.claimed: Counter = Counter()
        self.ambiguous: Counter = Counter()  # requests whose outcome proves nothing either way
        self.app_requests: Counter = Counter()  # requests the app counted (it counts on entry)
        self.last_at: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def claim(self, cause: str) -> bool:
        """One more attempt at `cause`, unless its quota is already claimed."""
        with self.lock:
            if self.stop.is_set() or self.claimed[cause] >= self.quotas[cause]:
                return False
            self.claimed[cause] += 1
            return True

    def add(self, cause: str, n: int = 1) -> None:
        with self.lock:
            self.induced[cause] += n
            self.last_at[cause] = time.monotonic()

    def total(self) -> int:
        with self.lock:
            return sum(self.induced.values())


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


def drive_requests(truth: Truth, cause: str, port: int, path: str, ok: tuple) -> None:
    """Requests until the quota is claimed; an outcome in `ok` is one induced exit."""
    endpoint = path.split("?")[0]
    while truth.claim(cause):
        outcome = request(port, path)
        truth.app_requests[endpoint] += 1
        if outcome in ok:
            truth.add(cause)
        else:
            truth.ambiguous[f"{cause}: {outcome}"] += 1


def drive_signals(truth: Truth, master: Master) -> None:
    """One signal per booted worker, SIGKILL or SIGTERM in proportion to what is left to do."""
    signalled: list[psutil.Process] = []
    seen: set[tuple[int, float]] = set()
    while not truth.stop.is_set():
        left = {c: truth.quotas[c] - truth.claimed[c] for c in ("killed", "signal")}
        if not any(v > 0 for v in left.values()):
            break
        for p in booted_workers(master):
            key = (p.pid, p.create_time())
            if key in seen:
                continue
            left = {c: truth.quotas[c] - truth.claimed[c] for c in ("killed", "signal")}
            cause = "killed" if left["killed"] >= left["signal"] else "signal"
            if not truth.claim(cause):
                break
            seen.add(key)
            try:
                p.send_signal(signal.SIGKILL if cause == "killed" else signal.SIGTERM)
            except psutil.NoSuchProcess:
                truth.ambiguous[f"{cause}: gone before the signal"] += 1
                continue
            truth.add(cause)
            signalled.append(p)
        time.sleep(0.05)
    # A signalled worker must really have left (a SIGTERM is only a request to leave).
    wait_for(lambda: all(gone(p) for p in signalled), 60, "every signalled worker gone")
    truth.last_at["killed"] = truth.last_at["signal"] = time.monotonic()


def drive_reloads(truth: Truth, master: Master, workers: int) -> None:
    """HUP a master whose workers are all booted and alone; exactly those retire."""

    def settled() -> list[psutil.Process] | None:
        booted = booted_workers(master, min_age=0.2)
        everyone = psutil.Process(master.pid).children()
        return booted if len(booted) == workers == len(everyone) else None

    while truth.claim("reload"):
        old = wait_for(settled, 60, "the HUP master's workers all up")
        master.signal(signal.SIGHUP)
        wait_for(lambda o=old: all(gone(p) for p in o), 60, "the old workers retired")
        truth.add("reload", len(old))
        # The quota is in exits, and each HUP retires `workers` of them.
        with truth.lock:
            truth.claimed["reload"] += len(old) - 1


class Sidecar:
    """The real exporter process, restartable on the same port."""

    def __init__(self, shared: Path, log: Path) -> None:
        self.shared, self.port, self.log = shared, free_port(), log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [str(BIN / "gunicorn-monitor"), "serve", "--dir", str(self.shared)]
        cmd += ["--listen", f"127.0.0.1:{self.port}"]
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)
        url = f"http://127.0.0.1:{self.port}/-/healthy"
        wait_for(lambda: http_get(url, 2)[0] == 200, 30, "sidecar healthy")

    def kill(self) -> None:
        if self.proc is not None:
            kill_all([self.proc.pid])
            self.proc.wait(10)


class Scraper(threading.Thread):
    """Once a second: every counter sample, and whether any went backwards since the last."""

    def __init__(self, sidecar: Sidecar) -> None:
        super().__init__(daemon=True)
        self.sidecar = sidecar
        self.ok = self.failed = 0
        self.durations: list[float] = []
        self.backwards: list[str] = []
        self.last: dict[tuple, float] = {}
        self.lock = threading.Lock()
        self.halt = threading.Event()

    def scrape(self) -> dict[tuple, float] | None:
        began = time.monotonic()
        status, body = http_get(f"http://127.0.0.1:{self.sidecar.port}/metrics", 10)
        if status != 200:
            return None
        self.durations.append(time.monotonic() - began)
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            if family.type not in ("counter", "histogram") or family.name.startswith(SIDECAR_LOCAL):
                continue
            for s in family.samples:
                if not s.name.endswith("_created"):
                    samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    def once(self) -> dict[tuple, float] | None:
        samples = self.scrape()
        with self.lock:
            if samples is None:
                self.failed += 1
                return None
            self.ok += 1
            for key, before in self.last.items():
                after = samples.get(key)
                if after is not None and after < before:
                    self.backwards.append(f"{key[0]}{dict(key[1])}: {before} -> {after}")
            self.last = {**self.last, **samples}
            return samples

    def run(self) -> None:
        # Once a second; a scrape slower than that is followed by the next at once.
        next_at = time.monotonic()
        while not self.halt.wait(max(0.0, next_at - time.monotonic())):
            self.once()
            next_at = max(next_at + 1.0, time.monotonic())


def by_cause(samples: dict[tuple, float]) -> tuple[Counter, Counter]:
    """Exits counted per cause, and per (cause, signal)."""
    causes, pairs = Counter(), Counter()
    for (name, labels), v in samples.items():
        if name == "gunicorn_worker_exits_total" and v:
            d = dict(labels)
            causes[d["cause"]] += int(v)
            pairs[(d["cause"], d["signal"])] += int(v)
    return causes, pairs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", type=int, default=10000, help="worker exits to induce")
    ap.add_argument("--workers", type=int, default=8, help="workers per master")
    args = ap.parse_args()
    quotas = {c: round(args.exits * s) for c, s in SHARES.items()}
    truth = Truth(quotas)
    tmp = Path(tempfile.mkdtemp(prefix="gm-churn-"))
    shared = tmp / "multiproc"
    shared.mkdir()
    base = {"GUNICORN_PRELOAD_APP": "true", "GUNICORN_GRACEFUL_TIMEOUT": "5"}
    n = args.workers
    # name: (environment, workers). Timeouts and reloads take seconds per round: twice the
    # workers, so that they keep pace with the rest.
    specs = {
        "max_requests": ({"GUNICORN_MAX_REQUESTS": "1"}, n),
        "signals": ({}, n),
        "crash": ({}, n),
        "timeout": ({"GUNICORN_TIMEOUT": "3"}, 2 * n),
        "reload": ({}, 2 * n),
    }
    masters = {
        name: Master(shared, workers=w, env={**base, **env}, log_path=tmp / f"{name}.log")
        for name, (env, w) in specs.items()
    }
    sidecar = Sidecar(shared, tmp / "sidecar.log")
    scraper = Scraper(sidecar)
    print(f"churn: {args.exits} exits, {len(masters)} masters, {7 * n} sync workers")
    print(f"       directory {shared}, logs in {tmp}")
    cut = ("RemoteDisconnected", "ConnectionResetError")
    # (target, args, threads): the request drivers count an outcome in their last argument.
    plan = [
        (drive_signals, (truth, masters["signals"]), 1),
        (drive_reloads, (truth, masters["reload"], 2 * n), 1),
        (drive_requests, (truth, "max_requests", masters["max_requests"].port, "/", (200,)), 6),
        (drive_requests, (truth, "crash", masters["crash"].port, "/exit?code=7", cut), 4),
        (
            drive_requests,
            (truth, "timeout", masters["timeout"].port, "/sleep?s=60", (500, *cut)),
            2 * n,
        ),
    ]
    try:
        for m in masters.values():
            m.start(wait=False)
        for name, m in masters.items():
            m.wait_workers(specs[name][1], timeout=60)
        sidecar.start()
        scraper.start()
        start = time.monotonic()
        drivers = [
            threading.Thread(target=target, args=targs, daemon=True)
            for target, targs, threads in plan
            for _ in range(threads)
        ]
        for t in drivers:
            t.start()

        restarts = []
        for fraction in (1 / 3, 2 / 3):
            wait_for(lambda f=fraction: truth.total() >= f * args.exits, 1800, "progress")
            sidecar.kill()
            down = time.monotonic()
            time.sleep(2)  # exits keep happening while no sidecar runs: that is the point
            sidecar.start()
            restarts.append((truth.total(), time.monotonic() - down))
        for t in drivers:
            t.join()
        driven = time.monotonic() - start

        scraper.halt.set()
        scraper.join()

        # Settle: the last exits reach the counters within a loop turn of their master.
        def settled() -> dict | None:
            samples = scraper.once()
            if samples is None:
                return None
            counted, _ = by_cause(samples)
            return samples if all(counted[c] >= n for c, n in truth.induced.items()) else None

        try:
            final = wait_for(settled, 60, "counts to reach the induced exits")
        except AssertionError:
            final = scraper.once() or scraper.last
        time.sleep(3)  # and nothing more arrives late (a doubled exit would)
        final = scraper.once() or final
        report(truth, final, scraper, restarts, start, driven)
        counted, _ = by_cause(final)
        exact = all(counted[c] == truth.induced[c] for c in set(counted) | set(truth.induced))
        return 0 if exact and not scraper.backwards else 1
    finally:
        scraper.halt.set()
        truth.stop.set()
        sidecar.kill()
        for m in masters.values():
            m.kill()


def report(
    truth: Truth, final: dict, scraper: Scraper, restarts: list, start: float, driven: float
) -> None:
    counted, pairs = by_cause(final)
    print()
    print(f"{'cause':<14}{'induced':>9}{'counted':>9}{'lost':>6}{'doubled':>9}  signals counted")
    lost_total = doubled_total = 0
    for cause in sorted(set(truth.induced) | set(counted), key=lambda c: -truth.induced[c]):
        induced, got = truth.induced[cause], counted[cause]
        lost, doubled = max(0, induced - got), max(0, got - induced)
        lost_total += lost
        doubled_total += doubled
        sigs = ", ".join(f"{s} {n}" for (c, s), n in sorted(pairs.items()) if c == cause)
        print(f"{cause:<14}{induced:>9}{got:>9}{lost:>6}{doubled:>9}  {sigs}")
    total_induced, total_counted = sum(truth.induced.values()), sum(counted.values())
    print(f"{'total':<14}{total_induced:>9}{total_counted:>9}{lost_total:>6}{doubled_total:>9}")
    print()
    print(
        f"driven in {driven:.0f} s ({total_induced / driven:.1f} exits/s); each cause done after:"
    )
    print("  " + ", ".join(f"{c} {t - start:.0f} s" for c, t in sorted(truth.last_at.items())))
    for at, down in restarts:
        print(f"sidecar SIGKILLed after {at} exits, serving again {down:.1f} s later")
    took = sorted(scraper.durations) or [0.0]
    print(
        f"scrapes: {scraper.ok} answered, {scraper.failed} failed (sidecar down); each took"
        f" {took[len(took) // 2]:.2f} s median, {took[-1]:.2f} s at most"
    )
    print(f"counters gone backwards: {len(scraper.backwards) or 'none'}")
    for line in scraper.backwards[:20]:
        print(f"  {line}")
    app = {
        dict(labels).get("endpoint"): v
        for (name, labels), v in final.items()
        if name == "demo_requests_total"
    }
    for endpoint, sent in sorted(truth.app_requests.items()):
        print(
            f"app counter demo_requests_total{{endpoint={endpoint!r}}}: {app.get(endpoint, 0):.0f}"
            f" served, {sent} sent"
        )
    errors = sum(v for (n, _), v in final.items() if n == "gunicorn_monitor_hook_errors_total")
    print(f"hook errors counted: {errors:.0f}")
    if truth.ambiguous:
        print("requests or signals that proved nothing (left out of the truth):")
        for what, n in sorted(truth.ambiguous.items()):
            print(f"  {what}: {n}")


if __name__ == "__main__":
    sys.exit(main())
