"""Scrape cost of app multiprocess metrics: the stock MultiProcessCollector against the sidecar.

Builds directories of N dead workers' files (10 labelled counter series per file, the layout of
the research baseline in shared/research/prometheus-multiprocess.md §4), then, in the same run
and with a warm page cache, times the stock collector and ours, and checks that both give the
same samples. The default mode (folding off: dead workers' files stay in the glob) comes first,
then `--app-metrics.fold`.

In process: `generate_latest` with the stock collector, and with AppMetricsCollector (its first
scrape, which reads every file once, and steady-state scrapes).

End to end over HTTP, each side a real server on loopback, scraped as Prometheus asks
(OpenMetrics, gzip): the stock collector behind prometheus_client's own `start_http_server`,
and `gunicorn-monitor serve` on the same directory (the default moves no file), then
`gunicorn-monitor serve --app-metrics.fold` on a copy. Each directory also holds one live
process's counter file (this script's), incremented before each "changed" scrape, so that
those scrapes must collect anew; "unchanged" scrapes are what a quiet app's scrapes are. "1st"
is the first scrape, sent as soon as the server accepts connections (the sidecar starts reading
the directory when it starts, and a scrape waits for that read); "start" is from spawning the
server to the end of that first scrape, for stock too.

Files are written through prometheus_client's own write path (MultiProcessValue with an
overridden process identifier, as upstream's tests do), one file set per dead worker, up to
--real workers; beyond that the first worker's files are cloned byte for byte under further
pids to keep the run short (the output says how many were cloned). Dead pids are above the
kernel's pid_max, so no running process can own them.

    python benchmarks/scrape.py [--sizes 1000,10000,100000] [--real 1000] [--repeat 7]

Targets, over HTTP, default mode: at 10,000 dead workers an unchanged scrape at least 200x
faster than stock and a changed one at least 100x; at 100,000, unchanged under 5 ms and changed
under 10 ms; the first scrape no slower than stock's, in both modes.
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
from benchmarks.exporter_cost import BASELINE, HEADERS, start_exporter  # noqa: E402
from monitor.sidecar.collectors.appmetrics import AppMetricsCollector  # noqa: E402
from tests.harness import BIN, app_process, free_port, wait_for  # noqa: E402


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


def dead_left(directory: Path) -> int:
    """Dead workers' files still in the glob (their pids are above pid_max)."""
    first = int(Path("/proc/sys/kernel/pid_max").read_text())
    return sum(1 for name in os.listdir(directory) if _pid(name) > first)


def _pid(name: str) -> int:
    ident = name[:-3].rpartition("_")[2]
    return int(ident) if name.endswith(".db") and ident.isdigit() else 0


def live_counter(directory: Path) -> Callable[[], None]:
    """A counter in `directory` owned by this (live) process, written by the library's own
    mmap path; returns its inc()."""
    with app_process(directory, os.getpid):
        child = Counter("app_live", "A live worker's requests.", registry=None)
        child.inc()
    return child.inc


def server(cmd: list[str], port: int) -> tuple[subprocess.Popen, float]:
    """A server, accepting connections; returns it and when it was spawned. (Not a GET: the
    stock server answers every path with a whole scrape.)"""
    spawned = time.perf_counter()
    proc = start_exporter(cmd)

    def accepting() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(accepting, 120, "accepting")
    return proc, spawned


# One scrape as Prometheus asks for it (exporter_cost.HEADERS), on a connection closed after
# its answer: read to the end.
REQUEST = (
    b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: Prometheus/3.0.0\r\n"
    + b"".join(f"{k}: {v}\r\n".encode() for k, v in HEADERS.items())
    + b"Connection: close\r\n\r\n"
)


