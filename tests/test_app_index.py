"""The app's files are kept from scrape to scrape, and every scrape is still the stock one.

A scrape reads the live processes' files and what changed (monitor/sidecar/appindex.py); these
tests change the directory in every way it changes in the field and check, after each change,
that the served samples are the stock MultiProcessCollector's on the same files, and that
nothing was lost: new files of any origin, files removed, a dead pid given out again (read
again), a filesystem that reports no changes (found by the audit), both folding modes.

Files are written through prometheus_client's own write path as the process with a given pid
would (tests.harness.app_process). Dead pids are above the kernel's pid_max, so no process can
own one; the live ones are this test's own pid.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.multiprocess import mark_process_dead

from monitor.contract.appfiles import DbName
from monitor.sidecar import appindex, dbfile, deadfiles
from monitor.sidecar.collectors.appmetrics import AppMetricsCollector
from monitor.sidecar.deadfiles import BUCKET, FAN, DeadFold
from tests.harness import app_process, parse
from tests.test_compaction import exposition, stock

PID_MAX = int(Path("/proc/sys/kernel/pid_max").read_text())
DEAD = PID_MAX + 1  # the first of the dead pids
MODES = "all liveall min livemin max livemax sum livesum mostrecent livemostrecent".split()


def write(directory: Path, pid: int, seed: int = 1) -> Callable[[], None]:
    """A process `pid`'s files: a counter, a histogram and a gauge of every mode, as its
    prometheus_client writes them. Returns a function that writes more into the same files."""
    with app_process(directory, lambda: pid):  # children made here write as `pid`
        requests = Counter("app_requests", "Requests.", ["code"], registry=None)
        code = requests.labels(("200", "500")[seed % 2])
        latency = Histogram("app_latency_seconds", "Latency.", registry=None, buckets=(1, 4))
        gauges = [
            (m, Gauge(f"app_g_{m}", f"Gauge {m}.", ["shard"], multiprocess_mode=m, registry=None))
            for m in MODES
        ]
        shards = [(m, g.labels("x")) for m, g in gauges]

    def more(step: float = 1.0) -> None:
        code.inc(seed + step)
        latency.observe(seed % 5 * 0.75 + step)
        for mode, shard in shards:
            if mode.endswith("mostrecent"):
                shard.set(seed * 1.5 + step)
            else:
                shard.set(seed % 7 - 2 + step * 0.5)

    more(0.0)
    return more


def dead_workers(directory: Path, first: int, count: int) -> list[int]:
    pids = list(range(first, first + count))
    for pid in pids:
        write(directory, pid, seed=pid % 11)
    return pids


def files_of(directory: Path, pid: int) -> list[Path]:
    return sorted(directory.glob(f"*_{pid}.db"))


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    d = tmp_path / "multiproc"
    d.mkdir()
    return d


@pytest.mark.parametrize("use_inotify", [True, False], ids=["inotify", "stat"])
def test_files_of_every_origin_are_served_at_the_next_scrape(directory: Path, use_inotify):
    dead_workers(directory, DEAD, 40)
    live = write(directory, os.getpid(), seed=3)
    collector = AppMetricsCollector(str(directory), compact=False, use_inotify=use_inotify)
    assert collector.files._watch.mode == ("inotify" if use_inotify else "stat")
    assert exposition(collector) == stock(directory)
    unfolded, folded = collector.files.counts()
    assert unfolded == len(files_of(directory, os.getpid())) and folded == 40 * (len(MODES) + 2)

    # A quiet scrape reads the live process's files, and no dead one.
    before = collector.stats().files_read
    assert exposition(collector) == stock(directory)
    assert collector.stats().files_read - before == unfolded

    live()  # a live counter moved
    assert exposition(collector) == stock(directory)

    # A dead process's files that no hook recorded: written after the first scrape.
    dead_workers(directory, DEAD + 100, 2)
    assert exposition(collector) == stock(directory)

    # Copied in by hand, renamed into place (as an operator restoring files would).
    elsewhere = directory.parent / "elsewhere"
    elsewhere.mkdir()
    dead_workers(elsewhere, DEAD + 200, 1)
    for f in files_of(elsewhere, DEAD + 200):
        os.rename(f, directory / f.name)
    assert exposition(collector) == stock(directory)

    # Removed by hand (a folded file), and the dead pids' live gauges removed by the hooks.
    os.unlink(files_of(directory, DEAD + 5)[0])
    for pid in range(DEAD, DEAD + 40, 3):
        mark_process_dead(pid, str(directory))
    assert exposition(collector) == stock(directory)

    # Replaced under the same name by another file (another inode).
    victim = files_of(directory, DEAD + 7)[0]
    shutil.copyfile(files_of(directory, DEAD + 8)[0], directory / "x.tmp")
    os.replace(directory / "x.tmp", victim)
    assert exposition(collector) == stock(directory)
    assert collector.stats().errors == {}


def test_without_events_the_audit_finds_what_changed_within_its_bound(directory: Path):
    """A filesystem that reports no change (the watch sees nothing after the first listing):
    what changed is served after the next audit (every appindex.RESCAN seconds), not lost."""
    dead_workers(directory, DEAD, 20)
    collector = AppMetricsCollector(str(directory), compact=False)
    assert exposition(collector) == stock(directory)
    collector.files._watch.look = lambda: set()  # blind from now on
    dead_workers(directory, DEAD + 50, 3)
    os.unlink(files_of(directory, DEAD + 1)[0])
    before = stock(directory)
    assert exposition(collector) != before  # not seen yet: no event came
    collector.files.audit()
    assert exposition(collector) == before


def test_a_dead_pid_given_out_again_is_read_again(directory: Path, tmp_path: Path, monkeypatch):
    """The kernel's ns_last_pid (a file here) says which pids were handed out between two
    scrapes. A folded file of such a pid is read again: if a process with that pid wrote on
    into it (prometheus_client continues an existing file), the fold takes the new bytes; if
    that process still lives, the file is read on every scrape until it dies."""
    last_pid = tmp_path / "ns_last_pid"
    last_pid.write_text(f"{DEAD - 1}\n")
    monkeypatch.setattr(deadfiles, "LAST_PID", str(last_pid))
    alive: set[int] = set()

    def is_alive(pid: int) -> bool:
        return pid in alive

    more = {pid: write(directory, pid, seed=pid % 5) for pid in range(DEAD, DEAD + 70)}
    collector = AppMetricsCollector(str(directory), compact=False, is_alive=is_alive)
    assert exposition(collector) == stock(directory)
    assert collector.files.counts()[0] == 0  # all dead, all folded

    # DEAD + 3 lived and died between two scrapes, writing on into its file.
    more[DEAD + 3](2.0)
    last_pid.write_text(f"{DEAD + 3}\n")
    assert exposition(collector) == stock(directory)

    # DEAD + 40 is given out and its process still lives: read on every scrape.
    last_pid.write_text(f"{DEAD + 40}\n")
    alive.add(DEAD + 40)
    assert exposition(collector) == stock(directory)
    assert collector.files.counts()[0] == len(files_of(directory, DEAD + 40))
    more[DEAD + 40](3.0)
    assert exposition(collector) == stock(directory)
    alive.clear()  # and dies: folded again, with what it wrote last
    more[DEAD + 40](4.0)
    assert exposition(collector) == stock(directory)
    assert collector.files.counts()[0] == 0

    # A pid given out again without writing (any other program): the fold stands, unread.
    last_pid.write_text(f"{DEAD + 41}\n")
    assert exposition(collector) == stock(directory)

    # ns_last_pid cannot be read: every pid may be new, every folded file is checked.
    last_pid.unlink()
    more[DEAD + 60](5.0)
    assert exposition(collector) == stock(directory)


def test_the_first_scrape_finds_the_live_among_many_dead(directory: Path):
    """A directory's first read checks its pids in one listing of /proc: the live process's
    files stay unfolded, and what it writes next is served."""
    dead_workers(directory, DEAD, appindex.BULK * 2)
    live = write(directory, os.getpid(), seed=4)
    collector = AppMetricsCollector(str(directory), compact=False)
    assert exposition(collector) == stock(directory)
    assert collector.files.counts()[0] == len(files_of(directory, os.getpid()))
    live(7.0)
    assert exposition(collector) == stock(directory)


@pytest.mark.parametrize("compact", [False, True], ids=["folding-off", "folding-on"])
def test_both_folding_modes_serve_the_stock_samples_through_churn(tmp_path: Path, compact):
    """Workers die, new ones come, the dead pids' live gauges are removed: after each step,
    the samples are the stock collector's on a copy of the directory that nothing folds."""
    directory, oracle = tmp_path / "served", tmp_path / "oracle"
    directory.mkdir()
    oracle.mkdir()
    alive: set[int] = set()  # every other pid is dead
    created: list[int] = []

    def both(pid: int, seed: int) -> Callable[[float], None]:
        created.append(pid)
        a, b = write(directory, pid, seed), write(oracle, pid, seed)
        return lambda step: (a(step), b(step))  # type: ignore[func-returns-value]

    for pid in range(DEAD, DEAD + 30):
        both(pid, pid % 9)
    workers = {pid: both(pid, pid % 4) for pid in range(DEAD + 1000, DEAD + 1004)}
    alive.update(workers)
    collector = AppMetricsCollector(str(directory), compact=compact, is_alive=alive.__contains__)

    def check() -> None:
        if not compact:  # folding on drops a dead pid's live gauges as mark_process_dead would
            assert exposition(collector) == stock(oracle)
        for pid in created:  # what the hooks do for each dead worker, in both directories
            if pid not in alive:
                mark_process_dead(pid, str(oracle))
                mark_process_dead(pid, str(directory))
        assert exposition(collector) == stock(oracle)

    check()
    for round_ in range(3):
        for pid in sorted(alive):
            workers[pid](round_ + 1.0)
        check()
        gone = sorted(alive)[0]
        alive.discard(gone)  # a worker dies; a replacement comes
        new = DEAD + 1100 + round_
        workers[new] = both(new, round_)
        alive.add(new)
        check()
    assert collector.stats().errors == {}


