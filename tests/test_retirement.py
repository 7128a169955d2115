"""Gone masters' files are retired: their counts folded into retired.json, the files removed,
and the directory stops growing, without a count lost or doubled, whoever reads meanwhile.

Files are written by the contract's own writers (store.Store, state.write) under the names a
master gives them; "gone" masters are incarnations no process has (their pid with another
start tick), and real masters are started and killed where it is the scenario.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from monitor.contract import directory, incarnation, state
from monitor.contract.directory import Layout
from monitor.sidecar import retirement
from monitor.sidecar.collectors.lifecycle import LifecycleCollector
from tests.harness import ROOT, exits, value, wait_for, write_master

NS = incarnation.namespace()


def later() -> float:
    """The time of a pass run after every state file's grace."""
    return time.time() + retirement.GRACE + 10


def gone_ident(i: int) -> str:
    """An incarnation of this namespace that no process has: start tick 1 (none but the first
    processes of the boot started then) of a pid above what this test will meet."""
    return f"{1_000_000 + i}-1-{NS}"


def retire_settled(layout: Layout) -> retirement.Report:
    """Retirement passes as the sidecar runs them after every grace: the state files go too
    (a second pass, GRACE after the first saw their workers gone)."""
    quiet: dict[str, float] = {}
    report = retirement.retire(layout, now=later(), quiet=quiet)
    again = retirement.retire(layout, now=later() + retirement.GRACE, quiet=quiet)
    report.folded += again.folded
    report.removed += again.removed
    report.waiting = again.waiting
    return report


def served(layout: Layout) -> dict:
    """Every sample the lifecycle collector serves, read in memory (it retires nothing)."""
    out = {}
    for family in LifecycleCollector(layout).collect():
        for s in family.samples:
            if not s.name.startswith(("gunicorn_up", "gunicorn_workers")):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def names(layout: Layout) -> set[str]:
    return set(os.listdir(layout.own))


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return directory.create(str(tmp_path / "multiproc"))


def test_gone_masters_are_folded_once_and_their_files_removed(layout):
    live = str(incarnation.own())  # this process: running
    write_master(layout, live, spawns=2)
    for i in range(300):
        write_master(layout, gone_ident(i), spawns=1, crashes=i % 3)
    before = served(layout)
    assert value(before, "gunicorn_worker_spawns_total") == 302
    assert exits(before) == {("crash", "none"): 300.0}

    report = retire_settled(layout)
    assert (report.folded, report.unreadable, report.waiting) == (800, 0, 0)  # 100 no histogram
    assert served(layout) == before  # not one sample moved
    assert names(layout) == {f"counter_{live}.db", f"gauge_max_{live}.db"} | {
        f"master-{live}.json",
        retirement.AGGREGATE,
        retirement.LOCK,
        directory.NOTES,
    }

    write_master(layout, gone_ident(300), spawns=5)  # another master came and went
    before = served(layout)
    assert retire_settled(layout).folded == 2  # no crash: no histogram
    assert served(layout) == before
    assert value(before, "gunicorn_worker_spawns_total") == 307
    assert len(names(layout)) == 6  # however many masters came and went


def test_files_of_another_namespace_or_a_running_master_are_never_retired(layout):
    own = str(incarnation.own())
    other_ns = f"{1_000_001}-1-{NS + 1}"  # its pid means another process here, or none
    for ident in (own, other_ns):
        write_master(layout, ident)
    before = names(layout)
    assert retirement.retire(layout, now=later()).folded == 0
    assert names(layout) == before | {retirement.LOCK}


def test_files_named_by_an_earlier_version_are_retired_once_this_namespace_is_proven(layout):
    """`counter_<pid>.db`: retired only where a running master of this namespace shows that
    the directory's pids are this reader's."""
    proc = subprocess.Popen(["true"])
    proc.wait()  # a pid no process has now
    write_master(layout, str(proc.pid), spawns=4)
    assert retirement.retire(layout, now=later()).folded == 0  # cannot tell: kept
    write_master(layout, str(incarnation.own()), spawns=1)
    before = served(layout)
    assert retire_settled(layout).folded == 2  # no crash: no histogram
    assert served(layout) == before and value(before, "gunicorn_worker_spawns_total") == 5
    assert f"counter_{proc.pid}.db" not in names(layout)


def test_a_state_file_stays_while_its_orphans_run_and_for_its_grace_after(layout):
    """Whoever counts a dead master's orphans' exits reads them from its state file: the file
    stays while one runs, and GRACE seconds after the retirement first saw none running."""
    ident = gone_ident(0)
    write_master(layout, ident)
    orphan = subprocess.Popen(["sleep", "60"])  # started before the state file's last write
    quiet: dict[str, float] = {}
    try:
        fd = directory.open_private(layout)
        try:
            recorded = {"pid": 1_000_000, "start_time": 1.0, "workers": {str(orphan.pid): {}}}
            state.write(layout, ident, recorded, fd)
        finally:
            os.close(fd)
        name = f"master-{ident}.json"
        assert retirement.retire(layout, quiet=quiet).waiting == 1  # within its grace
        assert retirement.retire(layout, now=later(), quiet=quiet).waiting == 1  # orphan runs
        assert name in names(layout)
    finally:
        orphan.kill()
        orphan.wait()
    now = later()
    assert retirement.retire(layout, now=now, quiet=quiet).waiting == 1  # seen gone just now
    grace = now + retirement.GRACE
    assert retirement.retire(layout, now=grace, quiet=quiet).waiting == 0
    assert name not in names(layout) and quiet == {}


