"""What the sidecar costs: CPU, memory and scrape latency of `gunicorn-monitor serve` beside
live workers, against prometheus_client's own multiprocess exporter, in fleet shapes.

For each shape MASTERSxWORKERS: that many real Gunicorn masters (the project's gunicorn.conf.py,
sync workers) sharing one directory, as several masters of a pod or a USR2 upgrade do, each
having served some traffic so that every worker wrote the demo app's multiprocess files. Side by
side over the same --seconds and scraped the same way (every second, as Prometheus asks:
OpenMetrics, gzip): the baseline, prometheus_client's own exporter (`MultiProcessCollector`
behind `start_http_server`, the usual sidecar that serves nothing but the directory), and
gunicorn-monitor's exporter, which also samples every worker's memory and CPU. Both run in the
same window, so a busy machine weighs on both alike.

Each exporter is scraped as Prometheus scrapes it: over one HTTP/1.1 connection kept alive
between scrapes (Go's http.Transport keeps idle connections for 5 minutes), opened again only
when the server closed it. The stock exporter (wsgiref, HTTP/1.0) closes every connection, so
each of its scrapes pays a new one: what its users get. `--new-connection` opens a new
connection for every scrape of both, as this benchmark did before. Prints CPU as a share of one
core, peak RSS, the body size, scrape latency (p50, p99), and the ratios; then, from the shapes
measured, the cost of one more worker and of one more master, and a projection to 8 masters x 64
workers.

Targets: gunicorn-monitor's CPU no more than the baseline's, scrape p99 under 20 ms, RSS at most
40 MB.

    python benchmarks/exporter_cost.py [--shapes 1x16,1x64,4x16] [--seconds 120] [--new-connection]

Both use little CPU (the baseline about a tenth of a percent of a core) and /proc reports it in
10 ms units: a window of two minutes keeps that rounding within a few percent.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.harness import BIN, Master, free_port, http_get, wait_for  # noqa: E402

BASELINE = textwrap.dedent(
    """
    import signal, sys, time
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=sys.argv[1])
    start_http_server(int(sys.argv[2]), addr="127.0.0.1", registry=registry)
    if len(sys.argv) > 3:  # SIGUSR1: the process's CPU time, in ns, every thread's, into argv[3]
        def said(*_):
            with open(sys.argv[3] + ".tmp", "w") as f:
                f.write(str(time.process_time_ns()))
            __import__("os").replace(sys.argv[3] + ".tmp", sys.argv[3])
        signal.signal(signal.SIGUSR1, said)
    while True:
        time.sleep(3600)
    """
)
# What Prometheus 3 sends.
HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}


def start_exporter(cmd: list[str]) -> subprocess.Popen:
    """An exporter process that knows its directory from its command line alone."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def exporter_cmds(shared: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, port) of the baseline and of ours, each serving `shared`. The baseline
    says its CPU time on SIGUSR1 (into `shared`/../stock-cpu): see Exporter.cpu."""
    stock, ours = free_port(), free_port()
    ours_cmd = [str(BIN / "gunicorn-monitor"), "serve", "--dir", str(shared)]
    said = str(shared.parent / "stock-cpu")
    return [
        (
            "prometheus_client stock (baseline)",
            [sys.executable, "-c", BASELINE, str(shared), str(stock), said],
            stock,
        ),
        ("gunicorn-monitor serve", [*ours_cmd, "--listen", f"127.0.0.1:{ours}"], ours),
    ]


@contextlib.contextmanager
def loaded_master(prefix: str, workers: int, masters: int = 1) -> Iterator[Path]:
    """`masters` masters with `workers` demo workers each, sharing the directory they write,
    and traffic, so that the workers wrote the demo app's own multiprocess files: a directory
    of live workers' files to serve, as in production. Killed on exit."""
    shared = Path(tempfile.mkdtemp(prefix=prefix)) / "multiproc"
    shared.mkdir()
    started = []
    try:
        for _ in range(masters):
            master = Master(shared, workers=workers, env={"GUNICORN_TIMEOUT": "120"})
            started.append(master)
            master.start(wait=False)
        for master in started:
            master.wait_workers(workers, timeout=180)
            for _ in range(4 * workers):
                http_get(master.url + "/")
        yield shared
    finally:
        for master in started:
            master.kill()


