"""Bounded growth: the sidecar over 50,000 gone masters' files, and the CLI over a 200 MB journal.

Part 1, dead masters. A real Gunicorn master (the project's gunicorn.conf.py, 2 sync workers)
runs in a directory that also holds the files of --masters dead masters (counts, histogram,
deploy gauge and state file saying `stopped` each, as the recorder leaves them at a clean exit,
last written a day ago): what months of restarts, or of a Gunicorn without a sidecar, leave.
In the same run:

- the baseline, prometheus_client's own multiprocess exporter (`MultiProcessCollector` behind
  `start_http_server`) serving a hard-linked copy of the same counts files, as the one existing
  kind of exporter would: time to its first answer, its scrapes, its CPU;
- `gunicorn-monitor serve`: time from its start to /-/ready answering 200, its first scrape,
  the time until the counts are served (its first retirement pass folds the dead masters'
  files into retired.json and removes them) and the slowest scrape meanwhile (once a
  second: they leave the counter families out), the files left, its scrapes after that (as
  Prometheus asks: OpenMetrics, gzip; "unchanged" as a quiet app's, "changed" after a worker
  exit), and its CPU while scraped every --interval seconds (Prometheus' default 15 s).
Both must serve the same gunicorn_worker_spawns_total (checked).

Part 2, the journal. A --journal-mb journal (an earlier version's: it rotated only when it could
take a lock), its last hour holding a few exits. `gunicorn-monitor events --last 100`,
`gunicorn-monitor status --json` and `gunicorn-monitor events > /dev/null` (all of it,
streamed), each a fresh process as a user runs it: wall time and peak RSS (VmHWM), against GNU
`tail -n 100` on the same file as the baseline (its RSS by /usr/bin/time where installed).

Targets: ready within 1 s, a scrape under 50 ms, idle CPU under 1 % of a core (part 1);
status and events --last 100 under 1 s and 100 MB RSS (part 2).

    python benchmarks/growth.py [--masters 50000] [--journal-mb 200] [--interval 15] [--window 60]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.exporter_cost import BASELINE, HEADERS, start_exporter  # noqa: E402
from monitor.contract import directory  # noqa: E402
from tests.harness import (  # noqa: E402
    BIN,
    Master,
    free_port,
    gone_masters,
    http_get,
    parse,
    value,
    wait_for,
)

CLI = str(BIN / "gunicorn-monitor")
SPAWNS = "gunicorn_worker_spawns_total"


def timed_get(
    url: str, headers: dict | None = None, timeout: float = 120.0
) -> tuple[float, int, bytes]:
    t0 = time.perf_counter()
    status, body = http_get(url, timeout, headers)
    return time.perf_counter() - t0, status, body


def samples_of(body: bytes) -> dict:
    if body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    text = body.decode()
    if text.endswith("# EOF\n"):
        text = text[: -len("# EOF\n")]
    return parse(text)


def cpu_share(proc: psutil.Process, url: str, interval: float, window: float) -> float:
    """CPU of `proc` over `window` seconds, scraped every `interval` (as Prometheus does)."""
    c0 = sum(proc.cpu_times()[:2])
    t0 = next_at = time.monotonic()
    while time.monotonic() - t0 < window:
        http_get(url, 120, HEADERS)
        next_at += interval
        time.sleep(max(0.0, min(next_at, t0 + window) - time.monotonic()))
    return (sum(proc.cpu_times()[:2]) - c0) / (time.monotonic() - t0)


def part_masters(n: int, interval: float, window: float) -> bool:
    base_dir = Path(tempfile.mkdtemp(prefix="gm-growth-"))
    shared = base_dir / "multiproc"
    shared.mkdir()
    master = Master(shared, workers=2)
    procs: list[subprocess.Popen] = []
    try:
        master.start()
        t = time.perf_counter()
        gone_spawns = gone_masters(shared, n)
        print(f"{n:,} gone masters' files written in {time.perf_counter() - t:.1f} s")
        own = shared / "gunicorn-monitor"
        files_before = len(os.listdir(own))
        stock_dir = base_dir / "stock"
        stock_dir.mkdir()
        for name in os.listdir(own):
            if name.endswith(".db"):
                os.link(own / name, stock_dir / name)

        # The baseline.
        port = free_port()
        stock = start_exporter([sys.executable, "-c", BASELINE, str(stock_dir), str(port)])
        procs.append(stock)
        url = f"http://127.0.0.1:{port}/metrics"
        t0 = time.perf_counter()
        wait_for(lambda: http_get(url, 300)[0] == 200, 600, "the stock exporter")
        stock_first = time.perf_counter() - t0
        stock_scrapes = [timed_get(url, HEADERS)[0] for _ in range(3)]
        stock_spawns = value(samples_of(http_get(url, 300, HEADERS)[1]), SPAWNS)
        stock_cpu = cpu_share(psutil.Process(stock.pid), url, interval, window)
        stock.kill()
        stock.wait()

        # Ours.
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        ours = start_exporter([CLI, "serve", "--dir", str(shared), "--listen", f"127.0.0.1:{port}"])
        procs.append(ours)
        wait_for(lambda: http_get(base + "/-/ready", 5)[0] == 200, 120, "ready")
        ready = time.perf_counter() - t0
        first, status, _ = timed_get(base + "/metrics", HEADERS)
        assert status == 200
        expected = gone_spawns + 2.0  # and the live master's two workers

        # Scraped once a second meanwhile (each scrape of a directory of 175,000 files costs
        # a listing and a read of every state file: a tighter loop would measure itself).
        waiting = []  # the scrapes made before the counts are served
        while True:
            took, _, body = timed_get(base + "/metrics", HEADERS)
            if value(samples_of(body), SPAWNS) != 0:
                break
            waiting.append(took)
            assert time.perf_counter() - t0 < 900, "the counts never served"
            time.sleep(1.0)
        counted = time.perf_counter() - t0
        ours_spawns = value(samples_of(http_get(base + "/metrics", 60, HEADERS)[1]), SPAWNS)
        assert ours_spawns == stock_spawns == expected, (ours_spawns, stock_spawns, expected)
        wait_for(lambda: len(os.listdir(own)) < 20, 600, "the state files retired too")
        files_after = len(os.listdir(own))
        for _ in range(5):  # warm up
            http_get(base + "/metrics", 60, HEADERS)
        unchanged = [timed_get(base + "/metrics", HEADERS)[0] for _ in range(200)]
        changed = []
        for _ in range(10):
            victim = master.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            master.wait_workers(2, exclude={victim})
            changed.append(timed_get(base + "/metrics", HEADERS)[0])
        ours_cpu = cpu_share(psutil.Process(ours.pid), base + "/metrics", interval, window)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        master.kill()
        shutil.rmtree(base_dir, ignore_errors=True)

    def ms(xs: list[float], q: float) -> str:
        return f"{1e3 * statistics.quantiles(xs, n=100)[q - 1]:.1f}" if len(xs) > 1 else "-"

    print(
        f"\n{n:,} gone masters ({files_before:,} files), one live master; both serve "
        f"{SPAWNS} = {ours_spawns:.0f}"
    )
    print(f"{'':34}{'stock (baseline)':>18}{'gunicorn-monitor':>18}")
    print(f"{'first answer / ready (s)':34}{stock_first:>18.2f}{ready:>18.2f}")
    print(f"{'first scrape (s)':34}{stock_scrapes[0]:>18.2f}{first:>18.2f}")
    print(f"{'counts served after (s)':34}{stock_first:>18.2f}{counted:>18.2f}")
    before = f"{1e3 * max(waiting):.1f} ({len(waiting)})" if waiting else "-"
    print(f"{'scrapes until then, max ms (n)':34}{'':>18}{before:>18}")
    print(f"{'files in gunicorn-monitor/ after':34}{files_before:>18,}{files_after:>18,}")
    quiet = f"{ms(unchanged, 50)} / {ms(unchanged, 99)}"
    stock_ms = 1e3 * statistics.median(stock_scrapes)
    print(f"{'scrape, unchanged p50/p99 (ms)':34}{stock_ms:>18.0f}{quiet:>18}")
    exited = f"{1e3 * statistics.median(changed):.1f} / {1e3 * max(changed):.1f}"
    print(f"{'scrape, after an exit p50/max (ms)':34}{'':>18}{exited:>18}")
    cpu = f"CPU, scraped every {interval:g} s (%)"
    print(f"{cpu:34}{100 * stock_cpu:>18.2f}{100 * ours_cpu:>18.2f}")
    speedup = statistics.median(stock_scrapes) / statistics.median(unchanged)
    print(f"ratios stock/ours: scrape {speedup:,.0f}x, CPU {stock_cpu / max(ours_cpu, 1e-9):,.0f}x")
    p99 = statistics.quantiles(unchanged, n=100)[98]
    ok = ready < 1.0 and p99 < 0.05 and max(changed) < 0.05 and ours_cpu < 0.01
    print(
        f"targets: ready < 1 s {'met' if ready < 1 else 'MISSED'}, scrape < 50 ms "
        f"{'met' if p99 < 0.05 and max(changed) < 0.05 else 'MISSED'}, idle CPU < 1 % "
        f"{'met' if ours_cpu < 0.01 else 'MISSED'}"
    )
    return ok


PEAK = (
    "import sys\n"
    "from monitor.sidecar.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "sys.stdout.flush()\n"
    "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
    "sys.stderr.write(f'peak={peak}\\n')\n"
    "sys.exit(rc)\n"
)


def run_cli(*args: str) -> tuple[float, float]:
    """A CLI command, as a fresh process: wall seconds and peak RSS in MB."""
    t0 = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", PEAK, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    wall = time.perf_counter() - t0
    assert result.returncode == 0, result.stderr
    return wall, int(result.stderr.rsplit("peak=", 1)[1]) / 1024


def run_tail(path: Path) -> tuple[float, float | None]:
    timer = shutil.which("time", path="/usr/bin")
    t0 = time.perf_counter()
    if timer:
        result = subprocess.run(
            [timer, "-f", "%M", "tail", "-n", "100", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        return time.perf_counter() - t0, int(result.stderr.split()[-1]) / 1024
    subprocess.run(["tail", "-n", "100", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0, None


def part_journal(mb: int) -> bool:
    base_dir = Path(tempfile.mkdtemp(prefix="gm-journal-"))
    try:
        layout = directory.create(str(base_dir / "multiproc"))
        now = time.time()
        old = {
            "event": "exit",
            "cause": "max_requests",
            "signal": "none",
            "pid": 12345,
            "slot": 3,
            "master_pid": 123,
            "age_seconds": 3600.5,
            "time": now - 86400,
        }
        line = (json.dumps(old, separators=(",", ":"), sort_keys=True) + "\n").encode()
        with open(layout.journal, "wb") as f:
            chunk = line * 10_000
            for _ in range(mb * 1024 * 1024 // len(chunk)):
                f.write(chunk)
            for i in range(50):
                rec = {**old, "cause": "crash", "time": now - 60 + i}
                f.write((json.dumps(rec, separators=(",", ":"), sort_keys=True) + "\n").encode())
        size = os.path.getsize(layout.journal) / 2**20
        d = str(base_dir / "multiproc")
        rows = [
            ("events --last 100", run_cli("events", "--dir", d, "--last", "100")),
            ("status --json", run_cli("status", "--json", "--dir", d)),
            ("events (all, streamed)", run_cli("events", "--dir", d)),
            ("tail -n 100 (baseline)", run_tail(Path(layout.journal))),
        ]
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
    print(f"\njournal of {size:.0f} MB, each command a fresh process")
    print(f"{'command':<28}{'wall (s)':>10}{'peak RSS (MB)':>15}")
    for name, (wall, rss) in rows:
        print(f"{name:<28}{wall:>10.2f}{(f'{rss:.1f}' if rss is not None else 'n/a'):>15}")
    tail_wall = rows[3][1][0]
    print(
        f"ratio to tail: events --last 100 {rows[0][1][0] / tail_wall:.1f}x, "
        f"status {rows[1][1][0] / tail_wall:.1f}x"
    )
    ok = all(wall < 1.0 and rss < 100 for _, (wall, rss) in rows[:2])
    print(f"targets: status and events --last 100 under 1 s and 100 MB {'met' if ok else 'MISSED'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masters", type=int, default=50_000)
    ap.add_argument("--journal-mb", type=int, default=200)
    ap.add_argument("--interval", type=float, default=15.0)
    ap.add_argument("--window", type=float, default=60.0)
    args = ap.parse_args()
    ok = part_masters(args.masters, args.interval, args.window)
    ok = part_journal(args.journal_mb) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
