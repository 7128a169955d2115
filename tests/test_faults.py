"""Every fault of the shared directory costs Gunicorn nothing, and recording resumes by itself.

Each test runs a real Gunicorn master, breaks the directory under it the way production does
(removed, full, out of inodes, read-only, tampered with, unsafe, its reader stopped), and
checks the same things: every request answered, the master alive, no traceback or "Bad file
descriptor" in its log, the fault said once, and, once the fault is gone, a fresh exporter
scrape showing every spawn and exit, including the ones that happened during the fault.

Disk-full, inode and read-only cases mount a small tmpfs on `gunicorn-monitor/` (the hooks'
own directory; the demo app's own prometheus_client files stay outside it), so they need root.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from monitor.sidecar.compaction import read_entries
from tests.harness import (
    FAILING_WORKER_HOOK,
    PLAIN_APP,
    ROOT,
    alive,
    exits,
    http_get,
    kill_all,
    value,
    wait_for,
)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs and chowns: needs root")
SPAWNS = "gunicorn_worker_spawns_total"
RECYCLE_EVERY_REQUEST = ("--max-requests", "1", "--max-requests-jitter", "0")


@pytest.fixture
def plain_app(tmp_path) -> dict:
    """make_master keyword arguments that serve PLAIN_APP (pass `app` per worker class)."""
    (tmp_path / "plainapp.py").write_text(PLAIN_APP)
    return {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}


def answered(m, n: int) -> int:
    """How many of n sequential requests got a 200."""
    return sum(http_get(m.url + "/", timeout=20)[0] == 200 for _ in range(n))


def own(m) -> Path:
    return m.dir / "gunicorn-monitor"


def assert_unharmed(m) -> None:
    assert m.proc.poll() is None, "the master must survive"
    out = m.output()
    assert "Bad file descriptor" not in out
    assert "Traceback" not in out


def exits_total(samples: dict) -> float:
    return sum(exits(samples).values())


def all_counted(e, m, recycles: int = 0) -> bool:
    """Every spawn and exit Gunicorn logged is counted, none twice, and at least `recycles`
    exits (the ones the test caused during its fault)."""
    samples = e.scrape()
    out = m.output()
    spawned, exited = out.count("Booting worker with pid"), out.count("event=worker_exit")
    done = exits_total(samples)
    return done == exited >= recycles and value(samples, SPAWNS) == spawned


def remove(path: Path) -> None:
    """`rm -rf`, again while workers create files in it as it goes (ENOTEMPTY)."""
    for _ in range(20):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
    raise AssertionError(f"{path} could not be removed")


def fill(directory: Path) -> None:
    """Every byte of the filesystem taken, by one file (what `dd if=/dev/zero` does)."""
    fd = os.open(directory / "fill", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 512):  # then whatever a partial page left
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


# -- the directory removed -----------------------------------------------------------------


@pytest.mark.parametrize("worker", ["sync", "gthread", "uvicorn"])
def test_removing_the_directory_costs_no_request_and_recording_resumes(
    worker, make_master, make_exporter, plain_app
):
    # The reported crash: the journal closed an fd, failed to reopen it, kept the number, and
    # closed it again once Gunicorn had reused it for a worker's heartbeat file (EBADF).
    # Workers are replaced all along: by max_requests, or for UvicornWorker (which may drop a
    # connection that reaches a worker stopping at its own request limit) by a kill between
    # requests.
    workers = 4 if worker == "sync" else 2
    uvicorn = worker == "uvicorn"
    m = make_master(
        worker=worker,
        workers=workers,
        args=() if uvicorn else ("--max-requests", "5", "--max-requests-jitter", "0"),
        app="plainapp:asgi_app" if uvicorn else "plainapp:app",
        env=plain_app,
    ).start()

    def serve(n: int) -> int:
        ok = 0
        for _ in range(n // 5):
            ok += answered(m, 5)
            if uvicorn:
                m.kill_a_worker(workers)
        return ok

    assert serve(20) == 20
    remove(m.dir)
    assert serve(20) == 20
    # Recreated by the hooks on their next event, private.
    wait_for(lambda: (own(m) / f"master-{m.pid}.json").exists(), 10, "the directory recreated")
    assert own(m).stat().st_mode & 0o777 == 0o700
    e = make_exporter()
    spawned = value(e.scrape(), SPAWNS)
    assert spawned > workers  # the counts from before the removal are back, whole
    assert serve(20) == 20
    wait_for(lambda: value(e.scrape(), SPAWNS) > spawned, 15, "spawns counted again")
    assert_unharmed(m)
    wait_for(lambda: "event=directory_recovered fault=missing" in m.output(), 10, "recovered")
    out = m.output()
    assert out.count("event=directory_fault fault=missing") == 1
    assert out.count("event=directory_recovered fault=missing") == 1
    assert value(e.scrape(), "gunicorn_monitor_directory_faults_total", fault="missing") == 1


def _lifecycle(samples: dict) -> dict:
    """The counts the hooks write (counters and histograms): what must never go down."""
    skip = ("gunicorn_exporter_", "gunicorn_worker_exit_memory", "gunicorn_worker_cpu")
    return {
        k: v
        for k, v in samples.items()
        if k[0].startswith("gunicorn_")
        and not k[0].startswith(skip)
        and "_total" in k[0]
        or k[0].startswith(("gunicorn_worker_lifetime", "gunicorn_worker_boot"))
    }


def test_a_scrape_while_the_directory_is_removed_never_lowers_a_count(make_master, make_exporter):
    # The churn's finding: a scrape between `rm -rf` and the masters writing their files again
    # served every count at 0 (or only the masters that had written theirs), and
    # gunicorn_up 0: Prometheus reads a reset, and increase() invents every exit again.
    m = make_master(workers=2).start()
    e = make_exporter()
    m.kill_a_worker(2)
    wait_for(lambda: exits(e.scrape()) == {("killed", "SIGKILL"): 1.0}, 15, "the exit")
    before = _lifecycle(e.scrape())

    def not_lower(samples: dict) -> bool:
        return all(samples.get(k, v) >= v for k, v in before.items())

    def up(samples: dict) -> float | None:
        return samples.get(("gunicorn_up", ()))  # None: left out

    m.signal(signal.SIGSTOP)  # it cannot write them again until it resumes
    try:
        remove(m.dir)
        gone = e.scrape()  # no directory at all: a gap
        assert not_lower(gone) and up(gone) is None  # it may be up: never a wrong 0
        # Nobody wrote it again within STALL_SECONDS: no master is working there.
        wait_for(lambda: up(e.scrape()) == 0, 30, "up 0 at last")
        own(m).mkdir(parents=True, mode=0o700)  # back, empty: only its files are missing
        empty = e.scrape()
        assert _lifecycle(empty) == before  # the values read last, not zeros
    finally:
        m.signal(signal.SIGCONT)
    m.kill_a_worker(2)
    wait_for(lambda: exits(e.scrape()) == {("killed", "SIGKILL"): 2.0}, 15, "counted again")
    wait_for(lambda: up(e.scrape()) == 1, 15, "up, judged after it resumed")
    assert not_lower(e.scrape())
    assert_unharmed(m)


def test_after_a_removal_a_master_writes_its_counts_only_under_its_lock_there(make_master):
    # The churn's other finding: a master whose directory was removed kept the lock on the old
    # heartbeat file and wrote its counts into the new directory at its next event, without
    # the lock there; the sidecar's retirement, taking that lock, found counts and no state
    # file (the master writes it at the end of its loop turn), folded them into retired.json
    # as a dead master's and removed them; the master wrote them whole again: counted twice.
    m = make_master(workers=2).start()
    m.kill_a_worker(2)
    m.signal(signal.SIGSTOP)
    try:
        remove(m.dir)
        beats = own(m) / "heartbeat"
        beats.mkdir(parents=True)
        for path in (m.dir, own(m), beats):
            path.chmod(0o700)
        held = os.open(beats / str(m.pid), os.O_RDONLY | os.O_CREAT, 0o600)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a retirement takes it
        # An exit waiting for the master when it resumes: its first event there, before the
        # end of the loop turn that beats.
        victim = m.live_children()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not alive(victim), 10, "the worker dead")
    finally:
        m.signal(signal.SIGCONT)
    try:
        wait_for(lambda: "event=counts_waiting" in m.output(), 15, "the master waiting")
        m.wait_workers(2, exclude={victim})  # the exit was handled, and the spawn after it
        assert not list(own(m).glob(f"*_{m.pid}.db"))  # nothing written under our lock
    finally:
        os.close(held)
    counter = own(m) / f"counter_{m.pid}.db"
    wait_for(counter.exists, 15, "its counts written once the lock is free")
    done = {
        dict(e.labels)["cause"]: e.value
        for e in read_entries(str(counter))
        if e.name == "gunicorn_worker_exits_total" and e.value
    }
    assert done == {"killed": 2.0}  # every exit, kept in memory meanwhile
    assert_unharmed(m)


def test_a_hup_and_a_usr2_upgrade_work_with_the_directory_gone(
    make_master, make_exporter, plain_app
):
    m = make_master(workers=2, app="plainapp:app", env=plain_app).start()
    remove(m.dir)
    before = set(psutil.Process(m.pid).children())
    m.signal(signal.SIGHUP)
    wait_for(lambda: not before & set(psutil.Process(m.pid).children()), 20, "reloaded workers")
    old_workers = set(m.worker_pids())
    m.signal(signal.SIGUSR2)

    def new_master() -> int | None:
        for child in psutil.Process(m.pid).children():
            if child.pid not in old_workers and (own(m) / f"master-{child.pid}.json").exists():
                return child.pid
        return None

    new_pid = wait_for(new_master, 20, "the new master, recording")
    try:
        m.signal(signal.SIGTERM)  # the old master goes; the new one serves on the same socket
        assert m.wait_exit(20) == 0
        assert answered(m, 5) == 5
        out = m.output()
        assert "Traceback" not in out and "Bad file descriptor" not in out
        assert value(make_exporter().scrape(), "gunicorn_master_reloads_total") == 2
    finally:
        kill_all([new_pid, *(p.pid for p in psutil.Process(new_pid).children())])


# -- a full disk, no inodes, read-only -------------------------------------------------------


@root_only
def test_a_full_disk_costs_no_request_and_no_count(make_master, make_exporter, mount):
    # The reported crash: prometheus_client grows its files sparse and stores through mmap;
    # on a full disk that store is SIGBUS, and the master died without a log line.
    m = make_master(workers=2, args=RECYCLE_EVERY_REQUEST)
    mount(own(m), "size=1m,mode=0700")
    m.start(wait=False)  # no request yet: no worker has exited, the lifetime file is not there
    m.wait_workers(2)
    fill(own(m))
    # The first workers' files (the timeout forensics' per-worker table) go with them and free
    # a little space, which the master really may use for a moment: top the disk up again.
    assert answered(m, 4) == 4
    fill(own(m))
    wait_for(lambda: "event=directory_fault fault=no_space" in m.output(), 10, "the fault said")
    said = len(m.output())
    n = 60
    assert answered(m, n) == n
    assert_unharmed(m)
    during = m.output()[said:]
    assert "fault=no_space" not in during  # said once, and quiet while it lasts
    (own(m) / "fill").unlink()
    e = make_exporter()
    # Every spawn and exit of the fault is there: the counts were kept in memory.
    wait_for(lambda: all_counted(e, m, n + 4), 15, "every spawn and exit counted")
    wait_for(lambda: "directory_recovered fault=no_space" in m.output()[said:], 10, "recovered")
    assert m.output()[said:].count("event=directory_recovered fault=no_space") == 1
    faults = value(e.scrape(), "gunicorn_monitor_directory_faults_total", fault="no_space")
    assert faults == m.output().count("event=directory_fault fault=no_space")


@root_only
def test_running_out_of_inodes_costs_no_request_and_no_count(make_master, make_exporter, mount):
    m = make_master(workers=2, args=RECYCLE_EVERY_REQUEST)
    mount(own(m), "size=4m,nr_inodes=64,mode=0700")
    m.start()
    extra = own(m) / "inodes"
    extra.mkdir()
    taken = 0
    while True:
        try:
            (extra / str(taken)).touch()
            taken += 1
        except OSError as e:
            assert e.errno == errno.ENOSPC
            break
    n = 30
    assert answered(m, n) == n
    assert_unharmed(m)
    wait_for(lambda: "fault=no_inodes" in m.output(), 10, "the fault said")
    shutil.rmtree(extra)
    e = make_exporter()
    wait_for(lambda: all_counted(e, m, n), 15, "every spawn and exit counted")
    wait_for(lambda: "event=directory_recovered fault=no_inodes" in m.output(), 10, "recovered")
    assert m.output().count("event=directory_fault fault=no_inodes") == 1


@root_only
def test_a_read_only_directory_costs_no_request_and_a_hup_still_reloads(
    make_master, make_exporter, mount
):
    m = make_master(workers=2, args=RECYCLE_EVERY_REQUEST).start()
    # A read-only filesystem over the directory (`mount -o remount,ro` of the master's own
    # mount is refused as busy while any worker holds a file open for writing there).
    mount(own(m), "ro,size=64k,mode=0700")
    n = 30
    assert answered(m, n) == n
    before = set(psutil.Process(m.pid).children())
    m.signal(signal.SIGHUP)
    wait_for(
        lambda: not before & set(psutil.Process(m.pid).children()), 20, "every worker reloaded"
    )
    assert answered(m, 5) == 5
    assert_unharmed(m)
    wait_for(lambda: "fault=read_only" in m.output(), 10, "the fault said")
    # Lazily: the master holds the directory's fd (read-only), which keeps a plain umount busy;
    # it finds the path leads elsewhere on its next loop turn, and reopens it.
    subprocess.run(["umount", "-l", str(own(m))], check=True)
    e = make_exporter()
    wait_for(lambda: value(e.scrape(), "gunicorn_master_reloads_total") == 1, 15, "the reload")
    wait_for(lambda: all_counted(e, m, n + 5), 15, "every spawn and exit counted")
    out = m.output()
    assert out.count("event=directory_fault fault=read_only") == 1
    wait_for(lambda: "event=directory_recovered fault=read_only" in m.output(), 10, "recovered")
    assert_unharmed(m)


# -- files tampered with ---------------------------------------------------------------------


def test_garbage_in_place_of_a_count_file_is_never_adopted(make_master, make_exporter):
    m = make_master(workers=2, args=RECYCLE_EVERY_REQUEST).start()
    assert answered(m, 10) == 10
    counter = own(m) / f"counter_{m.pid}.db"
    garbage = own(m) / "garbage"
    garbage.write_bytes(b"\xff" * 8 + os.urandom(4096))
    garbage.rename(counter)
    assert answered(m, 10) == 10
    # Rewritten whole from the master's counts, within a turn of its loop.
    wait_for(lambda: _readable(counter), 10, "the file rewritten")
    e = make_exporter()
    wait_for(lambda: all_counted(e, m, 20), 15, "every spawn and exit counted")
    assert_unharmed(m)
    assert "event=directory_fault fault=replaced" in m.output()


@root_only
def test_a_symlink_or_fifo_in_place_of_a_file_is_never_written_through(make_master, make_exporter):
    m = make_master(workers=2, args=RECYCLE_EVERY_REQUEST).start()
    victim = m.dir.parent / "victim"
    victim.write_bytes(b"precious\n")
    victim.chmod(0o600)
    counter = own(m) / f"counter_{m.pid}.db"
    journal = own(m) / "events.jsonl"
    for path in (counter, journal):
        path.unlink()
        path.symlink_to(victim)
    deploy = own(m) / f"gauge_max_{m.pid}.db"
    deploy.unlink()
    os.mkfifo(deploy)  # opening a FIFO nobody reads would hang: never opened that way
    assert answered(m, 10) == 10
    wait_for(lambda: not counter.is_symlink() and _readable(counter), 10, "the file rewritten")
    wait_for(lambda: deploy.is_file() and _readable(deploy), 10, "the FIFO replaced")
    assert victim.read_bytes() == b"precious\n"
    assert not journal.is_symlink()
    e = make_exporter()
    wait_for(lambda: all_counted(e, m, 10), 15, "every spawn and exit counted")
    assert_unharmed(m)


def _readable(path: Path) -> bool:
    try:
        read_entries(str(path))
        return True
    except Exception:
        return False


# -- workers and the master's files --------------------------------------------------------


def test_a_failing_worker_hook_never_writes_the_masters_files(make_master, make_exporter):
    # Workers inherit the master's recorder at fork; a contained failure in a worker used to
    # be counted through the inherited mmap, into the master's file ("bad len ... at 544").
    m = make_master(
        workers=2,
        args=("--max-requests", "2", "--max-requests-jitter", "0"),
        user_hooks=FAILING_WORKER_HOOK,
    ).start()
    assert answered(m, 20) == 20
    e = make_exporter()
    wait_for(lambda: value(e.scrape(), SPAWNS) >= 10, 15, "the recycles")
    for path in own(m).glob("*.db"):
        read_entries(str(path))  # BadFile if a worker wrote into it
    samples = e.scrape()
    assert value(samples, "gunicorn_monitor_hook_errors_total", hook="post_worker_init") == 0
    assert value(samples, "gunicorn_exporter_files_skipped_total") == 0
    assert "event=hook_failed hook=post_worker_init" in m.output()  # said, in the worker
    assert_unharmed(m)


# -- trust -------------------------------------------------------------------------------------


@root_only
def test_another_users_directory_is_refused_at_start(tmp_path, make_master):
    # The reported hole: a directory another user made 0777, with the journal a symlink to a
    # file of ours; the master appended its JSON lines to that file.
    shared = tmp_path / "shared"
    (shared / "gunicorn-monitor").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    victim.chmod(0o600)
    (shared / "gunicorn-monitor" / "events.jsonl").symlink_to(victim)
    for path in (shared, shared / "gunicorn-monitor"):
        os.chown(path, 65534, 65534)
        path.chmod(0o777)
    m = make_master(shared_dir=shared, workers=1, log_path=tmp_path / "g.log").start(wait=False)
    assert m.wait_exit(20) == 2
    lines = [ln for ln in m.output().splitlines() if ln.strip()]
    assert len(lines) == 1 and "owned by uid 65534" in lines[0], lines
    assert victim.read_bytes() == b"precious\n"


def test_a_symlinked_directory_is_refused_at_start(tmp_path, make_master):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    m = make_master(shared_dir=link, workers=1, log_path=tmp_path / "g.log").start(wait=False)
    assert m.wait_exit(20) == 2
    (line,) = [ln for ln in m.output().splitlines() if ln.strip()]
    assert "is a symlink" in line
    assert not (real / "gunicorn-monitor").exists()


@root_only
def test_a_directory_made_unsafe_under_a_running_master_is_left_alone(
    tmp_path, make_master, make_exporter
):
    m = make_master(workers=2, args=RECYCLE_EVERY_REQUEST).start()
    assert answered(m, 5) == 5
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    victim.chmod(0o600)
    own(m).chmod(0o777)
    (own(m) / "events.jsonl").rename(own(m) / "events.jsonl.1")
    (own(m) / "events.jsonl").symlink_to(victim)
    assert answered(m, 10) == 10
    wait_for(lambda: "fault=unsafe" in m.output(), 10, "the refusal said")
    assert victim.read_bytes() == b"precious\n"
    assert m.output().count("event=directory_fault fault=unsafe") == 1
    own(m).chmod(0o700)  # fixed: recording resumes, every count intact
    e = make_exporter()
    wait_for(lambda: all_counted(e, m, 15), 15, "every spawn and exit counted")
    assert victim.read_bytes() == b"precious\n"
    wait_for(lambda: "event=directory_recovered fault=unsafe" in m.output(), 10, "recovered")
    assert_unharmed(m)


# -- the sidecar -------------------------------------------------------------------------------


def test_a_stopped_sidecar_changes_nothing_for_gunicorn(make_master, make_exporter):
    m = make_master(workers=2, args=RECYCLE_EVERY_REQUEST).start()
    e = make_exporter()
    e.scrape()
    os.kill(e.proc.pid, signal.SIGSTOP)
    try:
        assert answered(m, 20) == 20
        old = set(m.worker_pids())
        m.signal(signal.SIGHUP)
        wait_for(lambda: len(set(m.worker_pids()) - old) == 2, 20, "reloaded while it is stopped")
        assert answered(m, 5) == 5
    finally:
        os.kill(e.proc.pid, signal.SIGCONT)
    assert_unharmed(m)
    wait_for(lambda: value(e.scrape(), "gunicorn_master_reloads_total") == 1, 15, "all recorded")
    wait_for(lambda: all_counted(e, m, 25), 15, "every spawn and exit counted")


@root_only
def test_on_a_full_disk_the_series_a_file_has_stay_current(tmp_path, mount):
    from monitor.contract import directory, metrics, store

    mount(tmp_path / "d", "size=64k,mode=0700")
    layout = directory.create(str(tmp_path / "d"))
    fd = directory.open_private(layout)
    try:
        s = store.Store("1")
        s.declare(metrics.WORKER_SPAWNS)
        s.write(fd)
        fill(Path(layout.own))
        s.inc(metrics.WORKER_SPAWNS, 3)
        s.inc(metrics.HOOK_ERRORS, hook="child_exit")  # a new series: the file must grow
        with pytest.raises(OSError) as raised:
            s.write(fd)
        assert raised.value.errno == errno.ENOSPC
        counter = Path(layout.own) / "counter_1.db"
        assert _spawns(counter) == 3  # written in place, where no new space is needed
        os.unlink(Path(layout.own) / "fill")
        s.write(fd)
        names = {e.name for e in read_entries(str(counter))}
        assert _spawns(counter) == 3 and "gunicorn_monitor_hook_errors_total" in names
    finally:
        os.close(fd)


# -- crashes at any instruction ----------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.3, 0.7, 1.1])
def test_a_master_killed_mid_recycling_leaves_whole_counts(make_master, delay):
    import threading

    m = make_master(workers=2, args=RECYCLE_EVERY_REQUEST).start()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            http_get(m.url + "/", timeout=2)

    t = threading.Thread(target=load)
    t.start()
    try:
        wait_for(lambda: m.output().count("event=worker_exit") >= 3, 10, "recycling")
        time.sleep(delay)  # a moment in a storm of exits and spawns, not a condition
        m.kill()  # SIGKILL: the master and its workers, wherever they are
    finally:
        stop.set()
        t.join(10)
    out = m.output()
    entries = read_entries(str(own(m) / f"counter_{m.pid}.db"))  # whole, or BadFile
    exited = sum(e.value for e in entries if e.name == "gunicorn_worker_exits_total")
    spawned = sum(e.value for e in entries if e.name == SPAWNS)
    # The log line of an exit comes just before its write: at most that one is missing.
    assert out.count("event=worker_exit") - 1 <= exited <= out.count("event=worker_exit")
    assert spawned <= out.count("Booting worker with pid") + 1
    assert spawned >= exited + 2 - 1


CRASHING_WRITER = """
import os, signal, sys
from monitor.contract import directory, metrics, store
root, point, nth, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
seen = {}
def hook(step):
    seen[step] = seen.get(step, 0) + 1
    if step == point and seen[step] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
