"""A hostile neighbour in the pod: nothing outside the monitor's own files is ever touched.

The setting is exactly a Kubernetes emptyDir: Gunicorn runs as root, and the shared directory
is root's and mode 0777 with no sticky bit, so any other local user may rename
`gunicorn-monitor/` away and put their own directory, or a symlink, in its place. Theirs holds
symlinks where the monitor's subdirectories and files go (`live/<pid>.inflight` and
`.stacks` for the next pids, `captures/`, `heartbeat/`, and `.compacting/` at the top),
pointing at root's files elsewhere. The attack is made by a real process of another user
(`setpriv --reuid 65534`) while Gunicorn serves, reloads, times a request out and boots a
worker that hangs; then that user undoes it.

Each test checks what such a user must never get: a file outside the monitor's own written,
truncated, chmodded, created or unlinked (sizes, times, modes and the listing of every
sentinel), a request unanswered, a worker that cannot boot (the reported failure: a root file
truncated from 1,520 bytes to 0 through the capture files, then every worker spawned after it
dead of SIGBUS and 0 of 10 requests answered). And what the operator must get: the refusal
said once and counted, and recording and captures back by themselves once it is sane again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from monitor.contract import captures, metrics, state
from monitor.contract import heartbeat as heartbeat_file
from monitor.contract.directory import Layout, UnsafeDirectory
from monitor.sidecar import compaction
from tests.harness import (
    BIN,
    PLAIN_APP,
    ROOT,
    exits,
    http_get,
    kill_all,
    value,
    wait_for,
    write_multiprocess_file,
)

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="runs Gunicorn as root, a neighbour as 65534"),
]

NOBODY = 65534
VICTIM_BYTES = 1520  # the reported victim's size

# The app: answers, sleeps past the timeout on /sleep, and hangs while importing for as long
# as the file HOSTILE_HANG names exists (a start-up waiting on a database), an hour at most.
# No prometheus_client of its own: the app's own library is the app's business (README).
APP = (
    """
import asyncio, os, time

_HANG = os.environ.get("HOSTILE_HANG", "")


def _hang_while_told():
    deadline = time.monotonic() + 3600
    while _HANG and os.path.exists(_HANG) and time.monotonic() < deadline:
        time.sleep(0.05)


_hang_while_told()


def _sleep(seconds):
    time.sleep(seconds)

"""
    + PLAIN_APP
    + """

_plain = app


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/sleep":
        _sleep(30)
    return _plain(environ, start_response)
"""
)

# The neighbour, run as uid 65534 by setpriv. It takes `gunicorn-monitor/` and `.compacting/`
# away (renames in the 0777 top), puts its own in their place (a directory of its own, or a
# symlink to one), and keeps symlinks to root's files ahead of the pids the kernel hands out,
# until the stop file appears; then it puts everything back as it was and exits.
NEIGHBOUR = r"""
import os, shutil, sys, time

top, how, victim, victim_dir, stop = sys.argv[1:6]
own = os.path.join(top, "gunicorn-monitor")
theirs = os.path.join(top, ".theirs")
fake = own if how == "dir" else theirs
compacting = os.path.join(top, ".compacting")
stolen = 0


def steal(path, name):
    # Renamed away: the first to `name` (put back at the end), one the monitor made anew
    # meanwhile to `name-N`. The callers retry until theirs is in its place: a real neighbour
    # races the monitor's recreation too.
    global stolen
    try:
        os.rename(path, os.path.join(top, name if not stolen else f"{name}-{stolen}"))
        stolen += 1
    except FileNotFoundError:
        pass


# Theirs, built aside first: a directory anyone may write, live/ for the symlinks ahead of the
# pids, and captures/ and heartbeat/ as symlinks to root's files.
os.mkdir(theirs)
os.chmod(theirs, 0o777)
live = os.path.join(theirs, "live")
os.mkdir(live)
os.chmod(live, 0o777)
for name in ("captures", "heartbeat"):
    os.symlink(victim_dir, os.path.join(theirs, name))
