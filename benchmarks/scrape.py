"""Scrape cost of app multiprocess metrics: stock MultiProcessCollector vs AppMetricsCollector.

Builds directories of N dead workers' files (10 labelled counter series per file, the layout of
the research baseline in shared/research/prometheus-multiprocess.md §4), then in the same run
and with a warm page cache times `generate_latest` with the stock collector and with ours (the
first scrape, which compacts, and steady-state scrapes), checks both give the same exposition,
and prints a table.

Then end to end over HTTP, each side a real server on loopback, in the same run: the stock
collector behind prometheus_client's own `start_http_server` on one copy of the files, and
`gunicorn-monitor serve --app-metrics.fold` on another, both scraped as Prometheus asks
(OpenMetrics, gzip). Each copy also holds one live process's counter file (this script's),
incremented before each "changed" scrape, so that those scrapes must collect anew; "unchanged"
scrapes are what a quiet app's scrapes are. Then the same for a sidecar without folding (the
default), on a third copy. Checks the app samples served are the same.

Files are written through prometheus_client's own write path (MultiProcessValue with an
overridden process identifier, as upstream's tests do), one file set per dead worker, up to
--real workers; beyond that the first worker's files are cloned byte for byte under further
pids to keep the run short (the output says how many were cloned). Dead pids are above the
kernel's pid_max, so no running process can own them.

    python benchmarks/scrape.py [--sizes 1000,10000,30000] [--real 1000] [--repeat 7]

Target: over HTTP, with 10,000 dead workers, ours at least 200x faster than stock.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.exporter_cost import BASELINE, start_exporter  # noqa: E402
from benchmarks.http_load import REQUEST  # noqa: E402
from monitor.sidecar.collectors.appmetrics import AppMetricsCollector  # noqa: E402
from tests.harness import BIN, app_process, free_port, http_get, wait_for  # noqa: E402


def write_worker(directory: Path, ident: int) -> None:
    """One dead worker's file, written by the library exactly as a worker process would."""
    with app_process(directory, lambda: ident):
        requests = Counter("app_requests", "Requests.", ["method", "status"], registry=None)
        events = Counter("app_lifecycle_events", "Lifecycle events.", ["event"], registry=None)
        errors = Counter("app_errors", "Errors.", ["kind"], registry=None)
        for i, (method, status) in enumerate(
            [("GET", "200"), ("GET", "404"), ("POST", "200"), ("POST", "500"), ("PUT", "200")]
        ):
            requests.labels(method, status).inc(ident % 7 + i)
        for i, event in enumerate(("boot", "reload", "exit")):
            events.labels(event).inc(i + 1)
        for kind in ("timeout", "crash"):
            errors.labels(kind).inc(ident % 3)
        values.close_all_multiprocess_files()


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy a multiprocess file's used bytes and keep it sparse, like the original."""
    with open(src, "rb") as f:
        data = f.read(4096)
        used = struct.unpack_from("i", data)[0]
        data += f.read(max(0, used - len(data)))
        size = os.fstat(f.fileno()).st_size
    with open(dst, "wb") as f:
        f.write(data[:used])
        f.truncate(size)


def build(directory: Path, size: int, real: int) -> int:
    """Write `size` dead workers' files; returns how many were cloned rather than written."""
    first_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    for pid in range(first_pid, first_pid + min(size, real)):
        write_worker(directory, pid)
    template = directory / f"counter_{first_pid}.db"
    for pid in range(first_pid + real, first_pid + size):
        sparse_copy(template, directory / f"counter_{pid}.db")
    return max(0, size - real)


def live_counter(directory: Path) -> Callable[[], None]:
    """A counter in `directory` owned by this (live) process, written by the library's own
    mmap path; returns its inc()."""
    with app_process(directory, os.getpid):
        child = Counter("app_live", "A live worker's requests.", registry=None)
        child.inc()
    return child.inc


def server(cmd: list[str], port: int) -> subprocess.Popen:
    proc = start_exporter(cmd)
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/-/healthy", 2)[0] == 200, 60, "up")
    return proc


