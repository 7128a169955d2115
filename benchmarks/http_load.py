"""Scrapes under hostile clients: gunicorn-monitor's exporter against the stock one.

One real Gunicorn master (the project's gunicorn.conf.py, --workers sync workers, some traffic so
the app's own files exist), then, for each kind of load below, one after the other under the same
load: the baseline (prometheus_client's `MultiProcessCollector` behind its own
`start_http_server`, a thread per connection; with its own TLS for the TLS row) and
`gunicorn-monitor serve`. All traffic is on loopback, bounded in count and time. Scrapes are
made as Prometheus asks (OpenMetrics, gzip), each on a new connection, read to the last byte.

- idle: --idle TCP connections opened and held silent, then --scrapers threads each doing
  --scrapes scrapes one after the other.
- slowloris: --slow connections each sending a request one byte a second (a dropped one is
  reopened), while --pacers threads scrape every 20 ms for --seconds.
- tls-stall: both exporters on TLS (the same certificate); --stalled TCP connections that never
  start their handshake (reopened when dropped), while --pacers threads scrape over TLS.
- password storm: ours with basic auth (a cost-10 bcrypt hash, as `htpasswd -nBC 10`), the
  scraper's credentials verified before; --guesses wrong passwords from --guessers clients while
  --pacers threads scrape with the right ones. The stock exporter has no basic auth: its row is
  the same requests, answered without a check. The exporter's CPU during the storm is printed.

Prints, per row and exporter, the good scrapes' p50/p99/max, failed scrapes, the exporter's CPU
seconds over the row, its peak threads and RSS; then stock/ours ratios and the targets:
gunicorn-monitor's p99 under 100 ms with no failure in every row, its threads bounded (not one
per connection), and under 5 s of CPU for the storm.

    python benchmarks/http_load.py [--workers 16] [--seconds 20] [--rows idle,slowloris,...]

Needs the `openssl` CLI (for the certificates).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import bcrypt
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.exporter_cost import exporter_cmds, loaded_master, start_exporter  # noqa: E402
from tests import hostile, pki  # noqa: E402
from tests.harness import wait_for  # noqa: E402

ACCEPT = (
    b"Accept: application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    b"application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;q=0.4,"
    b"text/plain;version=0.0.4;q=0.3,*/*;q=0.1\r\n"
)
SCRAPE_TIMEOUT = 10.0
PACE = 0.02  # seconds between two scrapes of one pacing thread
PASSWORD = "s3cret"
# The stock exporter on TLS: prometheus_client's own start_http_server with its certfile/keyfile.
STOCK_TLS = textwrap.dedent(
    """
    import sys, time
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=sys.argv[1])
    start_http_server(int(sys.argv[2]), addr="127.0.0.1", registry=registry,
                      certfile=sys.argv[3], keyfile=sys.argv[4])
    while True:
        time.sleep(3600)
    """
)


def scrape(port: int, context: ssl.SSLContext | None = None, auth: str = "") -> float | None:
    """One scrape on a new connection, read to the server's close; seconds, None if failed."""
    request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: Prometheus/3.0.0\r\n"
    request += ACCEPT + b"Accept-Encoding: gzip\r\nConnection: close\r\n"
    if auth:
        request += f"Authorization: {auth}\r\n".encode()
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=SCRAPE_TIMEOUT) as raw:
            s = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
            s.sendall(request + b"\r\n")
            head = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                head = head or chunk[:16]
    except (OSError, ssl.SSLError):
        return None
    ok = head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    return time.perf_counter() - started if ok else None


class Watch:
    """Samples a process's threads and RSS every 20 ms while a load runs."""

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


def paced(port: int, threads: int, until: Callable[[], bool], **how) -> list[float | None]:
    """`threads` threads scraping every PACE seconds until `until()`; every scrape's time."""
    times: list[float | None] = []

    def run() -> None:
        while not until():
            times.append(scrape(port, **how))
            time.sleep(PACE)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return times


def run_row(cmd: list[str], port: int, load: Callable[[int], list[float | None]], **how) -> dict:
    """Start an exporter, wait for it, apply `load(port)` (which returns the good scrapes'
    times), and measure."""
    proc = start_exporter(cmd)
    try:
        wait_for(lambda: scrape(port, **how) is not None, 20, "exporter up")
        for _ in range(5):
            scrape(port, **how)
        p = psutil.Process(proc.pid)
        cpu0 = sum(p.cpu_times()[:2])
        with Watch(p) as watch:
            times = load(port)
        cpu = sum(p.cpu_times()[:2]) - cpu0
        ok = sorted(t for t in times if t is not None)
        return {
            "scrapes": len(times),
            "failed": len(times) - len(ok),
            "p50": statistics.median(ok) if ok else float("nan"),
            "p99": ok[int(0.99 * (len(ok) - 1))] if ok else float("nan"),
            "max": ok[-1] if ok else float("nan"),
            "cpu": cpu,
            "threads": watch.threads,
            "rss": watch.rss,
        }
    finally:
        proc.kill()
        proc.wait()