def test_the_fold_equals_a_fold_of_the_files_left_after_any_removals():
    """Many buckets (a tree three levels deep), every reduction, files leaving at random: the
    fold always equals folding what is left from scratch."""
    rnd = random.Random(7)
    files: dict[str, tuple[int, DbName, list[dbfile.Raw], bytes]] = {}
    prefixes = ["counter", "gauge_min", "gauge_max", "gauge_mostrecent", "gauge_all"]
    for i in range(FAN * FAN + 40):
        pid = 1000 + i * BUCKET  # one bucket each
        for prefix in prefixes:
            typ, _, mode = prefix.partition("_")
            db = DbName(prefix, typ, mode, str(pid))
            raw = [
                (f'["m_{typ}", "m_{typ}", {{"k": "{k}"}}, "h"]', rnd.randint(-8, 8) / 4, i % 13)
                for k in "ab"
            ]
            files[f"{prefix}_{pid}.db"] = (pid, db, raw, repr(raw).encode())

    def reread(name: str, folded: deadfiles.Folded) -> tuple[list[dbfile.Raw], int] | None:
        pid, db, raw, data = files[name]
        return raw, deadfiles.fingerprint(data)

    fold = DeadFold(reread)
    for name, (pid, db, raw, data) in files.items():
        fold.add(name, pid, db, raw, data, 1)

    def expected() -> dict:
        accs: dict = {}
        for _pid, db, raw, _ in files.values():
            dbfile.fold(
                accs.setdefault(db.prefix, {}), deadfiles.DEAD_FOLD[db.prefix], db.ident, raw
            )
        return {p: {k: v[0] for k, v in acc.items()} for p, acc in accs.items()}

    def got() -> dict:
        return {db.prefix: {e.key: e.value for e in entries} for db, entries in fold.entries()}

    assert got() == expected()
    for _ in range(5):
        leaving = rnd.sample(sorted(files), 60)
        for name in leaving:
            del files[name]
        assert fold.discard(leaving) == []
        assert got() == expected()


