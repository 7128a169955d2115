"""A master is up only while it works, its workers' ages survive clock steps, and no worker is
left uncounted when its master dies first.

Each scenario is one an operator lives through, done for real: the Gunicorn master's wall clock
stepped back an hour while it runs (libfaketime, from Debian), a master stopped with SIGSTOP or
wedged in a hook of the user's, a USR2 upgrade whose old master is SIGKILLed, a master SIGKILLed
alone and a new one started over its directory.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from monitor.contract import heartbeat
from monitor.contract.directory import Layout
from monitor.sidecar import cache, liveness
from tests.harness import BIN, ROOT, alive, exits, http_get, value, wait_for

TOOLS = ROOT / ".tools" / "root"
UP, AGE = "gunicorn_up", "gunicorn_master_heartbeat_age_seconds"


def _libfaketime() -> str:
    """Debian's libfaketime, extracted into .tools/ (as scripts/prometheus.sh does promtool):
    installed by the test itself, nothing outside the tree changes."""
    pattern = str(TOOLS / "usr" / "lib" / "*" / "faketime" / "libfaketimeMT.so.1")
    found = glob.glob(pattern)
    if not found:
        TOOLS.mkdir(parents=True, exist_ok=True)
        where = TOOLS.parent
        get = ["apt-get", "download", "libfaketime"]
        if subprocess.run(get, cwd=where, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            subprocess.run(get, cwd=where, check=True, capture_output=True)
        for deb in where.glob("libfaketime_*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), str(TOOLS)], check=True)
            deb.unlink()
        found = glob.glob(pattern)
    assert found, "libfaketime could not be installed"
    return found[0]


# libfaketime 0.9.10 (Debian 12) fails clock_nanosleep with EINVAL whenever
# FAKETIME_DONT_FAKE_MONOTONIC is set, and Python >= 3.11's time.sleep calls it: Gunicorn's
# arbiter sleeps between spawns. Sleeping through select(), as Python 3.10 does, sidesteps the
# tool's bug and changes nothing the test looks at.
SLEEP_THROUGH_SELECT = (
    "import select as _select, time as _time\n"
    "_time.sleep = lambda s: _select.select([], [], [], max(0.0, s)) and None\n"
)


def test_a_wall_clock_step_back_changes_no_lifetime(make_master, make_exporter, tmp_path):
    spec = tmp_path / "faketime"
    spec.write_text("+0\n")
    env = {
        "LD_PRELOAD": _libfaketime(),
        "FAKETIME_TIMESTAMP_FILE": str(spec),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # the kernel's monotonic clock never steps
        "NO_FAKE_STAT": "1",  # Gunicorn's worker heartbeat file keeps its real mtime
        "GUNICORN_MAX_REQUESTS": "1",
    }
    m = make_master(workers=1, env=env, user_hooks=SLEEP_THROUGH_SELECT)
    started = time.monotonic()
    m.start(wait=False).wait_workers(1)
    seen = time.monotonic()
    e = make_exporter()
    assert value(e.scrape(), UP) == 1

    spec.write_text("-3600\n")  # the master's wall clock goes back an hour, while it runs
    wait_for(lambda: time.monotonic() - seen > 2.0, 5, "the worker to age a little")
    asked = time.monotonic()
    assert http_get(m.url + "/")[0] == 200  # its one request: it recycles
    wait_for(lambda: exits(e.scrape()) == {("max_requests", "none"): 1.0}, 20, "the recycle")
    counted = time.monotonic()
    samples = e.scrape()

    life = "gunicorn_worker_lifetime_seconds"
    assert value(samples, life + "_count", cause="max_requests") == 1  # still served
    age = value(samples, life + "_sum", cause="max_requests")
    assert asked - seen <= age <= counted - started, (age, asked - seen, counted - started)
    assert value(samples, life + "_bucket", cause="max_requests", le="60.0") == 1
    assert value(samples, "gunicorn_exporter_errors_total", kind="malformed") == 0
    assert value(samples, UP) == 1  # its heartbeat is monotonic too
    records = [json.loads(line) for line in (m.dir / "gunicorn-monitor/events.jsonl").open()]
    exit_record = next(r for r in records if r["event"] == "exit")
    assert exit_record["time"] < time.time() - 3000, "the master's clock was not stepped"
    assert exit_record["age_seconds"] == pytest.approx(age, abs=0.01)


STATUS_NOW = (
    "import json, sys\n"
    "from monitor.contract.directory import Layout\n"
    "from monitor.sidecar import status\n"
    "print(json.dumps(status.snapshot(Layout(sys.argv[1]), status._Cpu())))\n"
)


def test_status_ages_survive_a_wall_clock_step(make_master, tmp_path):
    """`gunicorn-monitor status` read on a machine whose clock has just gone back an hour."""
    started = time.monotonic()
    m = make_master(workers=2).start()
    env = {
        **os.environ,
        "LD_PRELOAD": _libfaketime(),
        "FAKETIME": "-3600",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [str(BIN / "python"), "-c", STATUS_NOW, str(m.dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert snap["time"] < time.time() - 3000, "its clock was not stepped"
    (master,) = snap["masters"]
    lived = time.monotonic() - started
    assert 0 < master["uptime_seconds"] <= lived + 1, (master["uptime_seconds"], lived)
    ages = [w["age_seconds"] for w in master["workers"]]
    assert len(ages) == 2 and all(0 <= a <= master["uptime_seconds"] for a in ages), ages


def test_the_verdict_on_a_master():
    """The pure judgement the sidecar serves as gunicorn_up and the heartbeat age."""
    now = 1000.0
    assert heartbeat.judge(False, now - 0.5, now).up
    assert not heartbeat.judge(True, now - 0.5, now).up  # stopped: down at once
    late = heartbeat.judge(False, now - heartbeat.STALL_SECONDS - 0.1, now)
    assert late.stalled and not late.up and late.age > heartbeat.STALL_SECONDS
    assert heartbeat.judge(False, None, now) == heartbeat.Verdict(False, None)  # no evidence
    assert heartbeat.judge(False, now + 30, now).age is None  # another clock: no evidence
    data = heartbeat.encode(42, 7, 12.5)
    assert heartbeat.decode(data, 42, 7) == 12.5
    assert heartbeat.decode(data, 42, 8) is None  # a file an earlier master of pid 42 left
    assert heartbeat.decode(data, 43, 7) is None
    assert heartbeat.decode(data[:-1], 42, 7) is None


def test_a_stopped_master_is_down_serves_no_zombie_and_catches_up_exactly(
    make_master, make_exporter
):
    m = make_master(workers=2).start()
    e = make_exporter()
    first = wait_for(lambda: (s := e.scrape()) and value(s, "gunicorn_workers") == 2 and s, 10)
    assert value(first, UP) == 1 and 0 <= value(first, AGE) <= heartbeat.STALL_SECONDS

    m.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: value(e.scrape(), UP) == 0, 10, "a stopped master is down")
        victims = m.worker_pids()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        # Dead, and nobody reaps them: zombies, which are not live workers.
        wait_for(lambda: not any(alive(p) for p in victims), 10, "the workers dead")
        assert all(psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in victims)
        samples = wait_for(
            lambda: (s := e.scrape()) and value(s, "gunicorn_workers") == 0 and s, 10, "no zombie"
        )
        assert value(samples, UP) == 0
        assert not [k for k in samples if k[0] == "gunicorn_worker_memory_bytes"]
        assert exits(samples) == {}  # nothing counted while it cannot count
    finally:
        m.signal(signal.SIGCONT)

    want = {("killed", "SIGKILL"): 2.0}
    wait_for(lambda: exits(e.scrape()) == want, 20, "every exit counted once, with its cause")
    m.wait_workers(2, exclude=set(victims))
    after = wait_for(lambda: (s := e.scrape()) and value(s, "gunicorn_workers") == 2 and s, 10)
    assert value(after, UP) == 1
    assert value(after, "gunicorn_worker_spawns_total") == 4
    assert exits(after) == want


WEDGED_ON_HUP = (
    "import threading as _threading\n"
    "def on_reload(server):\n"
    "    _threading.Event().wait()  # a hook of the user's that never returns\n"
)


def test_a_master_wedged_in_a_hook_is_down_once_its_loop_has_stalled(make_master, make_exporter):
    m = make_master(workers=1, user_hooks=WEDGED_ON_HUP).start()
    e = make_exporter()
    assert value(e.scrape(), UP) == 1
    m.signal(signal.SIGHUP)
    stalled = wait_for(
        lambda: (s := e.scrape()) and value(s, UP) == 0 and s,
        heartbeat.STALL_SECONDS + 15,
        "the wedged master down",
    )
    first = value(stalled, AGE)
    assert first > heartbeat.STALL_SECONDS
    # Still stalled: the age keeps growing (a kept body would repeat the first one).
    wait_for(lambda: value(e.scrape(), AGE) >= first + 1, 10, "the age growing")
    assert value(e.scrape(), UP) == 0
    assert m.proc.poll() is None and value(e.scrape(), "gunicorn_workers") == 1


def test_the_heartbeat_leaves_the_kept_body_inputs_alone_until_a_master_is_down(make_master):
    """The master beats every second; a sidecar keeps the same body as long as nothing it
    serves changed: the inputs of a kept body carry the verdict, not the beat."""
    m = make_master(workers=1).start()
    layout = Layout(str(m.dir))
    inputs = cache.DirectoryInputs(layout)
    start_ticks = m.state()["start_ticks"]

    def beat() -> float:
        return heartbeat.read(layout, m.pid, start_ticks) or 0.0

    def unchanged_across_beats() -> object:
        first, token = beat(), inputs()
        wait_for(lambda: beat() - first >= 1.5, 10, "two more beats")
        return inputs() == token and token

    # Once the master has settled (its state file written after its workers booted), beats
    # alone change nothing: were each to, this would never hold.
    token = wait_for(unchanged_across_beats, 30, "inputs that stand across beats")
    m.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: inputs() != token, 5, "a stopped master changes the inputs")
        assert inputs() != inputs(), "the age of a master that is down moves on every scrape"
    finally:
        m.signal(signal.SIGCONT)


def test_a_heartbeat_file_written_anew_is_read_anew(make_master):
    """The judge keeps each live master's heartbeat file open between scrapes; once that file
    is removed (and the master writes a new one by its name), the new one is read: a kept
    descriptor of the old file would see its beat stop, and a working master stall."""
    m = make_master(workers=1).start()
    layout = Layout(str(m.dir))
    ticks = m.state()["start_ticks"]
    judge = liveness.Liveness(layout)
    first = judge.judge(m.pid, ticks)
    assert first is not None and first.up and first.age is not None and first.age < 2.5
    path = heartbeat.path(layout, m.pid)
    before = os.stat(path).st_ino
    os.unlink(path)
    wait_for(lambda: os.path.exists(path), 10, "the master writing its heartbeat anew")
    assert os.stat(path).st_ino != before
    written = heartbeat.read(layout, m.pid, ticks) or 0.0
    wait_for(
        lambda: (heartbeat.read(layout, m.pid, ticks) or 0.0) - written >= 3,
        15,
        "three more beats in the new file",
    )
    later = judge.judge(m.pid, ticks)
    assert later is not None and later.up and later.age is not None and later.age < 2.5, later
    judge.forget_all_but(set())
    assert not judge._kept, "a master no longer recorded keeps no file open"


# -- orphaned workers -------------------------------------------------------------------------


def _balanced(e, workers: int, orphaned: int, what: str) -> dict:
    """Settled: `orphaned` exits counted as such, and spawns minus exits equals live workers."""

    def settled() -> dict | None:
        s = e.scrape()
        found = exits(s)
        if (
            found.get(("orphaned", "none"), 0) != orphaned
            or value(s, "gunicorn_workers") != workers
        ):
            return None
        if value(s, "gunicorn_worker_spawns_total") - sum(found.values()) != workers:
            return None
        return s

    return wait_for(settled, 40, what)


def _children(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def test_usr2_then_sigkill_of_the_old_master_counts_its_orphans_once(make_master, make_exporter):
    old = make_master(workers=2).start()
    e = make_exporter()
    old_workers = set(old.worker_pids())
    old.signal(signal.SIGUSR2)
    own = old.dir / "gunicorn-monitor"

    def new_master() -> int | None:
        for pid in _children(old.pid):
            if pid not in old_workers and (own / f"master-{pid}.json").exists():
                return pid
        return None

    new_pid = wait_for(new_master, 20, "the new master")
    new_workers: list[int] = []
    try:
        wait_for(lambda: value(e.scrape(), "gunicorn_workers") == 4, 20, "old and new workers")
        new_workers = _children(new_pid)
        old.signal(signal.SIGKILL)  # before it is told to stop: its workers live on, orphaned
        old.wait_exit()
        samples = _balanced(e, 2, 2, "the old master's workers counted as orphaned, once")
        assert exits(samples) == {("orphaned", "none"): 2.0}
        assert value(samples, "gunicorn_worker_spawns_total") == 4
        assert value(samples, UP) == 1
        # Each was watched until it died: its age is known.
        assert value(samples, "gunicorn_worker_lifetime_seconds_count", cause="orphaned") == 2
        # Accounted for: its state says stopped, or the sidecar is retiring its files
        # (sidecar/retirement.py), which it does only for a state that says so: state file
        # first, then its counts, into retired.json.
        try:
            assert json.loads((own / f"master-{old.pid}.json").read_text())["stopped"] is True
        except FileNotFoundError:
            wait_for(lambda: not (own / f"counter_{old.pid}.db").exists(), 20, "its counts retired")
            assert (own / "retired.json").exists()
        # Nothing more is owed: no heartbeat (the retirement's lock on one, if it holds one
        # for a moment, goes with the files).
        wait_for(lambda: not (own / "heartbeat" / str(old.pid)).exists(), 10, "no heartbeat")
        assert value(e.scrape(), "gunicorn_worker_spawns_total") == 4  # retired or not
    finally:
        for pid in [new_pid, *new_workers, *_children(new_pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_master_killed_alone_has_its_orphans_counted_once_by_the_masters_after_it(
    make_master, make_exporter
):
    """Three masters share the directory; one is SIGKILLed while a worker of it is busy with a
    request, so it outlives its master. The other two both see it dead: exactly one counts."""
    a = make_master(workers=1).start()
    b = make_master(workers=1).start()
    doomed = make_master(workers=2).start()
    e = make_exporter()
    wait_for(lambda: value(e.scrape(), "gunicorn_workers") == 4, 20, "four workers")
    busy = threading.Thread(target=http_get, args=(doomed.url + "/sleep?s=4", 30), daemon=True)
    busy.start()
    wait_for(lambda: value(e.scrape(), "demo_requests_total", endpoint="/sleep") == 1, 10, "busy")
    orphans = doomed.worker_pids()
    doomed.proc.send_signal(signal.SIGKILL)
    doomed.wait_exit()
    samples = _balanced(e, 2, 2, "the killed master's workers counted once")
    assert exits(samples) == {("orphaned", "none"): 2.0}
    wait_for(lambda: not any(alive(p) for p in orphans), 30, "the orphans gone")
    # The busy one was watched while it finished its request: it has an age.
    assert value(samples, "gunicorn_worker_lifetime_seconds_count", cause="orphaned") >= 1
    text = a.output() + b.output()
    assert text.count("event=orphans_claimed") == 1, text

    # A new master over the same directory after everything settled: nothing more is owed.
    c = make_master(workers=1).start()
    later = _balanced(e, 3, 2, "a new master counts nothing again")
    assert value(later, "gunicorn_worker_spawns_total") == 5
    assert "event=orphans_claimed" not in c.output()


def test_a_new_master_counts_what_a_dead_one_owed(make_master, make_exporter, shared_dir):
    """A master SIGKILLed with its workers (a container restart: nothing of it survives) leaves
    them uncounted; the next master started over the directory counts them, with no age."""
    first = make_master(workers=2).start()
    e = make_exporter()
    gone = first.worker_pids()
    first.kill()  # the master and its workers, by SIGKILL, as a container's end does
    wait_for(lambda: value(e.scrape(), UP) == 0, 10, "down")
    assert exits(e.scrape()) == {}
    make_master(workers=1).start()
    samples = _balanced(e, 1, 2, "the dead master's two workers counted")
    assert exits(samples) == {("orphaned", "none"): 2.0}
    life = "gunicorn_worker_lifetime_seconds_count"
    assert value(samples, life, cause="orphaned") == 0  # died unseen: no age is made up
    records = [
        json.loads(line) for line in (shared_dir / "gunicorn-monitor" / "events.jsonl").open()
    ]
    counted = [r for r in records if r.get("cause") == "orphaned"]
    assert len(counted) == 2 and {r["master_pid"] for r in counted} == {first.pid}
    assert not any(alive(p) for p in gone)


PREDECESSOR = """
import json, os, sys
from monitor.contract import metrics, state
from monitor.contract.directory import Layout, open_private
from monitor.contract.store import Store

