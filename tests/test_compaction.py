"""Dead workers' app metrics are compacted without changing what Prometheus sees.

Every directory here is written by real processes through prometheus_client's own write path.
The oracle is the stock MultiProcessCollector on a mirror of the uncompacted directory, after
mark_process_dead for every dead pid (what gunicorn's child_exit hook does).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from monitor.contract.appfiles import STATE_DIR, parse_name
from monitor.sidecar import compaction
from monitor.sidecar.collectors.appmetrics import AppMetricsCollector
from monitor.sidecar.compaction import QUARANTINE_DIR, run_compaction
from tests.harness import parse

ROOT = Path(__file__).resolve().parents[1]
MODES = "all liveall min livemin max livemax sum livesum mostrecent livemostrecent".split()

# A Gunicorn-like app worker: every metric type, every gauge mode, labels. Values are multiples
# of 1/4 so that sums are exact whatever order files are added in.
WORKER = r"""
import sys
ident = sys.argv[3] if len(sys.argv) > 3 else None
if ident:  # a process that gets a given pid (pid reuse), via the library's documented hook
    from prometheus_client import values
    values.ValueClass = values.MultiProcessValue(lambda: ident)
from prometheus_client import Counter, Gauge, Histogram, Summary

seed, linger = int(sys.argv[1]), sys.argv[2] == "linger"
MODES = MODES_HERE
requests = Counter("app_requests", "Requests.", ["method", "status"])
jobs = Counter("app_jobs", "Jobs.")
latency = Histogram("app_latency_seconds", "Latency.", ["route"], buckets=(0.25, 1.0, 4.0))
payload = Summary("app_payload_bytes", "Payload.", ["route"])
gauges = {m: Gauge("app_g_" + m, "Gauge " + m + ".", ["shard"], multiprocess_mode=m) for m in MODES}

def work(rnd):
    for i in range(3):
        requests.labels(("GET", "POST")[i % 2], ("200", "500")[i % 2]).inc(seed + i + rnd)
    jobs.inc(seed % 3)
    for i in range(4):
        latency.labels("ab"[i % 2]).observe((seed * i % 7) * 0.75 + rnd)
    payload.labels("a").observe(seed * 0.5 + rnd)
    for mode, g in gauges.items():
        for shard in ("x", "y"):
            child = g.labels(shard)
            if mode.endswith("mostrecent"):
                if (seed + rnd + len(shard)) % 3:  # some series never set: timestamp 0
                    child.set(seed * 1.5 + rnd)
            elif mode.endswith("sum"):
                child.inc(seed + rnd)
                child.dec(0.25)
            else:
                child.set((seed * 7 % 11) - 5 + rnd * 0.5)

work(0)
print("ready", flush=True)
while linger:
    cmd = sys.stdin.readline().strip()
    if cmd == "more":
        work(1)
        print("ready", flush=True)
    else:
        break
""".replace("MODES_HERE", repr(MODES))


class Workers:
    """Starts app worker processes and guarantees every one is gone at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(
        self, directory: Path, seed: int, linger: bool = False, ident: str | None = None
    ) -> subprocess.Popen[str]:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
        args = [sys.executable, "-c", WORKER, str(seed), "linger" if linger else "exit"]
        proc = subprocess.Popen(
            args + ([ident] if ident else []),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def run(self, directory: Path, seeds: range) -> list[int]:
        """Workers that write and exit, in parallel; returns their (now dead) pids."""
        procs = [self.start(directory, s) for s in seeds]
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
            assert p.wait(timeout=60) == 0
        return [p.pid for p in procs]

    def lingering(self, directory: Path, seeds: range) -> list[subprocess.Popen[str]]:
        procs = [self.start(directory, s, linger=True) for s in seeds]
        for p in procs:
            self.ready(p)
        return procs

    @staticmethod
    def ready(proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"

    @staticmethod
    def tell(proc: subprocess.Popen[str], cmd: str) -> None:
        assert proc.stdin is not None
        proc.stdin.write(cmd + "\n")
        proc.stdin.flush()
        if cmd == "more":
            Workers.ready(proc)
        else:
            assert proc.wait(timeout=60) == 0

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=60)
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    stream.close()


@pytest.fixture
def workers() -> Iterator[Workers]:
    w = Workers()
    yield w
    w.stop_all()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[int], int]]:
    """Eight dead workers' files plus one worker that stays alive for the whole module."""
    w = Workers()
    directory = tmp_path_factory.mktemp("template")
    try:
        dead = w.run(directory, range(1, 9))
        (live,) = w.lingering(directory, range(20, 21))
        yield directory, dead, live.pid
    finally:
        w.stop_all()