def http_scrape(port: int) -> bytes:
    """One scrape on a new connection, as http_load.py does it: a raw socket, so that the
    measuring script's own HTTP client does not weigh on a sub-millisecond answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(REQUEST)
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"200", "scrape failed"
    return gzip.decompress(body)


def app_samples(body: bytes) -> set[tuple]:
    """The app's samples (app_*) of an OpenMetrics body."""
    return {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(body.decode())
        if family.name.startswith("app_")
        for s in family.samples
    }


def measure_http(
    stock_dir: Path, ours_dir: Path, off_dir: Path, repeat: int
) -> dict[str, float | str]:
    """All three directories hold the same files; ours is folded by its first scrape, and the
    sidecar on off_dir does not fold (the default), so its dead workers' files stay."""
    incs = [live_counter(stock_dir), live_counter(ours_dir), live_counter(off_dir)]
    port = free_port()
    procs = [server([sys.executable, "-c", BASELINE, str(stock_dir), str(port)], port)]
    result: dict[str, float | str] = {}
    try:
        http_scrape(port)  # warm the page cache
        stock_s, stock_out = timed(lambda: http_scrape(port), repeat)
        result["http_stock_ms"] = stock_s * 1e3
        same = True
        for prefix, directory, fold in (("http", ours_dir, True), ("off", off_dir, False)):
            ours_port = free_port()
            cmd = [str(BIN / "gunicorn-monitor"), "serve", "--dir"]
            cmd += [str(directory), "--listen", f"127.0.0.1:{ours_port}"]
            procs.append(server(cmd + ["--app-metrics.fold"] * fold, ours_port))
            first_s, _ = timed(functools.partial(http_scrape, ours_port), 1)
            steady_s, steady_out = timed(functools.partial(http_scrape, ours_port), max(repeat, 50))
            # Nothing moved since the stock scrape above: a quiet app's scrape.
            same = same and app_samples(steady_out) == app_samples(stock_out)
            changed = []
            for _ in range(max(repeat, 20)):
                for inc in incs:
                    inc()
                changed.append(timed(functools.partial(http_scrape, ours_port), 1)[0])
            ours = app_samples(http_scrape(ours_port))
            stock_out = http_scrape(port)  # the live counters moved: the next one compares
            same = same and ours == app_samples(stock_out)
            result[f"{prefix}_first_ms"] = first_s * 1e3
            result[f"{prefix}_steady_ms"] = steady_s * 1e3
            result[f"{prefix}_changed_ms"] = statistics.median(changed) * 1e3
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    result["http_identical"] = "yes" if same else "NO"
    return result


def timed(scrape: Callable[[], bytes], repeat: int) -> tuple[float, bytes]:
    times, out = [], b""
    for _ in range(repeat):
        started = time.perf_counter()
        out = scrape()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def registry_of(collector: object) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]
    return registry