store._crash_hook = hook
layout = directory.create(root)
fd = directory.open_private(layout)
s = store.Store("7")
s.load(fd)
for i in range(n):
    s.inc(metrics.WORKER_SPAWNS)
    if i % 3 == 0:  # a new series: the whole file is rewritten
        s.inc(metrics.WORKER_EXITS, cause="crash", signal=f"SIG{i}")
    s.write(fd)
    print(i, flush=True)  # committed
"""

CRASH_POINTS = [("allocated", 1), ("allocated", 2), ("written", 1), ("written", 3)]
CRASH_POINTS += [("renamed", 1), ("renamed", 2), ("slot", 1), ("slot", 4)]


def _spawns(path: Path) -> float:
    entries = read_entries(str(path))  # BadFile for anything torn
    return sum(e.value for e in entries if e.name == SPAWNS)


@pytest.mark.parametrize("point", CRASH_POINTS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_a_writer_killed_at_any_step_loses_and_doubles_nothing(tmp_path, point):
    step, nth = point
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-c", CRASHING_WRITER, str(tmp_path)]
    crashed = subprocess.run([*run, step, str(nth), "10"], env=env, capture_output=True, text=True)
    assert crashed.returncode == -signal.SIGKILL, f"never reached {point}: {crashed.stderr}"
    committed = len(crashed.stdout.split())
    counter = tmp_path / "gunicorn-monitor" / "counter_7.db"
    found = _spawns(counter) if counter.exists() else 0.0
    # What was committed is there; the write in flight is there whole, or not at all.
    assert found in (committed, committed + 1)
    # A new writer of the same name (a reused pid) continues the file, adding exactly its own.
    again = subprocess.run([*run, "never", "0", "5"], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert _spawns(counter) == found + 5
    assert sorted(p.name for p in counter.parent.glob("*.db")) == ["counter_7.db"]
    assert not list(counter.parent.glob(".*.tmp"))  # the dead writer's temporary file is gone


def test_killed_writers_at_random_moments_never_tear_a_file(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-c", CRASHING_WRITER, str(tmp_path), "never", "0", "100000"]
    counter = tmp_path / "gunicorn-monitor" / "counter_7.db"
    total = 0.0
    for delay in (0.15, 0.2, 0.25, 0.3, 0.35):
        proc = subprocess.Popen(run, env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline()  # writing
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
        committed = len(proc.stdout.read().split()) + 1
        proc.wait(10)
        proc.stdout.close()
        found = _spawns(counter)
        assert total + committed <= found <= total + committed + 1
        total = found