def exposition(collector: object) -> list[str]:
    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]
    return sorted(generate_latest(registry).decode().splitlines())


def stock(directory: Path) -> list[str]:
    return exposition(MultiProcessCollector(None, path=str(directory)))


def mirror(src: Path, dst: Path, dead: list[int]) -> Path:
    """Add src's worker files to the uncompacted mirror, then mark the dead pids dead there."""
    dst.mkdir(exist_ok=True)
    for name in os.listdir(src):
        db = parse_name(name)
        if db is not None and db.pid is not None:
            shutil.copyfile(src / name, dst / name)
    for pid in dead:
        mark_process_dead(pid, str(dst))
    return dst


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in os.listdir(src):
        if name.endswith(".db"):
            shutil.copyfile(src / name, dst / name)
    return dst


def worker_files(directory: Path, pids: list[int]) -> list[str]:
    return [
        n
        for n in os.listdir(directory)
        if (db := parse_name(n)) is not None and db.pid in set(pids)
    ]


def counter_values(lines: list[str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every monotonic sample (counters, histogram and summary parts) by name and labels."""
    out = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for s in family.samples:
            if s.name.endswith(("_total", "_count", "_sum", "_bucket")):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def assert_clean(directory: Path) -> None:
    state = directory / STATE_DIR
    assert os.listdir(state / "staged") == [] and os.listdir(state / "next") == []
    assert not (state / "COMMIT").exists()


def test_churning_workers_are_folded_and_scrapes_match_the_stock_collector(
    tmp_path: Path, workers: Workers
) -> None:
    directory, oracle_dir = tmp_path / "multiproc", tmp_path / "oracle"
    directory.mkdir()
    dead = workers.run(directory, range(1, 21))
    alive = workers.lingering(directory, range(40, 44))

    # The reader alone, no compaction, reads exactly what the stock collector reads.
    assert exposition(AppMetricsCollector(str(directory), compact=False)) == stock(directory)

    expected = stock(mirror(directory, oracle_dir, dead))
    collector = AppMetricsCollector(str(directory))
    first = exposition(collector)
    assert first == expected
    assert worker_files(directory, dead) == []
    stats = collector.stats()
    assert stats.files_compacted == 20 * 8  # 3 types + the gauge modes all/min/max/sum/mostrecent
    assert stats.live_files_dropped == 20 * 5  # the five live* gauge modes
    assert exposition(collector) == expected  # steady state

    # More churn: new workers die, two old ones do more work and die, two do more and live on.
    dead += workers.run(directory, range(21, 33))
    for proc in alive:
        workers.tell(proc, "more")
    for proc in alive[:2]:
        workers.tell(proc, "exit")
        dead.append(proc.pid)
    expected = stock(mirror(directory, oracle_dir, dead))
    second = exposition(collector)
    assert second == expected
    before, after = counter_values(first), counter_values(second)
    assert all(after[k] >= v for k, v in before.items())
    assert worker_files(directory, dead) == []

    for proc in alive[2:]:
        workers.tell(proc, "exit")
        dead.append(proc.pid)
    expected = stock(mirror(directory, oracle_dir, dead))
    assert exposition(collector) == expected
    assert sorted(os.listdir(directory)) == sorted(
        [f"{p}_aggregate.db" for p in ("counter", "histogram", "summary")]
        + [f"gauge_{m}_aggregate.db" for m in ("all", "min", "max", "sum", "mostrecent")]
        + [STATE_DIR]
    )
    assert_clean(directory)
    assert collector.stats().errors == {}

    # Aggregates use the collector's file naming: the stock collector reads them too, except
    # the `all` gauge, whose per-pid series only this collector restores.
    def without_all(lines: list[str]) -> list[str]:
        return [line for line in lines if "app_g_all" not in line]

    assert without_all(stock(directory)) == without_all(expected)


def test_unreadable_files_are_skipped_counted_and_quarantined(
    tmp_path: Path, template: tuple[Path, list[int], int]
) -> None:
    src, dead, live_pid = template
    directory = copy_dir(src, tmp_path / "multiproc")
    expected = stock(mirror(directory, tmp_path / "oracle", dead))
    gone = [int(open("/proc/sys/kernel/pid_max").read()) + i for i in (1, 2, 3)]
    histogram = next(n for n in os.listdir(src) if n.startswith("histogram_"))
    bad = {
        f"counter_{gone[0]}.db": b"",  # worker killed between open() and truncate()
        f"histogram_{gone[1]}.db": (src / histogram).read_bytes()[:200],  # truncated
        f"gauge_all_{gone[2]}.db": random.Random(7).randbytes(3000),  # garbage
        f"counter_{os.getpid()}.db": b"",  # a live worker creating its file right now
    }
    for name, data in bad.items():
        (directory / name).write_bytes(data)
    with sqlite3.connect(directory / "app.db") as db:  # someone else's database
        db.execute("create table t (x)")
    foreign = (directory / "app.db").read_bytes()

    collector = AppMetricsCollector(str(directory), quarantine_after=3600)
    assert exposition(collector) == expected
    stats = collector.stats()
    assert stats.files_quarantined == 3  # the dead workers' files, at once
    assert stats.files_skipped == 2  # the young ones: maybe still being created
    assert stats.errors["empty"] == 2 and stats.errors["truncated"] >= 1
    assert stats.errors["name"] == 1
    quarantined = {n.split("~", 1)[1]: n for n in os.listdir(directory / QUARANTINE_DIR)}
    assert sorted(quarantined) == sorted(list(bad)[:3])
    for name in list(bad)[:3]:  # moved aside untouched, never deleted
        assert (directory / QUARANTINE_DIR / quarantined[name]).read_bytes() == bad[name]

    later = AppMetricsCollector(str(directory), quarantine_after=0)
    assert exposition(later) == expected
    assert later.stats().files_quarantined == 2
    assert not (directory / "app.db").exists()
    moved = [n for n in os.listdir(directory / QUARANTINE_DIR) if n.endswith("~app.db")]
    assert (directory / QUARANTINE_DIR / moved[0]).read_bytes() == foreign
    assert exposition(later) == expected
    assert later.stats().files_skipped == 2  # nothing left to skip on the second scrape


def _reused_pid_setup(tmp_path: Path, workers: Workers) -> tuple[Path, str]:
    directory = tmp_path / "multiproc"
    directory.mkdir()
    pid = str(int(open("/proc/sys/kernel/pid_max").read()) + 5)
    first = workers.start(directory, 3, ident=pid)  # the first owner of the pid: dies
    workers.ready(first)
    assert first.wait(timeout=60) == 0
    return directory, pid


def _total(lines: list[str]) -> float:
    return sum(v for (name, _), v in counter_values(lines).items() if name == "app_requests_total")


def test_a_reused_pid_after_staging_gets_a_fresh_file(
    tmp_path: Path, workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, pid = _reused_pid_setup(tmp_path, workers)
    alive: set[int] = set()
    successor: list[subprocess.Popen[str]] = []

    def hook(step: str) -> None:
        if step == "staged" and not successor:  # the pid is reused right after staging
            successor.append(workers.start(directory, 3, linger=True, ident=pid))
            workers.ready(successor[0])
            alive.add(int(pid))

    monkeypatch.setattr(compaction, "_crash_hook", hook)
    collector = AppMetricsCollector(str(directory), is_alive=lambda p: p in alive)
    once = _total(stock(directory))
    assert _total(exposition(collector)) == 2 * once  # the dead one folded, the new one live
    assert (directory / "counter_aggregate.db").exists()
    assert (directory / f"counter_{pid}.db").exists()

    workers.tell(successor[0], "more")
    with_more = _total(exposition(collector))
    workers.tell(successor[0], "exit")
    alive.clear()
    assert _total(exposition(collector)) == with_more  # folded exactly once
    assert not (directory / f"counter_{pid}.db").exists()
    assert_clean(directory)


def test_a_reused_pid_that_reopened_the_old_file_keeps_it_until_it_dies(
    tmp_path: Path, workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, pid = _reused_pid_setup(tmp_path, workers)
    once = _total(stock(directory))
    # The new owner of the pid opens the old file (and continues its values) just before the
    # compaction renames it: liveness said "dead" at the scan, "alive" at the re-check.
    successor = workers.start(directory, 3, linger=True, ident=pid)
    workers.ready(successor)
    alive: set[int] = set()
    checks: list[str] = []

    def hook(step: str) -> None:
        if step == "staged" and not checks:
            checks.append(step)
            alive.add(int(pid))

    monkeypatch.setattr(compaction, "_crash_hook", hook)
    collector = AppMetricsCollector(str(directory), is_alive=lambda p: p in alive)
    assert _total(exposition(collector)) == 2 * once
    assert collector.stats().files_compacted == 0  # put back, not folded
    assert (directory / f"counter_{pid}.db").exists()

    workers.tell(successor, "more")  # these writes land in the file that was put back
    with_more = _total(exposition(collector))
    assert with_more > 2 * once
    workers.tell(successor, "exit")
    alive.clear()
    assert _total(exposition(collector)) == with_more
    assert collector.stats().files_compacted == 8
    assert_clean(directory)


class Crash(BaseException):
    """Stops a compaction mid-step, leaving the disk exactly as a SIGKILL there would."""


def test_a_crash_while_putting_back_a_reused_pids_file_folds_it_once(
    tmp_path: Path, workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, pid = _reused_pid_setup(tmp_path, workers)
    successor = workers.start(directory, 3, linger=True, ident=pid)
    workers.ready(successor)
    continued = _total(stock(directory))
    alive: set[int] = set()
    steps: list[str] = []

    def hook(step: str) -> None:
        steps.append(step)
        if step == "staged" and steps.count(step) == 1:
            alive.add(int(pid))
        if step == "relinked" and steps.count(step) == 1:
            raise Crash  # the file now has two names: back in place, and still staged

    monkeypatch.setattr(compaction, "_crash_hook", hook)
    with pytest.raises(Crash):
        run_compaction(str(directory), lambda p: p in alive)
    workers.tell(successor, "exit")
    alive.clear()
    collector = AppMetricsCollector(str(directory), is_alive=lambda p: p in alive)
    assert _total(exposition(collector)) == continued
    assert collector.stats().files_compacted == 8
    assert_clean(directory)


CRASH_POINTS = [
    ["staged-one"],
    ["staged"],
    ["quarantined"],
    ["written"],
    ["committed"],
    ["applied-one"],
    ["applied"],
    ["cleaned-one"],
    ["cleaned"],
    # crashed again while recovering or retrying
    ["committed", "applied-one"],
    ["written", "committed"],
    ["staged-one", "cleaned-one"],
    ["applied-one", "cleaned"],
]

CRASHING_COMPACTION = """
import os, signal, sys
from monitor.sidecar import compaction
point = sys.argv[2]
compaction._crash_hook = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == point else None
print("go", flush=True)
compaction.run_compaction(sys.argv[1])
print("done", flush=True)
"""


@pytest.mark.parametrize("points", CRASH_POINTS, ids="+".join)
def test_a_compaction_killed_at_any_step_loses_and_doubles_nothing(
    tmp_path: Path, template: tuple[Path, list[int], int], points: list[str]
) -> None:
    src, dead, live_pid = template
    directory = copy_dir(src, tmp_path / "multiproc")
    expected = stock(mirror(directory, tmp_path / "oracle", dead))
    pid_max = int(open("/proc/sys/kernel/pid_max").read())
    (directory / f"summary_{pid_max + 9}.db").write_bytes(b"")  # makes "quarantined" reachable

    for point in points:
        result = subprocess.run(
            [sys.executable, "-c", CRASHING_COMPACTION, str(directory), point],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=60,
        )
        assert result.returncode == -signal.SIGKILL, f"never reached {point}"

    collector = AppMetricsCollector(str(directory))
    assert exposition(collector) == expected
    assert exposition(collector) == expected
    assert_clean(directory)
    assert worker_files(directory, dead) == []
    assert worker_files(directory, [live_pid]) != []
    assert len(os.listdir(directory / QUARANTINE_DIR)) == 1


def test_compactions_killed_at_random_moments_lose_and_double_nothing(
    tmp_path: Path, template: tuple[Path, list[int], int]
) -> None:
    src, dead, _ = template
    directory = copy_dir(src, tmp_path / "multiproc")
    oracle = mirror(directory, tmp_path / "oracle", dead)
    counter = next(n for n in os.listdir(src) if n.startswith("counter_"))
    first = int(open("/proc/sys/kernel/pid_max").read()) + 100
    rng = random.Random(1199)
    kills, window = 0, 0.05  # narrowed to the length of a compaction once one finishes
    for attempt in range(20):
        for pid in range(first + 400 * attempt, first + 400 * attempt + 400):
            for target in (directory, oracle):  # more workers died since the last attempt
                shutil.copyfile(src / counter, target / f"counter_{pid}.db")
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASHING_COMPACTION, str(directory), "never"],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline() == "go\n"
        started = time.monotonic()
        try:
            proc.wait(timeout=rng.uniform(0.0, window))
            window = (time.monotonic() - started) * 0.9
        except subprocess.TimeoutExpired:
            proc.kill()
            kills += 1
        proc.wait(timeout=60)
        proc.stdout.close()
        if kills == 5:
            break
    assert kills == 5  # the kills really landed mid-compaction
    collector = AppMetricsCollector(str(directory))
    assert exposition(collector) == stock(oracle)
    assert_clean(directory)


def test_a_failing_compaction_still_serves_every_sample(
    tmp_path: Path, template: tuple[Path, list[int], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dead, _ = template
    directory = copy_dir(src, tmp_path / "multiproc")
    expected = stock(mirror(directory, tmp_path / "oracle", dead))

    def disk_full(step: str) -> None:
        if step == "written":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(compaction, "_crash_hook", disk_full)
    collector = AppMetricsCollector(str(directory))
    assert exposition(collector) == expected  # the staged files are read where they wait
    assert collector.stats().errors == {"compaction": 1}
    monkeypatch.setattr(compaction, "_crash_hook", None)
    assert exposition(collector) == expected
    assert collector.stats().files_compacted == len(dead) * 8
    assert_clean(directory)


def test_overlapping_scrapes_compact_once(
    tmp_path: Path, template: tuple[Path, list[int], int]
) -> None:
    src, dead, _ = template
    directory = copy_dir(src, tmp_path / "multiproc")
    expected = stock(mirror(directory, tmp_path / "oracle", dead))
    collector = AppMetricsCollector(str(directory))
    start = threading.Barrier(4)
    results: list[list[str]] = []

    def scrape() -> None:
        start.wait()
        results.append(exposition(collector))

    threads = [threading.Thread(target=scrape) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [expected] * 4
    stats = collector.stats()
    assert stats.compactions == 1 and stats.files_compacted == len(dead) * 8
    assert stats.scrapes + stats.scrapes_reused == 4


def test_without_folding_dead_files_are_read_once_and_scrapes_match_the_stock_collector(
    tmp_path: Path, workers: Workers
) -> None:
    """Folding off (the default) moves no file: dead workers' files are folded in memory, each
    read once, and every scrape is still the stock collector's, sample for sample."""
    directory = tmp_path / "multiproc"
    directory.mkdir()
    dead = workers.run(directory, range(1, 11))
    (lingering,) = workers.lingering(directory, range(40, 41))
    collector = AppMetricsCollector(str(directory), compact=False)

    def files_read() -> int:
        return collector.stats().files_read

    assert exposition(collector) == stock(directory)
    first = files_read()
    assert first == len(os.listdir(directory))  # every file once
    assert exposition(collector) == stock(directory)
    # Again: only the live worker's files (3 plain types, 10 gauge modes) are read; the dead
    # workers' files are not, their live-mode gauges (not yet removed) included.
    assert files_read() - first == 3 + 5 + 5

    # Churn: more workers die; the one lingering works on, then dies; its files join the fold.
    dead += workers.run(directory, range(11, 16))
    workers.tell(lingering, "more")
    assert exposition(collector) == stock(directory)
    workers.tell(lingering, "exit")
    dead.append(lingering.pid)
    assert exposition(collector) == stock(directory)
    for pid in dead:
        mark_process_dead(pid, str(directory))  # what the hooks do in child_exit
    assert exposition(collector) == stock(directory)
    before = files_read()
    assert exposition(collector) == stock(directory)
    assert files_read() == before  # every process dead and folded: nothing read again

    # A folded file goes (an operator cleans up): the fold is made again, without it.
    gone = sorted(worker_files(directory, dead[:1]))[0]
    os.unlink(directory / gone)
    assert exposition(collector) == stock(directory)

    # A worker dies leaving an unreadable file (killed mid-write): left out and counted at
    # every collection, never folded.
    (bad,) = workers.run(directory, range(16, 17))
    mark_process_dead(bad, str(directory))
    (directory / f"counter_{bad}.db").write_bytes(b"\x10\x00\x00\x00garbage!")
    mirror_dir = copy_dir(directory, tmp_path / "oracle")
    os.unlink(mirror_dir / f"counter_{bad}.db")
    assert exposition(collector) == stock(mirror_dir)
    assert exposition(collector) == stock(mirror_dir)
    assert collector.stats().errors == {"truncated": 2}
    assert os.path.exists(directory / f"counter_{bad}.db")  # folding off moves nothing


def _reuse_pid(workers: Workers, directory: Path, pid: int) -> None:
    """A worker that gets `pid` from the kernel (a real pid reuse), writes on into the dead
    one's files, and dies. The kernel gives the pid after ns_last_pid next (writing it needs
    root, as CRIU does); another process may take it first, so try a few times."""
    for _ in range(20):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = workers.start(directory, 9)
        workers.ready(proc)
        assert proc.wait(timeout=60) == 0
        if proc.pid == pid:
            mark_process_dead(pid, str(directory))
            # Behind every reader's last look again, which reads as a wrap whose range holds
            # pid: on a busy machine other processes may have carried the counter past a
            # reader's last look meanwhile, and then no reader of it can tell (deadfiles.py).
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid))
            return
    pytest.skip(f"pid {pid} kept being taken by other processes")


