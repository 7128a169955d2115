"""Dead masters' files are retired: their counts folded into retired.json, the files removed,
and the directory stops growing, without a count lost or doubled, whoever reads meanwhile.

Files are written by the contract's own writers (store.Store, state.write) as a master leaves
them; "accounted for" masters are those whose state file says `stopped` (a clean exit, or the
master that counted their orphans said so), as contract/state.py defines it. Real masters are
started and killed where that is the scenario.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor.contract import directory
from monitor.contract.directory import Layout
from monitor.hooks import beat
from monitor.sidecar import retirement
from monitor.sidecar.collectors.lifecycle import LifecycleCollector
from tests.harness import ROOT, exits, gone_masters, value, wait_for, write_master

GONE = 1_000_000  # pids from here on: no process has one (above any pid_max this runs under)


DERIVED = ("gunicorn_up", "gunicorn_workers", "gunicorn_master_heartbeat")  # not counts


def collected(collector: LifecycleCollector) -> dict:
    """The counts a collection serves: every sample but the masters' gauges."""
    out = {}
    for family in collector.collect():
        for s in family.samples:
            if not s.name.startswith(DERIVED):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def served(layout: Layout) -> dict:
    """The counts a fresh collector serves, read in memory (it retires nothing)."""
    return collected(LifecycleCollector(layout))


@contextlib.contextmanager
def heartbeat_dir(layout: Layout) -> Iterator[int]:
    own = directory.open_private(layout)
    try:
        hb = directory.open_heartbeats(own, layout, create=True)
    finally:
        os.close(own)
    try:
        yield hb
    finally:
        os.close(hb)


def names(layout: Layout) -> set[str]:
    return set(os.listdir(layout.own))


def heartbeats(layout: Layout) -> set[str]:
    return set(os.listdir(layout.heartbeats)) if os.path.isdir(layout.heartbeats) else set()


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return directory.create(str(tmp_path / "multiproc"))


def test_masters_accounted_for_are_folded_once_and_their_files_removed(layout):
    live = os.getpid()  # this process, as a live master: its state does not say stopped
    write_master(layout, live, spawns=2, stopped=False)
    for i in range(300):
        write_master(layout, GONE + i, spawns=1, crashes=i % 3)
    before = served(layout)
    assert value(before, "gunicorn_worker_spawns_total") == 302
    assert exits(before) == {("crash", "none"): 300.0}

    report = retirement.retire(layout)
    assert (report.folded, report.unreadable) == (800, 0)  # 100 crashed nothing: no histogram
    assert served(layout) == before  # not one sample moved
    assert names(layout) == {
        f"counter_{live}.db",
        f"gauge_max_{live}.db",
        f"master-{live}.json",
        retirement.AGGREGATE,
        retirement.LOCK,
        directory.HEARTBEATS,
    }
    assert heartbeats(layout) == set()

    write_master(layout, GONE + 300, spawns=5)  # another master came and went
    before = served(layout)
    assert retirement.retire(layout).folded == 2  # no crash: no histogram
    assert served(layout) == before
    assert value(before, "gunicorn_worker_spawns_total") == 307
    assert len(names(layout)) == 6  # however many masters came and went