def test_the_sidecar_serves_a_dead_workers_file_that_appears_later(shared_dir, make_exporter):
    """End to end: the directory read at start, then a file no hook recorded, at the next
    scrape; /-/ready never says the read is under way once it is done."""
    dead_workers(shared_dir, DEAD, 30)
    e = make_exporter()

    def app(samples: dict) -> dict:
        return {k: v for k, v in samples.items() if k[0].startswith("app_")}

    assert app(e.scrape()) == app(parse("\n".join(stock(shared_dir)) + "\n"))
    assert b"reading the app's metric files" not in e.get("/-/ready")[1]
    dead_workers(shared_dir, DEAD + 500, 1)
    assert app(e.scrape()) == app(parse("\n".join(stock(shared_dir)) + "\n"))


def test_the_default_collector_shares_the_scrapes_liveness_check(directory: Path):
    """A scrape asks the kernel about each pid once (cache.DirectoryInputs: the masters'
    workers and the app's files alike); the default collector takes the check it is given.
    (It did not: its default check was a wrapper, which the index did not recognise, and each
    scrape made a second kill(0) for every live worker.)"""
    write(directory, os.getpid())
    asked: list[int] = []

    def exists(pid: int) -> bool:
        asked.append(pid)
        return True

    collector = AppMetricsCollector(str(directory), compact=False)
    collector.inputs(exists)
    assert set(asked) == {os.getpid()}  # the caller keeps one answer a pid
    assert exposition(collector) == stock(directory)