@pytest.mark.skipif(os.geteuid() != 0, reason="a real pid reuse needs root (ns_last_pid)")
def test_a_dead_pid_reused_between_two_scrapes_is_read_again(
    tmp_path: Path, workers: Workers
) -> None:
    """The pid of a folded file is given to a new process, which writes on into the old file
    and dies, all between two scrapes: dead at both, and yet the next scrape has its writes."""
    directory = tmp_path / "multiproc"
    directory.mkdir()
    (pid,) = workers.run(directory, range(3, 4))
    for pid_ in workers.run(directory, range(4, 6)):
        mark_process_dead(pid_, str(directory))
    mark_process_dead(pid, str(directory))
    collector = AppMetricsCollector(str(directory), compact=False)
    once = _total(stock(directory))
    assert exposition(collector) == stock(directory)
    _reuse_pid(workers, directory, pid)
    assert _total(stock(directory)) > once  # the new process counted on in the old file
    assert exposition(collector) == stock(directory)


@pytest.mark.skipif(os.geteuid() != 0, reason="a real pid reuse needs root (ns_last_pid)")
def test_the_sidecar_serves_a_reused_pids_writes_at_the_next_scrape(
    shared_dir: Path, workers: Workers, make_exporter
) -> None:
    """The same, through `gunicorn-monitor serve`: its kept body must go too."""
    directory = shared_dir
    (pid,) = workers.run(directory, range(3, 4))
    mark_process_dead(pid, str(directory))
    e = make_exporter()

    def app(samples: dict) -> dict:
        return {k: v for k, v in samples.items() if k[0].startswith("app_")}

    want = app(parse("\n".join(stock(directory)) + "\n"))
    assert app(e.scrape()) == want
    assert app(e.scrape()) == want  # the kept body
    _reuse_pid(workers, directory, pid)
    want_now = app(parse("\n".join(stock(directory)) + "\n"))
    assert want_now != want
    assert app(e.scrape()) == want_now