def test_a_master_not_accounted_for_or_whose_lock_is_held_keeps_its_files(layout):
    write_master(layout, GONE, stopped=False)  # dead, its orphans still owed
    write_master(layout, GONE + 1)  # accounted for, but someone holds its heartbeat lock
    write_master(layout, GONE + 2)
    Path(layout.own, f"master-{GONE + 2}.json").write_text("{not json")  # says nothing
    write_master(layout, GONE + 3)
    os.unlink(Path(layout.own, f"master-{GONE + 3}.json"))  # no state file: nothing owed
    os.mkdir(layout.heartbeats, 0o700)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
            os.path.join(layout.heartbeats, str(GONE + 1)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        before = served(layout)
        assert retirement.retire(layout).folded == 2  # only GONE + 3's counter and gauge
        assert served(layout) == before
        kept = {n for n in names(layout) if n.endswith((".db", ".json")) and "retired" not in n}
        assert kept == {
            f"{kind}_{pid}.db" for kind in ("counter", "gauge_max") for pid in range(GONE, GONE + 3)
        } | {f"master-{pid}.json" for pid in range(GONE, GONE + 3)}
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert retirement.retire(layout).folded == 2  # let go of: GONE + 1 goes too
    assert f"master-{GONE + 1}.json" not in names(layout)
    assert served(layout) == before


def test_a_new_master_given_the_pid_cannot_adopt_files_being_retired(layout, monkeypatch):
    """A new master takes the heartbeat lock before it adopts its pid's counts file (hooks/
    beat.py): while a retirement folds and removes that file, it finds the lock held and keeps
    its counts in memory; after, it finds nothing to adopt. No count twice."""
    write_master(layout, GONE, spawns=3)
    seen = []

    def new_master_arrives(step: str) -> None:
        if step == "committed":
            with heartbeat_dir(layout) as hb:
                seen.append(beat.lock(hb, str(GONE)))

    monkeypatch.setattr(retirement, "_crash_hook", new_master_arrives)
    retirement.retire(layout)
    assert seen == [None]  # held by the retirement: the new master waits, adopting nothing
    assert not Path(layout.own, f"counter_{GONE}.db").exists()
    assert value(served(layout), "gunicorn_worker_spawns_total") == 3


CRASHING_RETIREMENT = """
import os, signal, sys
from monitor.contract.directory import Layout
from monitor.sidecar import retirement
point = sys.argv[2]
retirement.BATCH = 13
retirement._crash_hook = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == point else None
retirement.retire(Layout(sys.argv[1]))
"""
CRASH_POINTS = ["written", "renamed", "committed", "unlinked-one", "unlinked"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_retirement_killed_at_any_step_loses_and_doubles_nothing(layout, point):
    write_master(layout, os.getpid(), spawns=2, stopped=False)
    for i in range(50):  # four batches of 13 masters
        write_master(layout, GONE + i, spawns=1, crashes=1)
    expected = served(layout)
    for _ in range(2):  # killed, then killed again in the recovery's own pass
        result = subprocess.run(
            [sys.executable, "-c", CRASHING_RETIREMENT, layout.root, point],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=60,
        )
        assert result.returncode == -signal.SIGKILL, f"never reached {point}"
        assert served(layout) == expected  # what a reader sees right after the crash
    retirement.retire(layout)
    assert served(layout) == expected
    assert not [n for n in names(layout) if str(GONE)[:4] in n or n.endswith(".tmp")]
    assert heartbeats(layout) == set()


RETIRING_SLOWLY = """
import sys, time
from monitor.contract.directory import Layout
from monitor.sidecar import retirement
retirement.BATCH = 8
retirement._crash_hook = lambda step: time.sleep(0.03) if step == "committed" else None
retirement.retire(Layout(sys.argv[1]))
"""


def test_a_reader_racing_another_process_retiring_never_sees_a_count_twice_or_missing(layout):
    """Another sidecar retires in 50 commits while this one reads: every read is the whole
    sum, or (retired.json replaced under each of its attempts) no counts at all."""
    write_master(layout, os.getpid(), spawns=1, stopped=False)
    for i in range(400):
        write_master(layout, GONE + i, spawns=1, crashes=1)
    expected = served(layout)
    proc = subprocess.Popen(
        [sys.executable, "-c", RETIRING_SLOWLY, layout.root],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    whole = gaps = 0
    try:
        collector = LifecycleCollector(layout)  # one reader, as a sidecar keeps it
        while proc.poll() is None:
            found = collected(collector)
            assert found in (expected, {})
            whole, gaps = whole + (found == expected), gaps + (found == {})
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert whole > 10 and whole > gaps, (whole, gaps)
    assert served(layout) == expected
    assert len([n for n in names(layout) if n.startswith("counter_")]) == 1


def test_a_sidecar_retires_dead_masters_as_they_are_accounted_for(
    make_master, make_exporter, shared_dir
):
    """Masters killed one after another (a crash loop): each next one counts its predecessor's
    orphans and marks it stopped (hooks/orphans.py); the sidecar then retires its files."""
    e = make_exporter()
    for n in range(1, 4):
        m = make_master(workers=1).start()
        victim = m.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        m.wait_workers(1, exclude={victim})
        wait_for(lambda n=n: exits(e.scrape()).get(("killed", "SIGKILL")) == n, 20, f"exit {n}")
        if n < 3:
            m.kill()  # SIGKILL: a crashed master, its worker left as an orphan
    own = shared_dir / "gunicorn-monitor"

    def retired() -> bool:
        e.scrape()  # a scrape wakes the retirement
        counts = {p.name for p in own.glob("*.db")}
        return counts == {m.file(k).name for k in ("counter", "histogram", "gauge_max")}

    wait_for(retired, 30, "the dead masters' count files retired")
    samples = e.scrape()
    assert value(samples, "gunicorn_worker_spawns_total") == 6  # 2 per master, none lost
    assert exits(samples).get(("killed", "SIGKILL")) == 3
    assert exits(samples).get(("orphaned", "none"), 0) + 3 == sum(exits(samples).values())
    assert (own / retirement.AGGREGATE).exists()
    assert value(make_exporter().scrape(), "gunicorn_worker_spawns_total") == 6  # a restart


def test_thousands_of_dead_masters_at_start_are_served_whole_or_not_at_all(
    shared_dir, make_exporter
):
    layout = Layout(str(shared_dir))
    for i in range(1500):  # more than a collection reads while the retirement runs
        write_master(layout, GONE + i, spawns=1, crashes=1)
    e = make_exporter()
    seen = []

    def whole() -> bool:
        samples = e.scrape()
        seen.append(samples.get(("gunicorn_worker_spawns_total", ())))
        return seen[-1] is not None

    wait_for(whole, 60, "the counts served")
    assert set(seen) <= {None, 1500.0}  # never a partial sum
    assert exits(e.scrape()) == {("crash", "none"): 1500.0}
    wait_for(lambda: len(os.listdir(layout.own)) < 10, 60, "the directory retired")


# The sidecar, its retirement held at its first commit until the test opens the FIFO named by
# $HOLD_RETIREMENT for writing: the backlog is still being read for as long as the test wants.
HELD_RETIREMENT = """
import os, sys
from monitor.sidecar import cli, retirement
hold = os.environ["HOLD_RETIREMENT"]
def held(step):
    if step == "written" and os.path.exists(hold):
        with open(hold) as fifo:
            fifo.read()
        os.unlink(hold)
retirement._crash_hook = held
sys.exit(cli.main(sys.argv[2:]))
"""
COUNTERS = ("gunicorn_worker_spawns_total", "gunicorn_worker_exits_total")


def _pid(name: str) -> int | None:
    """The pid a master's file is named for."""
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits and name.endswith((".db", ".json")) else None


@pytest.mark.timeout(600)  # 17,500 files written and read on a machine shared with other work
def test_a_backlog_of_dead_masters_leaves_counters_out_of_scrapes_never_short(
    shared_dir, make_master, make_exporter, tmp_path
):
    """5,000 dead masters' files at the sidecar's start (benchmarks/growth.py's directory, at a
    tenth of its size), one live master: while their files are being read, scrapes answer with
    gunicorn_up and the exporter's own families and without the lifecycle counters (a gap,
    never a partial sum), and /-/ready says ready and why the counters are missing. Once
    served, no count is ever below the truth, and after the backlog the counts are the truth."""
    layout = Layout(str(shared_dir))
    m = make_master(workers=1).start()
    gone_masters(shared_dir, 5000, first_pid=GONE)
    truth = served(layout)  # every master's counts, read in memory by a fresh collector
    assert value(truth, "gunicorn_worker_spawns_total") > 5000
    hold = tmp_path / "hold"
    os.mkfifo(hold)
    e = make_exporter(
        prefix=(sys.executable, "-c", HELD_RETIREMENT), env={"HOLD_RETIREMENT": str(hold)}
    )
    wait_for(lambda: e.get("/-/ready")[0] == 200, 60, "ready while the backlog is read")
    assert b"reading the files of dead masters" in e.get("/-/ready")[1]
    first = e.scrape()
    assert value(first, "gunicorn_up") == 1
    assert value(first, "gunicorn_workers") == 1
    assert not [k for k in first if k[0].startswith(COUNTERS)], "a counter family during the read"
    assert ("gunicorn_exporter_scrape_duration_seconds", ()) in first

    def release() -> bool:
        try:
            fd = os.open(hold, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:  # ENXIO: the retirement has not reached its first commit yet
            assert err.errno == errno.ENXIO
            return False
        os.close(fd)  # the held commit reads end of file and goes on
        return True

    wait_for(release, 60, "the retirement at its first commit")
    seen = []

    def counted() -> bool:
        samples = e.scrape()
        assert value(samples, "gunicorn_up") == 1
        counts = {k: v for k, v in samples.items() if k in truth}
        if [k for k in samples if k[0].startswith(COUNTERS)]:
            assert counts == truth  # served whole or not at all: never a count below the truth
        seen.append(bool(counts))
        return bool(counts)

    wait_for(counted, 120, "the counts served")

    def dead_files() -> list[str]:
        return [n for n in os.listdir(layout.own) if (p := _pid(n)) is not None and p >= GONE]

    wait_for(lambda: not dead_files(), 120, "the dead masters' files retired")
    assert {k: v for k, v in e.scrape().items() if k in truth} == truth
    assert b"backlog" not in e.get("/-/ready")[1]
    assert m.worker_pids()
    e.kill()
    log = e.proc.stdout.read()
    assert log.count(b"event=backlog_reading") == 1 and log.count(b"event=backlog_read ") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="bind-mounts the directory read-only")
def test_a_sidecar_that_may_not_write_serves_the_same_counts_in_memory(
    shared_dir, make_master, make_exporter, tmp_path
):
    """The sidecar's view of the volume is read-only (a `readOnly` volumeMount): it retires
    nothing, folds the dead masters' files in memory and serves the same counts."""
    layout = Layout(str(shared_dir))
    m = make_master(workers=1).start()
    for i in range(20):
        write_master(layout, GONE + i, spawns=1, crashes=1)
    view = tmp_path / "read-only"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(shared_dir), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        before = names(layout)
        e = make_exporter(shared_dir=view)
        samples = e.scrape()
        assert value(samples, "gunicorn_worker_spawns_total") == 21
        assert exits(samples) == {("crash", "none"): 20.0}
        os.kill(m.worker_pids()[0], signal.SIGKILL)  # its exit still shows, from memory
        wait_for(lambda: exits(e.scrape()).get(("killed", "SIGKILL")) == 1, 20, "the exit")
        assert value(e.scrape(), "gunicorn_worker_spawns_total") == 22
        dead = {n for n in before if str(GONE)[:4] in n}
        assert {n for n in names(layout) if str(GONE)[:4] in n} == dead
        e.kill()
        assert b"not retiring gone masters' files (folded in memory)" in e.proc.stdout.read()
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)


def test_heartbeat_locks_are_the_ones_the_hooks_take(layout):
    """The retirement and the hooks lock the same file the same way (LOCK_EX on heartbeat/<pid>):
    one holder excludes the other."""
    with heartbeat_dir(layout) as hb:
        held = beat.lock(hb, "42")
        assert held is not None
        assert retirement._lock(hb, "42") is None
        os.close(held)
        ours = retirement._lock(hb, "42")
        assert ours is not None and beat.lock(hb, "42") is None
        os.close(ours[0])