for _ in range(1000):
    steal(own, ".stolen")
    try:
        if how == "dir":
            os.rename(theirs, own)  # fails on a non-empty directory the monitor just made
        else:
            os.symlink(theirs, own)
        break
    except OSError:
        continue
live = os.path.join(fake, "live")
stolen = 0
for _ in range(1000):
    steal(compacting, ".compacting-stolen")
    try:
        os.symlink(victim_dir, compacting)
        break
    except FileExistsError:
        continue


def ahead():
    with open("/proc/sys/kernel/ns_last_pid") as f:
        last = int(f.read())
    for pid in range(last + 1, last + 300):
        for suffix in (".inflight", ".stacks"):
            try:
                os.symlink(victim, os.path.join(live, f"{pid}{suffix}"))
            except FileExistsError:
                pass


ahead()
print("ready", flush=True)
while not os.path.exists(stop):
    ahead()
    time.sleep(0.02)
if how == "symlink":
    os.unlink(own)
shutil.rmtree(fake)
os.unlink(compacting)
for stolen, name in ((".stolen", own), (".compacting-stolen", compacting)):
    try:  # the master may have made a new one already: then that one stays
        os.rename(os.path.join(top, stolen), name)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(os.path.join(top, stolen), ignore_errors=True)
print("undone", flush=True)
"""


class Pod:
    """A root-owned base (0711: others may pass, not list), holding the emptyDir-like shared
    directory (root's, 0777), root's sentinel files the neighbour will aim at, the app, and
    Gunicorn's log."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="gm-hostile-", dir="/tmp"))
        self.base.chmod(0o711)
        self.top = self.base / "pod"
        self.top.mkdir()
        self.top.chmod(0o777)
        self.victims = self.base / "victims"
        self.victims.mkdir(mode=0o755)
        self.victim = self.victims / "victim"
        self.victim.write_bytes(os.urandom(VICTIM_BYTES))
        self.victim.chmod(0o644)
        self.victim_dir = self.victims / "dir"
        self.victim_dir.mkdir(mode=0o755)
        # What a writer that follows the symlinks would remove or overwrite there: captures
        # (the oldest are dropped past 100), files of pids that no longer run, heartbeats.
        for i in range(captures.MAX_COUNT):
            (self.victim_dir / captures.name(1000.0 + i, 1)).write_text("{}")
        for name in ("passwd", "1.inflight", "1.stacks", "1", "staged"):
            (self.victim_dir / name).write_text("precious\n")
        for path in self.victim_dir.iterdir():
            path.chmod(0o600)
        self.hang = self.base / "hang"
        self.stop = self.base / "stop"
        (self.base / "app").mkdir(mode=0o755)
        (self.base / "app" / "hostileapp.py").write_text(APP)

    def sentinels(self) -> dict[str, tuple]:
        """Everything outside the monitor's own: each entry's type, mode, owner, size, times
        and inode, the victims' directories included (an entry created or removed there
        changes the directory's own times)."""
        found = {}
        for path in [self.victims, *sorted(self.victims.rglob("*"))]:
            st = path.lstat()
            found[str(path)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_ino,
            )
        return found

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


class Neighbour:
    """The attack, by a real process of uid 65534; `undo` makes it put everything back."""

    def __init__(self, pod: Pod, how: str) -> None:
        self.pod = pod
        python = os.path.realpath(sys.executable)
        args = [str(pod.top), how, str(pod.victim), str(pod.victim_dir), str(pod.stop)]
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
            + [python, "-I", "-S", "-c", NEIGHBOUR, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line == "ready\n", line + self.proc.stderr.read()

    def undo(self) -> None:
        self.pod.stop.touch()
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0 and out == "undone\n", err
        self.pod.stop.unlink()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def pod():
    p = Pod()
    yield p
    p.remove()


@pytest.fixture
def neighbours():
    started: list[Neighbour] = []

    def start(pod: Pod, how: str) -> Neighbour:
        n = Neighbour(pod, how)
        started.append(n)
        return n

    yield start
    for n in started:
        n.kill()


@pytest.fixture
def procs():
    """Start processes; each, and the children it had, killed by pid at the end."""
    started: list[subprocess.Popen] = []

    def start(args: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(p)
        return p

    yield start
    for p in started:
        try:
            kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
        except OSError:
            kids = []
        kill_all([int(k) for k in kids] + [p.pid])
        p.wait(10)


def start_master(make_master, pod: Pod, worker: str = "sync", **env: str):
    app = "hostileapp:asgi_app" if worker.startswith("uvicorn") else "hostileapp:app"
    return make_master(
        shared_dir=pod.top,
        worker=worker,
        workers=2,
        app=app,
        env={
            "PYTHONPATH": f"{ROOT}{os.pathsep}{pod.base / 'app'}",
            "HOSTILE_HANG": str(pod.hang),
            "GUNICORN_TIMEOUT": "2",
            **env,
        },
        log_path=pod.base / "gunicorn.log",
    ).start()


def serves(m, n: int) -> None:
    """n requests, one after the other, every one answered (else the log says why)."""
    for i in range(n):
        status = http_get(m.url + "/", timeout=10)[0]
        assert status == 200, f"request {i + 1} of {n}: {status}\n" + m.output()[-6000:]


def reload_all(m) -> None:
    """A HUP, and every worker replaced by a new one that answers: workers spawned and
    recycled while the directory is whatever it is."""
    before = set(m.live_children())
    m.signal(signal.SIGHUP)
    wait_for(lambda: len(kids := m.live_children()) == 2 and not before & set(kids), 30, "reloaded")


def in_background(url: str) -> None:
    threading.Thread(target=http_get, args=(url, 60), daemon=True).start()


def count(m, text: str) -> int:
    return m.output().count(text)


def unharmed(m, pod: Pod, before: dict) -> None:
    assert m.proc.poll() is None, "the master must survive"
    out = m.output()
    assert "SIGBUS" not in out, out[-4000:]
    # Gunicorn's own traceback of a timed-out request is there, and the captures' stacks;
    # never a failure of ours, nor a worker that could not boot.
    for bad in ("hook_failed", "Bad file descriptor", "Exception in worker process"):
        assert bad not in out, out[-4000:]
    assert pod.sentinels() == before, "a file outside the monitor's own was touched"
    assert pod.victim.stat().st_size == VICTIM_BYTES


def saved(pod: Pod, reason: str) -> list[dict]:
    return [c for c in captures.load(Layout(str(pod.top)))[0] if c["reason"] == reason]


@pytest.mark.parametrize("how", ["dir", "symlink"])
def test_a_neighbour_swapping_the_directory_harms_nothing_and_recording_comes_back(
    how, pod, neighbours, make_master, make_exporter
):
    m = start_master(make_master, pod, GUNICORN_MONITOR_FOLD_APP_METRICS="1")
    # A root sidecar folding too: its compaction and retirement face the same neighbour.
    e = make_exporter(shared_dir=pod.top, env={"GUNICORN_MONITOR_FOLD_APP_METRICS": "1"})
    serves(m, 4)
    reload_all(m)  # an exit with folding on: `.compacting/` is there for the neighbour to take
    before = pod.sentinels()

    # A request times out as the neighbour strikes: its capture is taken while the directory
    # is being swapped.
    in_background(m.url + "/sleep")
    n = neighbours(pod, how)
    wait_for(lambda: "WORKER TIMEOUT" in m.output(), 15, "the timeout")
    wait_for(lambda: "event=worker_capture" in m.output(), 15, "the capture finished")
    for _ in range(2):
        reload_all(m)
        serves(m, 10)
    # A worker hangs while booting, and boots once it may.
    pod.hang.touch()
    m.kill_a_worker(2, timeout=30)
    stuck_since = time.monotonic()
    serves(m, 5)  # the other worker serves meanwhile
    wait_for(lambda: time.monotonic() - stuck_since > 3, 10, "past the timeout, booting")
    pod.hang.unlink()
    reload_all(m)
    serves(m, 10)
    for _ in range(3):  # the sidecar scrapes through it all (a gap, never their data)
        status, body = e.get("/metrics")
        assert status == 200 and b"gunicorn_exporter_errors_total" in body
    unharmed(m, pod, before)
    wait_for(lambda: "event=directory_fault fault=unsafe" in m.output(), 10, "the refusal")
    assert count(m, "event=directory_fault fault=unsafe") == 1

    n.undo()
    wait_for(lambda: count(m, "event=directory_recovered fault=unsafe") == 1, 20, "recovered")

    def all_counted() -> bool:
        samples, out = e.scrape(), m.output()
        spawned = value(samples, "gunicorn_worker_spawns_total")
        ended = sum(exits(samples).values())
        return spawned == out.count("Booting worker") and ended == out.count("event=worker_exit")

    wait_for(all_counted, 20, "every spawn and exit of the attack counted")
    faults = value(e.scrape(), "gunicorn_monitor_directory_faults_total", fault="unsafe")
    assert faults == 1
    # Captures are back, whole: workers forked from now on have their table again.
    reload_all(m)
    in_background(m.url + "/sleep")
    cap = wait_for(lambda: saved(pod, "timeout"), 20, "a timeout capture saved")[-1]
    assert cap["phase"] == "request" and "in _sleep" in cap["stack"], cap
    pod.hang.touch()
    m.kill_a_worker(2, timeout=30)
    cap = wait_for(lambda: saved(pod, "stuck_booting"), 20, "a stuck boot captured")[-1]
    assert cap["phase"] == "boot" and "in _hang_while_told" in cap["stack"], cap
    pod.hang.unlink()
    serves(m, 10)
    unharmed(m, pod, before)
    assert count(m, "event=directory_fault fault=unsafe") == 1


@pytest.mark.parametrize("worker", ["gthread", "uvicorn", "gevent", "tornado"])
def test_every_worker_class_is_unharmed_by_a_swapped_directory(
    worker, pod, neighbours, make_master
):
    m = start_master(make_master, pod, worker=worker)
    serves(m, 4)
    before = pod.sentinels()
    n = neighbours(pod, "symlink")
    for _ in range(2):
        reload_all(m)
        serves(m, 10)
    unharmed(m, pod, before)
    n.undo()
    wait_for(lambda: "event=directory_recovered fault=unsafe" in m.output(), 20, "recovered")
    reload_all(m)
    serves(m, 10)
    unharmed(m, pod, before)


def _forge(m, pid: int, workers: list[int], heartbeat: bool) -> None:
    """A state file (and a heartbeat) naming `pid` as a live master of `workers`, each with its
    true start ticks from /proc: everything a file can say, as root writes it."""
    ticks = state.start_ticks(pid)
    recorded = {
        "pid": pid,
        "start_time": time.time(),
        "start_ticks": ticks,
        "version": "27.0.1",
        "worker_class": "sync",
        "workers_desired": 5,
        "workers": {
            str(w): {"slot": i, "spawned": time.time(), "ticks": state.start_ticks(w)}
            for i, w in enumerate(workers)
        },
    }
    layout = Layout(str(m.dir))
    state.write(layout, pid, recorded)
    if heartbeat:  # a heartbeat of the right form, beating: only the lock it lacks
        hb = Path(layout.heartbeats) / str(pid)
        hb.write_bytes(heartbeat_file.encode(pid, ticks, time.monotonic() + 3600))


def _children(pid: int, n: int) -> list[int]:
    def found() -> list[int] | None:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [int(k) for k in kids] if len(kids) == n else None

    return wait_for(found, 10, f"{n} children of {pid}")


@pytest.mark.parametrize("who", ["root", "nobody"])
def test_a_forged_master_state_naming_another_process_is_neither_served_nor_sampled(
    who, make_master, make_exporter, procs
):
    m = make_master(workers=2).start()
    e = make_exporter()
    wait_for(lambda: value(e.scrape(), "gunicorn_workers") == 2, 20, "the real workers")
    # An unrelated process with children of its own: a forged master, its "workers" real
    # children of it (so only what is said of the master can give it away).
    prefix = (
        []
        if who == "root"
        else ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    )
    fake = procs(prefix + ["sh", "-c", "sleep 1000 & sleep 1000 & wait"])
    kids = _children(fake.pid, 2)
    _forge(m, fake.pid, kids, heartbeat=True)
    before = value(e.scrape(), "gunicorn_exporter_errors_total", kind="rejected")

    def rejected() -> bool:
        samples = e.scrape()
        return value(samples, "gunicorn_exporter_errors_total", kind="rejected") > before

    wait_for(rejected, 20, "the forged master rejected")
    for _ in range(3):  # the sampler's turns too (every 5 s: its parse is of changed files)
        samples = e.scrape()
        assert value(samples, "gunicorn_workers") == 2
        assert value(samples, "gunicorn_workers_desired") == 2
        assert value(samples, "gunicorn_up") == 1
    cli = BIN / "gunicorn-monitor"
    out = subprocess.run(
        [cli, "status", "--json", "--dir", str(m.dir)], capture_output=True, text=True, timeout=60
    )
    assert [master["pid"] for master in json.loads(out.stdout)["masters"]] == [m.pid]
    # The real master still counts and is served as before.
    assert http_get(m.url + "/")[0] == 200
    m.kill_a_worker(2)
    wait_for(lambda: value(e.scrape(), "gunicorn_workers") == 2, 20, "the replacement served")


def _as_nobody(code: str, *args: str) -> None:
    """Run `code` as uid 65534, a real process of another user."""
    python = os.path.realpath(sys.executable)
    subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        + [python, "-I", "-S", "-c", code, *args],
        check=True,
        timeout=30,
    )


@pytest.mark.parametrize("how", ["symlink", "dir"])
def test_the_sidecars_compaction_never_follows_a_swapped_compacting_dir(how, pod):
    """A root sidecar folding app files: `.compacting/` and `quarantine/` at the 0777 top taken
    by a neighbour (a symlink to root's files, or a directory of theirs) are refused, nothing
    outside the monitor's own is touched, and the fold happens once they are gone."""
    dead, gone = (subprocess.Popen(["true"]) for _ in range(2))
    dead.wait()
    gone.wait()
    spec = metrics.WORKER_SPAWNS  # any counter spec serves as an app's counter here
    write_multiprocess_file(pod.top / f"counter_{dead.pid}.db", [(spec, spec.name, {}, 3.0)])
    (pod.top / f"counter_{gone.pid}.db").write_bytes(b"garbage")  # to be quarantined
    before = pod.sentinels()
    take = (
        "import os, sys\n"
        "for name in ('.compacting', 'quarantine'):\n"
        "    path = os.path.join(sys.argv[1], name)\n"
        "    if sys.argv[3] == 'symlink':\n"
        "        os.symlink(sys.argv[2], path)\n"
        "    else:\n"
        "        os.mkdir(path, 0o777)\n"
        "        os.mkdir(os.path.join(path, 'staged'), 0o777)\n"
        "        os.mkdir(os.path.join(path, 'next'), 0o777)\n"
    )
    _as_nobody(take, str(pod.top), str(pod.victim_dir), how)
    with pytest.raises(UnsafeDirectory):
        compaction.run_compaction(str(pod.top), stage_dead=True)
    with pytest.raises(UnsafeDirectory):
        compaction.quarantine(str(pod.top), f"counter_{gone.pid}.db")
    assert compaction.has_pending(str(pod.top))  # cannot tell: the locked path says why
    assert pod.sentinels() == before, "a file outside the monitor's own was touched"
    assert (pod.top / f"counter_{dead.pid}.db").exists()  # nothing moved into theirs
    undo = (
        "import os, shutil, sys\n"
        "for name in ('.compacting', 'quarantine'):\n"
        "    path = os.path.join(sys.argv[1], name)\n"
        "    os.unlink(path) if os.path.islink(path) else shutil.rmtree(path)\n"
    )
    _as_nobody(undo, str(pod.top))
    report = compaction.run_compaction(str(pod.top), stage_dead=True)
    assert report.folded == 1 and report.quarantined == 1, report
    assert (pod.top / "counter_aggregate.db").exists()
    assert len(os.listdir(pod.top / compaction.QUARANTINE_DIR)) == 1
    assert pod.sentinels() == before