def test_new_pids_are_the_range_the_kernel_gave_since_the_last_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from monitor.sidecar import deadfiles

    new = deadfiles.NewPids()
    new.since()
    child = subprocess.Popen(["true"])
    child.wait()
    since = new.since()
    assert since(child.pid) and not since(os.getpid()) and not since(1)
    assert not new.since()(child.pid)  # nothing new since that look
    # A wrap past pid_max: the kernel's counter at 32760, then at 400.
    last = tmp_path / "ns_last_pid"
    monkeypatch.setattr(deadfiles, "LAST_PID", str(last))
    last.write_text("32760\n")
    new = deadfiles.NewPids()
    last.write_text("400\n")
    since = new.since()
    assert since(32761) and since(32767) and since(300) and since(400)
    assert not since(401) and not since(32760) and not since(20000)
    last.unlink()  # unreadable: anything may be new
    assert new.since()(20000)


def test_files_the_hooks_staged_are_pending_before_any_fold_made_next(tmp_path):
    # The hooks stage a dead worker's files into .compacting/staged/ (contract/appfiles.py);
    # next/ is made by the first fold. A look that required next/ said nothing was pending,
    # so no fold ever ran and the dead workers' counts were left out of every scrape.
    top = tmp_path / "multiproc"
    staged = top / STATE_DIR / "staged"
    staged.mkdir(parents=True)
    for d in (top, top / STATE_DIR, staged):
        d.chmod(0o700)
    (staged / "18eec89b6701cae5e72e5277~counter_8614.db").write_bytes(b"\0" * 16)
    assert compaction.has_pending(str(top))
    assert [name for name, _ in compaction.read_staged(str(top))] == [
        "18eec89b6701cae5e72e5277~counter_8614.db"
    ]