class Scraper:
    """GETs of one URL over one kept-alive HTTP/1.1 connection, as Prometheus makes them: a
    connection the server closed (after its answer, or while idle) is opened again for the next
    scrape; `new` opens one for every scrape instead. Counts the connections opened."""

    def __init__(self, port: int, new: bool) -> None:
        self.port, self.new = port, new
        self.conn: http.client.HTTPConnection | None = None
        self.opened = 0

    def get(self, path: str) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.conn is None or self.conn.sock is None:
                self.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                self.conn.connect()
                self.opened += 1
                fresh = True
            else:
                fresh = False
            try:
                self.conn.request("GET", path, headers=HEADERS)
                resp = self.conn.getresponse()
                status, body = resp.status, resp.read()
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if fresh or attempt:  # not a kept connection the server had closed meanwhile
                    raise
                continue
            if self.new or resp.will_close:
                self.close()
            return status, body
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Exporter:
    def __init__(self, name: str, cmd: list[str], port: int, new: bool = False) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}/metrics"
        self.scraper = Scraper(port, new)
        self.cmd = cmd
        self.threads: set[str] | None = None
        self.exact = True
        self.proc = start_exporter(cmd)
        self.p = psutil.Process(self.proc.pid)
        self.peak_rss = self.bytes = self.scrapes = 0
        self.cpu0 = 0.0
        self.latencies: list[float] = []

    def scrape(self) -> None:
        started = time.perf_counter()
        status, body = self.scraper.get("/metrics")
        self.latencies.append(time.perf_counter() - started)
        assert status == 200, f"{self.name}: scrape failed"
        self.bytes = len(body)
        self.scrapes += 1
        self.peak_rss = max(self.peak_rss, self.p.memory_info().rss)

    def cpu(self) -> float:
        """CPU seconds so far, to the nanosecond: /proc counts in 10 ms ticks, which at a
        tenth of a percent of a core is several percent of the answer. The baseline says its
        own (time.process_time, every thread's, the exited ones too); ours is the sum of its
        threads' schedstat, which holds while none of them exits (checked: see `exact`)."""
        said = self.cmd[-1] if self.cmd[2:3] == [BASELINE] else None
        if said is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(said)
            os.kill(self.proc.pid, signal.SIGUSR1)
            wait_for(lambda: os.path.exists(said), 10, "the baseline's CPU time")
            with open(said) as f:
                return int(f.read()) / 1e9
        total, threads = 0, set()
        task = f"/proc/{self.proc.pid}/task"
        for tid in os.listdir(task):
            with contextlib.suppress(OSError), open(f"{task}/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
                threads.add(tid)
        if self.threads is not None and not self.threads <= threads:
            self.exact = False  # a thread exited: its time is not in the sum
        self.threads = threads
        return total / 1e9

    def kill(self) -> None:
        self.scraper.close()
        self.proc.kill()
        self.proc.wait()


def _measure(exporters: list[Exporter], shared: Path, seconds: float, new: bool) -> list[float]:
    """Both exporters on `shared`, scraped once a second each for `seconds`: their CPU, as a
    share of one core. `exporters` is filled as they start, for the caller to kill."""
    for name, cmd, port in exporter_cmds(shared):
        exporters.append(Exporter(name, cmd, port, new))
    for e in exporters:
        wait_for(lambda e=e: http_get(e.url, 2)[0] == 200, 20, f"{e.name} up")
    for _ in range(5):  # warm up: first scrapes, the sampler's first full pass
        for e in exporters:
            e.scrape()
        time.sleep(1)
    for e in exporters:
        e.scrapes, e.cpu0, e.latencies, e.scraper.opened = 0, e.cpu(), [], 0
    t0 = next_at = time.monotonic()
    while time.monotonic() - t0 < seconds:
        for e in exporters:
            e.scrape()
        next_at += 1.0
        time.sleep(max(0.0, next_at - time.monotonic()))
    elapsed = time.monotonic() - t0
    return [(e.cpu() - e.cpu0) / elapsed for e in exporters]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def shape(masters: int, workers: int, seconds: float, new: bool) -> dict[str, float]:
    """One shape measured: CPU shares, peak RSS, body size and latencies of both exporters."""
    exporters: list[Exporter] = []
    with loaded_master("gm-cost-", workers, masters) as shared:
        try:
            shares = _measure(exporters, shared, seconds, new)
        finally:
            for e in exporters:
                e.kill()
    row: dict[str, float] = {"masters": masters, "workers": workers}
    for key, e, share in zip(("stock", "ours"), exporters, shares, strict=True):
        row[f"{key}_cpu"] = share
        row[f"{key}_rss"] = e.peak_rss
        row[f"{key}_kb"] = e.bytes / 1e3
        row[f"{key}_p50"] = percentile(e.latencies, 0.5) * 1e3
        row[f"{key}_p99"] = percentile(e.latencies, 0.99) * 1e3
        row[f"{key}_exact"] = e.exact
        row[f"{key}_conns"] = e.scraper.opened / max(e.scrapes, 1)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x16,1x64,4x16", help="MASTERSxWORKERS, each measured")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument(
        "--new-connection",
        action="store_true",
        help="a new connection for every scrape (default: one kept alive, as Prometheus does)",
    )
    args = ap.parse_args()

    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    rows = [shape(m, w, args.seconds, args.new_connection) for m, w in shapes]
    how = "a new connection each" if args.new_connection else "one kept-alive connection"
    print(f"One scrape per second each for {args.seconds:.0f} s, same window for both, over")
    print(f"{how}; CPU as a share of one core; latency from request to last byte")
    print("(OpenMetrics, gzip); conns: connections opened per scrape.")
    print(
        f"{'masters x workers':>17} {'stock CPU %':>11} {'ours CPU %':>10} {'ours/stock':>10} "
        f"{'stock p50/p99 ms':>16} {'ours p50/p99 ms':>15} {'stock RSS MB':>12} "
        f"{'ours RSS MB':>11} {'ours KB gzip':>12} {'conns stock/ours':>16}"
    )
    ok = True
    for r in rows:
        ratio = r["ours_cpu"] / max(r["stock_cpu"], 1e-9)
        ok = ok and ratio <= 1.0 and r["ours_p99"] < 20 and r["ours_rss"] <= 40e6
        print(
            f"{r['masters']:>8.0f} x {r['workers']:<6.0f} {100 * r['stock_cpu']:>11.3f} "
            f"{100 * r['ours_cpu']:>10.3f} {ratio:>9.2f}x "
            f"{r['stock_p50']:>8.1f} /{r['stock_p99']:>6.1f} "
            f"{r['ours_p50']:>7.1f} /{r['ours_p99']:>6.1f} "
            f"{r['stock_rss'] / 1e6:>12.1f} {r['ours_rss'] / 1e6:>11.1f} {r['ours_kb']:>12.1f} "
            f"{r['stock_conns']:>9.2f} /{r['ours_conns']:>5.2f}"
        )
    by_shape = {(int(r["masters"]), int(r["workers"])): r for r in rows}
    one_w, one_m, four_m = by_shape.get((1, 16)), by_shape.get((1, 64)), by_shape.get((4, 16))
    if one_w and one_m and four_m:
        # CPU = base + per worker * workers + per master * masters, from the three shapes.
        for key in ("stock", "ours"):
            per_worker = (one_m[f"{key}_cpu"] - one_w[f"{key}_cpu"]) / 48
            per_master = (four_m[f"{key}_cpu"] - one_w[f"{key}_cpu"] - 48 * per_worker) / 3
            base = one_w[f"{key}_cpu"] - 16 * per_worker - per_master
            projected = base + 512 * per_worker + 8 * per_master
            print(
                f"{key}: {100 * per_worker:.4f} % of a core per worker, "
                f"{100 * per_master:.4f} % per master, {100 * base:.3f} % base; "
                f"8 x 64 projected: {100 * projected:.2f} % of a core"
            )
    if not all(r["stock_exact"] and r["ours_exact"] for r in rows):
        print("(a thread of ours exited during a window: its CPU is missing from that row)")
    print(
        "targets: CPU <= stock, p99 < 20 ms, RSS <= 40 MB: "
        f"{'met' if ok else 'MISSED'} (every shape)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