def measure(root: Path, size: int, real: int, repeat: int) -> dict[str, float | int | str]:
    original, ours_dir = root / f"stock-{size}", root / f"ours-{size}"
    original.mkdir()
    ours_dir.mkdir()
    started = time.perf_counter()
    cloned = build(original, size, real)
    for name in os.listdir(original):
        sparse_copy(original / name, ours_dir / name)
    build_s = time.perf_counter() - started

    stock = registry_of(MultiProcessCollector(None, path=str(original)))
    generate_latest(stock)  # warm the page cache
    stock_s, stock_out = timed(lambda: generate_latest(stock), repeat)

    ours = registry_of(AppMetricsCollector(str(ours_dir)))
    first_s, first_out = timed(lambda: generate_latest(ours), 1)
    steady_s, steady_out = timed(lambda: generate_latest(ours), max(repeat, 50))

    expected = sorted(stock_out.splitlines())
    identical = sorted(first_out.splitlines()) == expected == sorted(steady_out.splitlines())
    shutil.rmtree(ours_dir)
    off_dir = root / f"off-{size}"
    for d in (ours_dir, off_dir):
        d.mkdir()
        for name in os.listdir(original):  # fresh, unfolded copies for the HTTP run
            sparse_copy(original / name, d / name)
    http = measure_http(original, ours_dir, off_dir, repeat)
    for d in (original, ours_dir, off_dir):
        shutil.rmtree(d)
    return {
        **http,
        "files": size,
        "cloned": cloned,
        "build_s": build_s,
        "stock_ms": stock_s * 1e3,
        "first_ms": first_s * 1e3,
        "steady_ms": steady_s * 1e3,
        "identical": "yes" if identical else "NO",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,30000", help="dead workers per directory")
    parser.add_argument("--real", type=int, default=1000, help="workers written, not cloned")
    parser.add_argument("--repeat", type=int, default=7, help="stock scrapes timed (median)")
    parser.add_argument("--dir", help="where to build (default: a temporary directory)")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            rows.append(measure(Path(tmp), size, args.real, args.repeat))

    out = sys.stdout.write
    out(
        f"{'dead workers':>12} {'cloned':>7} {'stock ms':>9} {'ours 1st ms':>12} "
        f"{'ours ms':>8} {'stock/ours':>10} {'stock/1st':>9} {'same output':>11}\n"
    )
    for r in rows:
        out(
            f"{r['files']:>12} {r['cloned']:>7} {r['stock_ms']:>9.2f} {r['first_ms']:>12.1f} "
            f"{r['steady_ms']:>8.3f} {r['stock_ms'] / r['steady_ms']:>9.0f}x "
            f"{r['stock_ms'] / r['first_ms']:>8.2f}x {r['identical']:>11}\n"
        )
    out(
        "stock = MultiProcessCollector + generate_latest, median, warm page cache; "
        "ours 1st = the first scrape, which compacts every dead worker; ours = steady state, "
        "median of 50.\n"
        f"cloned = files copied byte for byte from the first library-written file "
        f"(the first {args.real} per size are written by prometheus_client itself).\n\n"
    )
    out("Over HTTP, end to end (request to last byte, OpenMetrics + gzip), same run:\n")
    out(
        f"{'dead workers':>12} {'stock ms':>9} {'ours 1st ms':>12} {'ours ms':>8} "
        f"{'changed ms':>11} {'stock/ours':>10} {'stock/changed':>13} {'same app samples':>17}\n"
    )
    for r in rows:
        out(
            f"{r['files']:>12} {r['http_stock_ms']:>9.1f} {r['http_first_ms']:>12.1f} "
            f"{r['http_steady_ms']:>8.2f} {r['http_changed_ms']:>11.2f} "
            f"{r['http_stock_ms'] / r['http_steady_ms']:>9.0f}x "
            f"{r['http_stock_ms'] / r['http_changed_ms']:>12.0f}x {r['http_identical']:>17}\n"
        )
    out(
        "stock = prometheus_client's start_http_server + MultiProcessCollector, median of "
        f"{args.repeat}; ours = gunicorn-monitor serve --app-metrics.fold: 1st scrape (folds), "
        "unchanged scrapes (median of 50), and changed scrapes (a live counter moved before "
        "each, median of 20).\n"
    )
    out("\nThe same over HTTP without folding (the default: dead workers' files stay in place):\n")
    out(
        f"{'dead workers':>12} {'stock ms':>9} {'ours 1st ms':>12} {'ours ms':>8} "
        f"{'changed ms':>11} {'stock/ours':>10} {'stock/changed':>13}\n"
    )
    for r in rows:
        out(
            f"{r['files']:>12} {r['http_stock_ms']:>9.1f} {r['off_first_ms']:>12.1f} "
            f"{r['off_steady_ms']:>8.2f} {r['off_changed_ms']:>11.2f} "
            f"{r['http_stock_ms'] / r['off_steady_ms']:>9.0f}x "
            f"{r['http_stock_ms'] / r['off_changed_ms']:>12.0f}x\n"
        )
    ok = all(r["identical"] == "yes" == r["http_identical"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
