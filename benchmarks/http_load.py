"""Scrapes under a flood of idle connections: gunicorn-monitor's exporter against the stock one.

One real Gunicorn master (the project's gunicorn.conf.py, --workers sync workers, some traffic so
the app's own files exist), then, one after the other under the same load, the baseline
(prometheus_client's `MultiProcessCollector` behind its own `start_http_server`, a thread per
connection) and `gunicorn-monitor serve`. The load, on loopback only and bounded: --idle TCP
connections opened and held silent, then --scrapers threads each doing --scrapes scrapes one
after the other, as Prometheus asks (OpenMetrics, gzip), each on a new connection. Prints the
/metrics latency p50/p99/max, failed scrapes, and the exporter's threads and RSS before the
load, at its peak, and after it.

Targets: gunicorn-monitor's p99 under 100 ms, its threads bounded (not one per connection).

    python benchmarks/http_load.py [--workers 16] [--idle 300] [--scrapers 20] [--scrapes 100]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.exporter_cost import exporter_cmds, loaded_master, start_exporter  # noqa: E402
from tests.harness import http_get, wait_for  # noqa: E402

REQUEST = (
    b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: Prometheus/3.0.0\r\n"
    b"Accept: application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    b"application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;q=0.4,"
    b"text/plain;version=0.0.4;q=0.3,*/*;q=0.1\r\n"
    b"Accept-Encoding: gzip\r\nConnection: close\r\n\r\n"
)
SCRAPE_TIMEOUT = 10.0


def scrape(port: int) -> float | None:
    """One scrape on a new connection, read to the server's close; seconds, None if failed."""
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=SCRAPE_TIMEOUT) as s:
            s.sendall(REQUEST)
            head = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                head = head or chunk[:16]
    except OSError:
        return None
    return (
        time.perf_counter() - started
        if head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
        else None
    )


def established(p: psutil.Process) -> int:
    conns = p.net_connections("tcp") if hasattr(p, "net_connections") else p.connections("tcp")
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED)


class Watch:
    """Samples a process's threads and RSS every 20 ms while the load runs."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc, self.threads, self.rss = proc, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.threads = max(self.threads, self.proc.num_threads())
                self.rss = max(self.rss, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


def load(cmd: list[str], port: int, args: argparse.Namespace) -> dict:
    proc = start_exporter(cmd)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for(lambda: http_get(url, 2)[0] == 200, 20, "exporter up")
        for _ in range(5):
            scrape(port)
        p = psutil.Process(proc.pid)
        before = (p.num_threads(), p.memory_info().rss)
        times: list[float | None] = []
        lock = threading.Lock()

        def scraper() -> None:
            mine = [scrape(port) for _ in range(args.scrapes)]
            with lock:
                times.extend(mine)

        with Watch(p) as watch:
            idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.idle)]
            wait_for(lambda: established(p) >= args.idle, 20, "idle connections accepted")
            threads = [threading.Thread(target=scraper) for _ in range(args.scrapers)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
            during = (p.num_threads(), p.memory_info().rss)
            for s in idle:
                s.close()
        wait_for(lambda: established(p) == 0, 20, "connections closed")
        after = (p.num_threads(), p.memory_info().rss)
        ok = sorted(t for t in times if t is not None)
        return {
            "scrapes": len(times),
            "failed": len(times) - len(ok),
            "p50": statistics.median(ok) if ok else float("nan"),
            "p99": ok[int(0.99 * (len(ok) - 1))] if ok else float("nan"),
            "max": ok[-1] if ok else float("nan"),
            "rate": len(ok) / elapsed,
            "before": before,
            "during": during,
            "peak": (watch.threads, watch.rss),
            "after": after,
        }
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--idle", type=int, default=300)
    ap.add_argument("--scrapers", type=int, default=20)
    ap.add_argument("--scrapes", type=int, default=100)
    args = ap.parse_args()

    with loaded_master("gm-http-", args.workers) as shared:
        (_, stock_cmd, stock_port), (_, ours_cmd, ours_port) = exporter_cmds(shared)
        base = load(stock_cmd, stock_port, args)
        ours = load(ours_cmd, ours_port, args)

    print(
        f"{args.workers} Gunicorn workers; {args.idle} idle connections held while "
        f"{args.scrapers} threads scrape {args.scrapes} times each (OpenMetrics, gzip)"
    )
    print(
        f"{'exporter':<28}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'failed':>7}{'scrapes/s':>10}"
        f"{'threads before/peak/after':>27}{'RSS MB before/peak/after':>26}"
    )
    for name, r in (("prometheus_client stock", base), ("gunicorn-monitor serve", ours)):
        threads = "/".join(str(x[0]) for x in (r["before"], r["peak"], r["after"]))
        rss = "/".join(f"{x[1] / 1e6:.1f}" for x in (r["before"], r["peak"], r["after"]))
        print(
            f"{name:<28}{r['p50'] * 1e3:>8.1f}{r['p99'] * 1e3:>8.1f}{r['max'] * 1e3:>8.1f}"
            f"{r['failed']:>7}{r['rate']:>10.0f}{threads:>27}{rss:>26}"
        )
    print(f"ratio stock/ours: p99 {base['p99'] / ours['p99']:.1f}x")
    ok = ours["p99"] < 0.1 and ours["failed"] == 0 and ours["peak"][0] < args.idle
    print(
        f"target p99 < 100 ms, no failure, threads not one per connection: "
        f"{'met' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