def http_scrape(port: int) -> bytes:
    """One scrape on a new connection, as http_load.py does it: a raw socket, so that the
    measuring script's own HTTP client does not weigh on a sub-millisecond answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=300) as s:
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


def measure_http(stock_dir: Path, fold_dir: Path, repeat: int) -> dict[str, float | str]:
    """stock and the default sidecar on stock_dir (the default moves no file); the folding
    sidecar on fold_dir, a copy, which its first scrape folds."""
    incs = [live_counter(stock_dir), live_counter(fold_dir)]
    port = free_port()
    proc, spawned = server([sys.executable, "-c", BASELINE, str(stock_dir), str(port)], port)
    procs = [proc]
    result: dict[str, float | str] = {}
    try:
        first_s, _ = timed(lambda: http_scrape(port), 1)
        result["stock_start_ms"] = (time.perf_counter() - spawned) * 1e3
        result["stock_first_ms"] = first_s * 1e3
        stock_s, stock_out = timed(lambda: http_scrape(port), repeat)
        result["stock_ms"] = stock_s * 1e3
        same = True
        for mode, directory, fold in (("off", stock_dir, False), ("fold", fold_dir, True)):
            ours_port = free_port()
            cmd = [str(BIN / "gunicorn-monitor"), "serve", "--dir"]
            cmd += [str(directory), "--listen", f"127.0.0.1:{ours_port}"]
            proc, spawned = server(cmd + ["--app-metrics.fold"] * fold, ours_port)
            procs.append(proc)
            first_s, _ = timed(functools.partial(http_scrape, ours_port), 1)
            result[f"{mode}_start_ms"] = (time.perf_counter() - spawned) * 1e3
            if fold:  # the backlog goes to disk in the background: measured once it is there
                wait_for(lambda d=directory: dead_left(d) == 0, 1800, "the backlog folded")
                result["fold_drained_s"] = time.perf_counter() - spawned
            steady_s, steady_out = timed(functools.partial(http_scrape, ours_port), max(repeat, 50))
            # Nothing moved since the stock scrapes above: a quiet app's scrape.
            same = same and app_samples(steady_out) == app_samples(stock_out)
            changed = []
            for _ in range(max(repeat, 20)):
                for inc in incs:
                    inc()
                changed.append(timed(functools.partial(http_scrape, ours_port), 1)[0])
            ours = app_samples(http_scrape(ours_port))
            stock_out = http_scrape(port)  # the live counters moved: the next one compares
            same = same and ours == app_samples(stock_out)
            result[f"{mode}_first_ms"] = first_s * 1e3
            result[f"{mode}_steady_ms"] = steady_s * 1e3
            result[f"{mode}_changed_ms"] = statistics.median(changed) * 1e3
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


def copy_dir(src: Path, dst: Path) -> None:
    dst.mkdir()
    for name in os.listdir(src):
        sparse_copy(src / name, dst / name)


def measure(root: Path, size: int, real: int, repeat: int) -> dict[str, float | int | str]:
    original, fold_dir = root / f"stock-{size}", root / f"fold-{size}"
    original.mkdir()
    started = time.perf_counter()
    cloned = build(original, size, real)
    copy_dir(original, fold_dir)
    build_s = time.perf_counter() - started

    stock = registry_of(MultiProcessCollector(None, path=str(original)))
    generate_latest(stock)  # warm the page cache
    stock_s, stock_out = timed(lambda: generate_latest(stock), repeat)
    expected = sorted(stock_out.splitlines())
    row: dict[str, float | int | str] = {"files": size, "cloned": cloned, "build_s": build_s}
    row["inproc_stock_ms"] = stock_s * 1e3
    identical = True
    for mode, directory, fold in (("off", original, False), ("fold", fold_dir, True)):
        ours = registry_of(AppMetricsCollector(str(directory), compact=fold))
        first_s, first_out = timed(lambda ours=ours: generate_latest(ours), 1)
        steady_s, steady_out = timed(lambda ours=ours: generate_latest(ours), max(repeat, 50))
        same = sorted(first_out.splitlines()) == expected == sorted(steady_out.splitlines())
        identical = identical and same
        row[f"inproc_{mode}_first_ms"] = first_s * 1e3
        row[f"inproc_{mode}_steady_ms"] = steady_s * 1e3
    shutil.rmtree(fold_dir)
    copy_dir(original, fold_dir)  # a fresh, unfolded copy for the HTTP run
    row.update(measure_http(original, fold_dir, repeat))
    for d in (original, fold_dir):
        shutil.rmtree(d)
    row["identical"] = "yes" if identical else "NO"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="dead workers per directory")
    parser.add_argument("--real", type=int, default=1000, help="workers written, not cloned")
    parser.add_argument("--repeat", type=int, default=7, help="stock scrapes timed (median)")
    parser.add_argument("--dir", help="where to build (default: a temporary directory)")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            rows.append(measure(Path(tmp), size, args.real, args.repeat))

    out = sys.stdout.write
    out("In process (generate_latest alone), same run, warm page cache:\n")
    out(
        f"{'dead workers':>12} {'cloned':>7} {'stock ms':>9} {'default 1st':>12} "
        f"{'default ms':>11} {'fold 1st':>9} {'fold ms':>8} {'same output':>11}\n"
    )
    for r in rows:
        out(
            f"{r['files']:>12,} {r['cloned']:>7} {r['inproc_stock_ms']:>9.1f} "
            f"{r['inproc_off_first_ms']:>12.1f} {r['inproc_off_steady_ms']:>11.3f} "
            f"{r['inproc_fold_first_ms']:>9.1f} {r['inproc_fold_steady_ms']:>8.3f} "
            f"{r['identical']:>11}\n"
        )
    out(
        f"stock: median of {args.repeat}; 1st: the first scrape of a new collector (reads every "
        "file once; folding also moves and compacts them); ms: steady state, median of 50.\n"
        f"cloned = files copied byte for byte from the first library-written file "
        f"(the first {args.real} per size are written by prometheus_client itself).\n\n"
    )
    for mode, title in (
        ("off", "Over HTTP, the default (no folding: dead workers' files stay in place)"),
        ("fold", "Over HTTP, --app-metrics.fold (dead workers' files folded on disk)"),
    ):
        out(f"{title}, end to end (request to last byte, OpenMetrics + gzip), same run:\n")
        if mode == "fold":
            drained = ", ".join(f"{r['files']:,}: {r['fold_drained_s']:.1f} s" for r in rows)
            out(
                "(its first scrape serves the backlog from memory; the backlog then goes to "
                f"disk in the background, done after: {drained}; the rest is measured after)\n"
            )
        out(
            f"{'dead workers':>12} {'stock ms':>9} {'ours ms':>8} {'changed ms':>11} "
            f"{'stock/ours':>10} {'stock/changed':>13} {'1st ms':>8} {'stock/1st':>9} "
            f"{'start s':>8} {'stock start s':>13} {'same samples':>12}\n"
        )
        for r in rows:
            out(
                f"{r['files']:>12,} {r['stock_ms']:>9.1f} {r[f'{mode}_steady_ms']:>8.2f} "
                f"{r[f'{mode}_changed_ms']:>11.2f} "
                f"{r['stock_ms'] / r[f'{mode}_steady_ms']:>9.0f}x "
                f"{r['stock_ms'] / r[f'{mode}_changed_ms']:>12.0f}x "
                f"{r[f'{mode}_first_ms']:>8.1f} {r['stock_ms'] / r[f'{mode}_first_ms']:>8.2f}x "
                f"{r[f'{mode}_start_ms'] / 1e3:>8.2f} {r['stock_start_ms'] / 1e3:>13.2f} "
                f"{r['http_identical']:>12}\n"
            )
        out("\n")
    out(
        f"stock = prometheus_client's start_http_server + MultiProcessCollector, median of "
        f"{args.repeat}; ours = gunicorn-monitor serve: unchanged scrapes (median of 50) and "
        "changed scrapes (a live counter moved before each, median of 20); 1st = the first "
        "scrape, sent once the server accepts connections; start = from spawning the server to "
        "the end of its first scrape.\n"
    )
    ok = all(r["identical"] == "yes" == r["http_identical"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