pid, stray = int(sys.argv[1]), int(sys.argv[2])
layout = Layout(os.environ["PROMETHEUS_MULTIPROC_DIR"])
fd = open_private(layout, create=True)
store = Store(str(pid))
store.inc(metrics.WORKER_SPAWNS, 3.0)
store.write(fd)
workers = {
    str(stray): {"slot": 0, "spawned": 1.0, "ticks": state.start_ticks(stray)},
    "99999": {"slot": 1, "spawned": 1.0, "ticks": 5},
}
dead = {"pid": pid, "start_time": 1.0, "start_ticks": 1, "version": "27.0.1",
        "worker_class": "sync", "workers_desired": 3, "workers": workers}
state.write(layout, pid, dead, fd)
"""


def test_a_restarted_master_of_the_same_pid_counts_what_its_predecessor_owed(
    make_master, make_exporter, shared_dir, tmp_path
):
    """A restarted container: the new master has the dead one's pid, adopts its counts file and
    replaces its state file. Before it does, what the dead master owed becomes its own to count:
    a worker it left still running (here a stand-in process) when it dies, with its age; the
    others (gone, or never listed) at once."""
    script = tmp_path / "predecessor.py"
    script.write_text(PREDECESSOR)
    stray = subprocess.Popen(["sleep", "3"])
    try:
        # The shell writes the predecessor's files for its own pid, then becomes Gunicorn.
        prefix = ("sh", "-c", f'"$0" {script} $$ {stray.pid} && exec "$@"', str(BIN / "python"))
        m = make_master(workers=1, prefix=prefix).start()
        e = make_exporter()
        first = e.scrape()
        assert exits(first) == {("orphaned", "none"): 2.0}  # the two not running, at once
        assert value(first, "gunicorn_worker_lifetime_seconds_count", cause="orphaned") == 0
        samples = _balanced(e, 1, 3, "the one left running, when it dies")
        assert value(samples, "gunicorn_worker_lifetime_seconds_count", cause="orphaned") == 1
        assert value(samples, "gunicorn_worker_spawns_total") == 4
        assert stray.poll() is not None
        assert m.state()["pid"] == m.pid and not m.state()["stopped"]
    finally:
        stray.kill()
        stray.wait()