CRASHING_RETIREMENT = """
import os, signal, sys
from monitor.contract.directory import Layout
from monitor.sidecar import retirement
point = sys.argv[2]
retirement.BATCH = 40
retirement._crash_hook = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == point else None
retirement.retire(Layout(sys.argv[1]), now=float(sys.argv[3]))
"""
CRASH_POINTS = ["written", "renamed", "committed", "unlinked-one", "unlinked"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_retirement_killed_at_any_step_loses_and_doubles_nothing(layout, point):
    write_master(layout, str(incarnation.own()), spawns=2)
    for i in range(50):  # 150 files: four batches of 40
        write_master(layout, gone_ident(i), spawns=1, crashes=1)
    expected = served(layout)
    for _ in range(2):  # killed, then killed again in the recovery's own pass
        result = subprocess.run(
            [sys.executable, "-c", CRASHING_RETIREMENT, layout.root, point, str(later())],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=60,
        )
        assert result.returncode == -signal.SIGKILL, f"never reached {point}"
        assert served(layout) == expected  # what a reader sees right after the crash
    retire_settled(layout)
    assert served(layout) == expected
    assert not [n for n in names(layout) if "1-1-" in n or n.endswith(".tmp")]


RETIRING_SLOWLY = """
import sys, time
from monitor.contract.directory import Layout
from monitor.sidecar import retirement
retirement.BATCH = 25
retirement._crash_hook = lambda step: time.sleep(0.03) if step == "committed" else None
retirement.retire(Layout(sys.argv[1]))
"""


def test_a_reader_racing_another_process_retiring_never_sees_a_count_twice_or_missing(layout):
    """Another sidecar retires in 48 commits while this one reads: every read is the whole
    sum, or (retired.json replaced under each of its attempts) no counts at all."""
    write_master(layout, str(incarnation.own()), spawns=1)
    for i in range(400):
        write_master(layout, gone_ident(i), spawns=1, crashes=1)
    expected = served(layout)
    proc = subprocess.Popen(
        [sys.executable, "-c", RETIRING_SLOWLY, layout.root],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    whole = gaps = 0
    try:
        collector = LifecycleCollector(layout)  # one reader, as a sidecar keeps it
        while proc.poll() is None:
            found = {}
            for family in collector.collect():
                for s in family.samples:
                    if not s.name.startswith(("gunicorn_up", "gunicorn_workers")):
                        found[(s.name, tuple(sorted(s.labels.items())))] = s.value
            assert found in (expected, {})
            whole, gaps = whole + (found == expected), gaps + (found == {})
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert whole > 10 and whole > gaps, (whole, gaps)
    assert served(layout) == expected
    assert len([n for n in names(layout) if n.startswith("counter_")]) == 1


def test_a_sidecar_retires_gone_masters_as_they_go_and_the_directory_stays_small(
    make_master, make_exporter, shared_dir
):
    e = make_exporter()
    for n in range(1, 4):
        m = make_master(workers=1).start()
        victim = m.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        m.wait_workers(1, exclude={victim})
        wait_for(lambda n=n: exits(e.scrape()).get(("killed", "SIGKILL")) == n, 20, f"exit {n}")
        if n < 3:
            m.kill()  # SIGKILL: a crashed master, its worker left to notice
    own = shared_dir / "gunicorn-monitor"

    def retired() -> bool:
        counts = {p.name for p in own.glob("*.db")}
        return counts == {m.file(k).name for k in ("counter", "histogram", "gauge_max")}

    wait_for(retired, 20, "the gone masters' count files retired")
    samples = e.scrape()
    assert value(samples, "gunicorn_worker_spawns_total") == 6  # 2 per master, none lost
    assert exits(samples) == {("killed", "SIGKILL"): 3.0}
    assert value(samples, "gunicorn_worker_lifetime_seconds_count", cause="killed") == 3
    assert (own / retirement.AGGREGATE).exists()
    assert value(make_exporter().scrape(), "gunicorn_worker_spawns_total") == 6  # a restart


def test_thousands_of_gone_masters_at_start_are_served_whole_or_not_at_all(
    shared_dir, make_exporter
):
    layout = Layout(str(shared_dir))
    for i in range(1500):  # more than a collection reads while the retirement runs
        write_master(layout, gone_ident(i), spawns=1, crashes=1)
    write_master(layout, str(incarnation.own()), spawns=1)  # proves the namespace
    e = make_exporter()
    seen = []

    def whole() -> bool:
        samples = e.scrape()
        seen.append(samples.get(("gunicorn_worker_spawns_total", ())))
        return seen[-1] is not None

    wait_for(whole, 60, "the counts served")
    assert set(seen) == {None, 1501.0} or set(seen) == {1501.0}  # never a partial sum
    samples = e.scrape()
    assert exits(samples) == {("crash", "none"): 1500.0}
    # The count files go at once; the state files after their grace (test above).
    wait_for(lambda: len(list(Path(layout.own).glob("*.db"))) == 2, 60, "the counts retired")


@pytest.mark.skipif(os.geteuid() != 0, reason="bind-mounts the directory read-only")
def test_a_sidecar_that_may_not_write_serves_the_same_counts_in_memory(
    shared_dir, make_master, make_exporter, tmp_path
):
    """The sidecar's view of the volume is read-only (a `readOnly` volumeMount): it retires
    nothing, folds the gone masters' files in memory and serves the same counts."""
    layout = Layout(str(shared_dir))
    m = make_master(workers=1).start()
    for i in range(20):
        write_master(layout, gone_ident(i), spawns=1, crashes=1)
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
        assert {n for n in names(layout) if "-1-" in n} == {n for n in before if "-1-" in n}
        e.kill()
        assert b"not retiring gone masters' files (folded in memory)" in e.proc.stdout.read()
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)