def idle_load(args: argparse.Namespace) -> Callable[[int], list[float | None]]:
    def load(port: int) -> list[float | None]:
        idle = hostile.silent(port, args.idle)
        try:
            times: list[float | None] = []
            lock = threading.Lock()

            def scraper() -> None:
                mine = [scrape(port) for _ in range(args.scrapes)]
                with lock:
                    times.extend(mine)

            threads = [threading.Thread(target=scraper) for _ in range(args.scrapers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return times
        finally:
            for s in idle:
                s.close()

    return load


def held_load(
    args: argparse.Namespace, count: int, request: bytes, **how
) -> Callable[[int], list[float | None]]:
    def load(port: int) -> list[float | None]:
        with hostile.Slowloris(port, count, interval=1.0, request=request):
            end = time.monotonic() + args.seconds
            return paced(port, args.pacers, lambda: time.monotonic() > end, **how)

    return load


def storm_load(args: argparse.Namespace, auth: str) -> Callable[[int], list[float | None]]:
    def load(port: int) -> list[float | None]:
        done = threading.Event()
        times: list[float | None] = []
        pacer = threading.Thread(
            target=lambda: times.extend(paced(port, args.pacers, done.is_set, auth=auth))
        )
        pacer.start()
        try:
            answers = hostile.password_storm(port, "prometheus", args.guesses, args.guessers)
        finally:
            done.set()
            pacer.join()
        print(f"  guesses answered: {dict(sorted(answers.items()))}", flush=True)
        return times

    return load


@contextlib.contextmanager
def certificates() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="gm-http-pki-") as d:
        yield pki.make(Path(d))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--idle", type=int, default=300)
    ap.add_argument("--scrapers", type=int, default=20)
    ap.add_argument("--scrapes", type=int, default=100)
    ap.add_argument("--slow", type=int, default=200)
    ap.add_argument("--stalled", type=int, default=16)
    ap.add_argument("--pacers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--guesses", type=int, default=1000)
    ap.add_argument("--guessers", type=int, default=8)
    ap.add_argument("--rows", default="idle,slowloris,tls-stall,password-storm")
    args = ap.parse_args()
    rows = args.rows.split(",")

    results: dict[str, tuple[dict, dict]] = {}
    with loaded_master("gm-http-", args.workers) as shared, certificates() as certs:
        (_, stock_cmd, stock_port), (_, ours_cmd, ours_port) = exporter_cmds(shared)
        web = shared.parent / "web"
        web.mkdir()
        (web / "tls.yml").write_text(
            f"tls_server_config:\n  cert_file: {certs}/server.crt\n  key_file: {certs}/server.key\n"
        )
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
        (web / "auth.yml").write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
        stock_tls = [sys.executable, "-c", STOCK_TLS, str(shared), str(stock_port)]
        stock_tls += [str(certs / "server.crt"), str(certs / "server.key")]
        tls_how = {"context": pki.client(certs)}
        auth = hostile.basic("prometheus", PASSWORD)
        plans = {
            "idle": (stock_cmd, ours_cmd, idle_load(args), {}, {}),
            "slowloris": (
                stock_cmd,
                ours_cmd,
                held_load(args, args.slow, hostile.SLOW_REQUEST),
                {},
                {},
            ),
            "tls-stall": (
                stock_tls,
                [*ours_cmd, "--web.config.file", str(web / "tls.yml")],
                held_load(args, args.stalled, b"", **tls_how),
                tls_how,
                tls_how,
            ),
            "password-storm": (
                stock_cmd,
                [*ours_cmd, "--web.config.file", str(web / "auth.yml")],
                storm_load(args, auth),
                {},
                {"auth": auth},
            ),
        }
        for row in rows:
            stock, ours, load, stock_how, ours_how = plans[row]
            print(f"{row}: stock ...", flush=True)
            base = run_row(stock, stock_port, load, **stock_how)
            print(f"{row}: gunicorn-monitor ...", flush=True)
            mine = run_row(ours, ours_port, load, **ours_how)
            results[row] = (base, mine)

    print(
        f"\n{args.workers} Gunicorn workers. idle: {args.idle} idle connections, {args.scrapers} "
        f"threads x {args.scrapes} scrapes; slowloris: {args.slow} connections at 1 byte/s; "
        f"tls-stall: {args.stalled} handshakes never started; password storm: {args.guesses} "
        f"wrong passwords from {args.guessers} clients (cost 10); {args.pacers} pacing "
        f"scrapers every {PACE * 1e3:.0f} ms for {args.seconds:.0f} s (storm: while it lasts)"
    )
    print(
        f"{'row':<16}{'exporter':<18}{'p50 ms':>8}{'p99 ms':>9}{'max ms':>9}{'failed':>8}"
        f"{'scrapes':>8}{'CPU s':>7}{'threads':>8}{'RSS MB':>8}"
    )
    met = True
    for row, (base, mine) in results.items():
        for name, r in (("stock", base), ("gunicorn-monitor", mine)):
            print(
                f"{row:<16}{name:<18}{r['p50'] * 1e3:>8.1f}{r['p99'] * 1e3:>9.1f}"
                f"{r['max'] * 1e3:>9.1f}{r['failed']:>8}{r['scrapes']:>8}{r['cpu']:>7.2f}"
                f"{r['threads']:>8}{r['rss'] / 1e6:>8.1f}"
            )
        ok = mine["p99"] < 0.1 and mine["failed"] == 0
        if row == "idle":
            ok = ok and mine["threads"] < args.idle
        if row == "password-storm":
            ok = ok and mine["cpu"] < 5.0
        met = met and ok
        print(
            f"{'':<16}ratio stock/ours: p99 {base['p99'] / mine['p99']:.1f}x, failed "
            f"{base['failed']}/{mine['failed']}, CPU {base['cpu'] / max(mine['cpu'], 1e-3):.2f}x"
            f"; target {'met' if ok else 'MISSED'}"
        )
    print(
        "targets: p99 < 100 ms and no failed scrape in every row, threads not one per "
        f"connection, storm CPU < 5 s: {'met' if met else 'MISSED'}"
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
