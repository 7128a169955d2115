"""What the sidecar costs: CPU and memory of `gunicorn-monitor serve` beside 64 live workers.

One real Gunicorn master with 64 sync workers (the project's gunicorn.conf.py), then, one after
the other and scraped the same way (every second for --seconds): the baseline, prometheus_client's
own multiprocess exporter (`MultiProcessCollector` behind `start_http_server`, the usual sidecar
that serves nothing but the directory), and gunicorn-monitor's exporter, which also samples every
worker's memory and CPU each second. Prints CPU as a share of one core, RSS, and the ratios.

Targets: gunicorn-monitor at most 1 % of a core and 40 MB RSS.

    python benchmarks/exporter_cost.py [--workers 64] [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.harness import Master, free_port, http_get, wait_for  # noqa: E402

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


def measure(cmd: list[str], port: int, seconds: float) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for(lambda: http_get(url, 2)[0] == 200, 20, "exporter up")
        p = psutil.Process(proc.pid)
        for _ in range(5):  # warm up: first scrapes, the sampler's first full pass
            http_get(url)
            time.sleep(1)
        cpu0, t0 = sum(p.cpu_times()[:2]), time.monotonic()
        scrapes, peak_rss, next_at = 0, 0, t0
        while time.monotonic() - t0 < seconds:
            status, body = http_get(url)
            assert status == 200, "scrape failed"
            scrapes += 1
            peak_rss = max(peak_rss, p.memory_info().rss)
            next_at += 1.0
            time.sleep(max(0.0, next_at - time.monotonic()))
        elapsed = time.monotonic() - t0
        cpu = sum(p.cpu_times()[:2]) - cpu0
        return {"cpu_share": cpu / elapsed, "rss": peak_rss, "scrapes": scrapes, "bytes": len(body)}
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()

    shared = Path(tempfile.mkdtemp(prefix="gm-cost-")) / "multiproc"
    shared.mkdir()
    master = Master(shared, workers=args.workers, env={"GUNICORN_TIMEOUT": "120"})
    master.start(wait=False)
    try:
        master.wait_workers(args.workers, timeout=120)
        # Traffic, so that the workers write the demo app's own multiprocess files: the
        # baseline then has a directory of live workers' files to serve, as in production.
        for _ in range(4 * args.workers):
            http_get(master.url + "/")
        bin_dir = Path(sys.executable).parent
        port = free_port()
        base = measure([sys.executable, "-c", BASELINE, str(shared), str(port)], port, args.seconds)
        port = free_port()
        ours_cmd = [
            str(bin_dir / "gunicorn-monitor"),
            "serve",
            "--dir",
            str(shared),
            "--listen",
            f"127.0.0.1:{port}",
        ]
        ours = measure(ours_cmd, port, args.seconds)
    finally:
        master.kill()

    print(f"{args.workers} live workers, one scrape per second for {args.seconds:.0f} s")
    print(f"{'exporter':<34}{'CPU (% of a core)':>18}{'peak RSS (MB)':>15}{'body (KB)':>11}")
    for name, r in (("prometheus_client stock (baseline)", base), ("gunicorn-monitor serve", ours)):
        cpu, rss, size = 100 * r["cpu_share"], r["rss"] / 1e6, r["bytes"] / 1e3
        print(f"{name:<34}{cpu:>18.2f}{rss:>15.1f}{size:>11.1f}")
    print(
        f"ratio ours/stock: CPU {ours['cpu_share'] / max(base['cpu_share'], 1e-9):.2f}x, "
        f"RSS {ours['rss'] / base['rss']:.2f}x"
    )
    ok_cpu, ok_rss = ours["cpu_share"] <= 0.01, ours["rss"] <= 40e6
    print(
        f"targets: CPU <= 1 % {'met' if ok_cpu else 'MISSED'}, RSS <= 40 MB "
        f"{'met' if ok_rss else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
