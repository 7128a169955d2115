"""An app that serves its own /metrics with a stock MultiProcessCollector keeps every count.

prometheus_client's recipe for Gunicorn is a stock `MultiProcessCollector` on
$PROMETHEUS_MULTIPROC_DIR, the directory the monitor shares. That collector sums whatever the
`*.db` glob holds when it reads, so a dead worker's file moved out of the glob is a dip in the
app's own counters. Folding (which moves them) is off by default; these tests read the same
directory with the stock collector in the test process while real Gunicorn and the real sidecar
run, and show what switching folding on means.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from monitor.contract.appfiles import FOLD_ENV
from tests.harness import BIN, CONFIG, ROOT, exits, free_port, http_get, value, wait_for

RECYCLES = 1000
APP_COUNTER = "demo_requests_total"  # examples/app.py counts every request it answers


@pytest.fixture(autouse=True)
def folding_unset(monkeypatch):
    """The default is what these tests are about: no inherited switch."""
    monkeypatch.delenv(FOLD_ENV, raising=False)


def stock_reader(directory: Path) -> Callable[[], float]:
    """The app's counter as the app itself would serve it: a stock collector on the directory."""
    collector = MultiProcessCollector(None, path=str(directory))

    def total() -> float:
        return sum(s.value for m in collector.collect() for s in m.samples if s.name == APP_COUNTER)

    return total


class Watch(threading.Thread):
    """Reads a total every `interval` seconds until stopped (a fast Prometheus), keeping every
    decrease and every failure."""

    def __init__(self, read: Callable[[], float], interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.read, self.interval = read, interval
        self.done = threading.Event()
        self.reads, self.last = 0, 0.0
        self.app_races = 0
        self.decreases: list[tuple[float, float]] = []
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.done.wait(self.interval):
            try:
                now = self.read()
            except struct.error:
                # A worker's file caught between its creation and its header (the app's own race,
                # client_python#1199). A file moved away by the monitor is FileNotFoundError.
                self.app_races += 1
                continue
            except Exception as e:
                self.failures.append(repr(e))
                continue
            if now < self.last:
                self.decreases.append((self.last, now))
            self.last = now
            self.reads += 1

    def stop(self) -> Watch:
        self.done.set()
        self.join(30)
        return self


def sidecar_reader(exporter) -> Callable[[], float]:
    def total() -> float:
        return value(exporter.scrape(), APP_COUNTER, endpoint="/")

    return total


# Gunicorn sleeps up to 0.1 s after each spawn (Arbiter.spawn_workers), so 1,000 recycles take a
# minute at best: 60-150 s on the 2 shared cores this was written on.
@pytest.mark.timeout(400)
def test_a_stock_collector_never_sees_an_app_counter_drop_through_1000_recycles(
    make_master, make_exporter, shared_dir
):
    # Preloaded, so each of the 1,000 replacements is a bare fork (the test's time is spawns).
    env = {"GUNICORN_MAX_REQUESTS": "1", "GUNICORN_PRELOAD_APP": "true"}
    m = make_master(workers=2, env=env).start(wait=False)
    m.wait_workers(2)
    e = make_exporter()
    stock, sidecar = Watch(stock_reader(shared_dir)), Watch(sidecar_reader(e))
    stock.start()
    sidecar.start()
    try:
        for _ in range(RECYCLES):  # each request ends its worker (max_requests=1)
            assert http_get(m.url + "/")[0] == 200
        # Every answered request was counted before its response left, so already in the files.
        final = stock_reader(shared_dir)()
        want = {("max_requests", "none"): float(RECYCLES)}
        wait_for(lambda: exits(e.scrape()) == want, 60, f"{RECYCLES} recycles counted")
        wait_for(lambda: sidecar.last == RECYCLES, 30, "the sidecar to serve every request")
    finally:
        stock.stop()
        sidecar.stop()
    assert stock.failures == [] and sidecar.failures == []
    assert stock.decreases == [], stock.decreases[:5]
    assert sidecar.decreases == [], sidecar.decreases[:5]
    assert stock.reads > 20 and sidecar.reads > 20  # read all along, not just at the end
    assert final == RECYCLES
    assert stock_reader(shared_dir)() == RECYCLES
    # Nothing left the glob: every dead worker's file is where the app wrote it.
    assert len(list(shared_dir.glob("counter_*.db"))) >= RECYCLES
    assert not (shared_dir / ".compacting").exists()


def test_folding_on_hides_dead_workers_from_a_stock_collector_until_a_sidecar_folds_them(
    make_master, make_exporter, shared_dir
):
    m = make_master(workers=2, env={"GUNICORN_MAX_REQUESTS": "1", FOLD_ENV: "1"}).start(wait=False)
    m.wait_workers(2)
    for _ in range(20):
        assert http_get(m.url + "/")[0] == 200
    staged = shared_dir / ".compacting" / "staged"
    wait_for(lambda: len(list(staged.glob("*~counter_*.db"))) == 20, 10, "20 files staged")
    assert stock_reader(shared_dir)() == 0  # the dip a stock collector sees with folding on
    # A sidecar with folding off still folds what a fold-on run left staged: nothing is lost.
    e = make_exporter()
    assert value(e.scrape(), APP_COUNTER, endpoint="/") == 20
    assert stock_reader(shared_dir)() == 20  # back, from counter_aggregate.db
    assert list(staged.iterdir()) == []


def _dead_writer(directory: Path, count: int) -> str:
    """A process that counts `count` requests in the app's counter and exits: dead files."""
    code = (
        "from prometheus_client import Counter\n"
        f"Counter('demo_requests', 'x', ['endpoint']).labels('/').inc({count})\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)
    (name,) = [p.name for p in directory.glob("counter_*.db")]
    return name


@pytest.mark.parametrize(
    ("args", "env", "folds"),
    [
        ((), {}, False),
        (("--app-metrics.fold",), {}, True),
        ((), {FOLD_ENV: "true"}, True),
        (("--app-metrics.fold=false",), {FOLD_ENV: "1"}, False),
    ],
    ids=["default", "flag", "env", "flag-over-env"],
)
def test_the_sidecar_folds_dead_workers_files_only_when_told(
    make_exporter, shared_dir, args, env, folds
):
    name = _dead_writer(shared_dir, 3)
    e = make_exporter(args=args, env=env)
    assert value(e.scrape(), APP_COUNTER, endpoint="/") == 3
    # Folding on moves the dead worker's file to disk in the background, from the first scrape.
    wait_for(lambda: (shared_dir / "counter_aggregate.db").exists() or not folds, 30, "folded")
    assert value(e.scrape(), APP_COUNTER, endpoint="/") == 3
    assert (shared_dir / name).exists() is not folds
    assert (shared_dir / "counter_aggregate.db").exists() is folds
    assert stock_reader(shared_dir)() == 3  # after the fold has landed, the stock total agrees


def test_a_bad_switch_stops_both_processes_before_they_start(shared_dir):
    env = {
        **os.environ,
        FOLD_ENV: "perhaps",
        "PROMETHEUS_MULTIPROC_DIR": str(shared_dir),
        "GUNICORN_BIND": f"127.0.0.1:{free_port()}",
        "PYTHONPATH": str(ROOT),
    }
    for cmd in (
        [str(BIN / "gunicorn"), "-c", str(CONFIG), "examples.app:app"],
        [str(BIN / "gunicorn-monitor"), "serve", "--dir", str(shared_dir)],
    ):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.splitlines()
        assert FOLD_ENV in line and "perhaps" in line
