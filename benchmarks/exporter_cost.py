"""What the sidecar costs: CPU and memory of `gunicorn-monitor serve` beside 64 live workers.

One real Gunicorn master with 64 sync workers (the project's gunicorn.conf.py), and, side by
side over the same --seconds and scraped the same way (every second, as Prometheus asks:
OpenMetrics, gzip): the baseline, prometheus_client's own multiprocess exporter
(`MultiProcessCollector` behind `start_http_server`, the usual sidecar that serves nothing but
the directory), and gunicorn-monitor's exporter, which also samples every worker's memory and
CPU. Both run in the same window, so a busy machine weighs on both alike. Prints CPU as a share
of one core, peak RSS, the body size, and the ratios.

Targets: gunicorn-monitor at most 2x the baseline's CPU, and at most 40 MB RSS.

    python benchmarks/exporter_cost.py [--workers 64] [--seconds 120]

Both use little CPU (the baseline about a tenth of a percent of a core) and /proc reports it in
10 ms units: a window of two minutes keeps that rounding within a few percent.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
    import sys, time
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=sys.argv[1])
    start_http_server(int(sys.argv[2]), addr="127.0.0.1", registry=registry)
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
    """(name, command, port) of the baseline and of ours, each serving `shared`."""
    stock, ours = free_port(), free_port()
    ours_cmd = [str(BIN / "gunicorn-monitor"), "serve", "--dir", str(shared)]
    return [
        (
            "prometheus_client stock (baseline)",
            [sys.executable, "-c", BASELINE, str(shared), str(stock)],
            stock,
        ),
        ("gunicorn-monitor serve", [*ours_cmd, "--listen", f"127.0.0.1:{ours}"], ours),
    ]


@contextlib.contextmanager
def loaded_master(prefix: str, workers: int) -> Iterator[Path]:
    """A master with `workers` demo workers, the shared directory it writes, and traffic, so
    that the workers wrote the demo app's own multiprocess files: a directory of live
    workers' files to serve, as in production. Killed on exit."""
    shared = Path(tempfile.mkdtemp(prefix=prefix)) / "multiproc"
    shared.mkdir()
    master = Master(shared, workers=workers, env={"GUNICORN_TIMEOUT": "120"})
    master.start(wait=False)
    try:
        master.wait_workers(workers, timeout=120)
        for _ in range(4 * workers):
            http_get(master.url + "/")
        yield shared
    finally:
        master.kill()


class Exporter:
    def __init__(self, name: str, cmd: list[str], port: int) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}/metrics"
        self.proc = start_exporter(cmd)
        self.p = psutil.Process(self.proc.pid)
        self.peak_rss = self.bytes = self.scrapes = 0
        self.cpu0 = 0.0

    def scrape(self) -> None:
        status, body = http_get(self.url, 10, HEADERS)
        assert status == 200, f"{self.name}: scrape failed"
        self.bytes = len(body)
        self.scrapes += 1
        self.peak_rss = max(self.peak_rss, self.p.memory_info().rss)

    def cpu(self) -> float:
        return sum(self.p.cpu_times()[:2])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _measure(exporters: list[Exporter], shared: Path, seconds: float) -> list[float]:
    """Both exporters on `shared`, scraped once a second each for `seconds`: their CPU, as a
    share of one core. `exporters` is filled as they start, for the caller to kill."""
    for name, cmd, port in exporter_cmds(shared):
        exporters.append(Exporter(name, cmd, port))
    for e in exporters:
        wait_for(lambda e=e: http_get(e.url, 2)[0] == 200, 20, f"{e.name} up")
    for _ in range(5):  # warm up: first scrapes, the sampler's first full pass
        for e in exporters:
            e.scrape()
        time.sleep(1)
    for e in exporters:
        e.scrapes, e.cpu0 = 0, e.cpu()
    t0 = next_at = time.monotonic()
    while time.monotonic() - t0 < seconds:
        for e in exporters:
            e.scrape()
        next_at += 1.0
        time.sleep(max(0.0, next_at - time.monotonic()))
    elapsed = time.monotonic() - t0
    return [(e.cpu() - e.cpu0) / elapsed for e in exporters]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=120.0)
    args = ap.parse_args()

    exporters: list[Exporter] = []
    with loaded_master("gm-cost-", args.workers) as shared:
        try:
            shares = _measure(exporters, shared, args.seconds)
        finally:
            for e in exporters:
                e.kill()

    base, ours = exporters
    base, ours = exporters
    print(f"{args.workers} live workers, one scrape per second each for {args.seconds:.0f} s")
    print(f"{'exporter':<36}{'CPU (% of a core)':>18}{'peak RSS (MB)':>15}{'body (KB, gzip)':>17}")
    for e, share in zip(exporters, shares, strict=True):
        print(f"{e.name:<36}{100 * share:>18.2f}{e.peak_rss / 1e6:>15.1f}{e.bytes / 1e3:>17.1f}")
    ratio = shares[1] / max(shares[0], 1e-9)
    print(f"ratio ours/stock: CPU {ratio:.2f}x, RSS {ours.peak_rss / base.peak_rss:.2f}x")
    ok_cpu, ok_rss = ratio <= 2.0, ours.peak_rss <= 40e6
    print(
        f"targets: CPU <= 2x stock {'met' if ok_cpu else 'MISSED'}, RSS <= 40 MB "
        f"{'met' if ok_rss else 'MISSED'}"
    )
    return 0 if ok_cpu and ok_rss else 1


if __name__ == "__main__":
    sys.exit(main())
