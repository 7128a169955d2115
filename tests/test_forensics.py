"""Why a worker hung: every timeout leaves the stacks of the worker's threads, its phase and the
requests it was serving; a worker that never finishes booting is seen, and can be aborted.

The decisions are tested as pure functions first; then each scenario is done for real: a real
Gunicorn master with the project's config, a real stuck request (or import), the master's own
timeout, the capture file it writes, its log line, and a scrape of the real exporter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from monitor.contract import captures, directory, inflight
from monitor.contract.directory import Layout
from monitor.contract.inflight import Request, Snapshot
from monitor.hooks import forensics
from tests.harness import BIN, EVENTLET, alive, exits, http_get, value, wait_for


def _snap(ready=True, tracks=True, requests=(), unreadable=0, overflow=0) -> Snapshot:
    return Snapshot(1, ready, True, tracks, 10.0, 11.0 if ready else 0.0, requests,
                    unreadable, overflow, 0)  # fmt: skip


# -- decisions ---------------------------------------------------------------------------------


def test_the_phase_is_boot_request_idle_or_unknown_never_a_guess():
    busy = (Request("GET", "/sleep", 5.0),)
    assert forensics.phase(_snap(ready=False)) == "boot"
    assert forensics.phase(_snap(requests=busy)) == "request"
    assert forensics.phase(_snap()) == "idle"
    assert forensics.phase(_snap(overflow=1)) == "request"
    # UvicornWorker gives no per-request hook; a table that changed under every read; no table.
    assert forensics.phase(_snap(tracks=False)) == "unknown"
    assert forensics.phase(_snap(unreadable=1)) == "unknown"
    assert forensics.phase(None) == "unknown"


def test_requests_in_flight_longest_first_and_unknown_without_a_hook():
    snap = _snap(requests=(Request("GET", "/a", 8.0), Request("POST", "/b", 2.0)))
    found = forensics.requests_in_flight(snap, 10.0)
    assert found == [
        {"method": "POST", "path": "/b", "seconds": 8.0},
        {"method": "GET", "path": "/a", "seconds": 2.0},
    ]
    assert forensics.requests_in_flight(_snap(tracks=False), 10.0) == "unknown"
    assert forensics.describe(found) == "POST /b 8.0s, GET /a 2.0s"


def test_which_signal_calls_for_which_capture():
    assert forensics.capture_reason("SIGABRT", True, False, False) == "timeout"
    assert forensics.capture_reason("SIGABRT", True, False, True) == "boot_timeout"
    assert forensics.capture_reason("SIGKILL", True, False, False) == "timeout"
    assert forensics.capture_reason("SIGKILL", False, True, False) == "shutdown_kill"
    assert forensics.capture_reason("SIGTERM", False, True, False) is None
    assert forensics.capture_reason("SIGABRT", False, False, False) is None  # not the master's


def test_stuck_and_timed_out_boots():
    assert forensics.stuck_booting(31.0, 30)
    assert not forensics.stuck_booting(29.0, 30)
    assert not forensics.stuck_booting(None, 30)  # ready
    assert not forensics.stuck_booting(99.0, 0)  # timeout 0: Gunicorn times nothing out
    assert not forensics.boot_timed_out(999.0, 0)  # opt-in: off by default
    assert forensics.boot_timed_out(11.0, 10)


def _subdir(layout: Layout, name: str) -> int:
    """A checked fd of gunicorn-monitor/<name>, made as the master makes it."""
    own = directory.open_private(layout, create=True)
    try:
        return directory.open_subdir(own, name, name, create=True)
    finally:
        os.close(own)


def test_the_table_is_read_back_as_written_and_a_torn_slot_is_a_gap(tmp_path):
    layout = Layout(str(tmp_path))
    live = _subdir(layout, inflight.LIVE)
    table = inflight.Table.create(live, os.getpid(), 2, tracks=True)
    os.close(live)
    assert inflight.read(layout, os.getpid()).ready is False
    table.armed()
    table.ready(True)
    a = table.acquire("GET", "/x" * 200)  # cut at the slot's size, not an error
    b = table.acquire("POST", "/y")
    assert table.acquire("GET", "/z") == -1  # more requests than slots: counted
    snap = inflight.read(layout, os.getpid())
    assert snap.ready and snap.armed and snap.tracks and snap.overflow == 1
    assert sorted(r.path[:2] for r in snap.requests) == ["/x", "/y"]
    table.release(a)
    table.release(b)
    snap = inflight.read(layout, os.getpid())
    assert snap.requests == () and snap.served == 2
    assert inflight.read(layout, os.getpid() + 1) is None  # another pid's: not ours to read


def test_captures_are_bounded_oldest_first_and_the_drops_are_said(tmp_path, monkeypatch):
    layout = Layout(str(tmp_path))
    monkeypatch.setattr(captures, "MAX_COUNT", 3)
    names = []
    fd = _subdir(layout, captures.DIR)
    for i in range(5):
        name, dropped = captures.save(fd, {"time": 1000.0 + i, "pid": 7, "stack": "x"})
        names.append(name)
        assert dropped == (1 if i >= 3 else 0)
    os.close(fd)
    kept, bad = captures.load(layout)
    assert [r["name"] for r in kept] == names[2:] and bad == 0
    (tmp_path / "gunicorn-monitor" / "captures" / "0000000000000001-9.json").write_text("{")
    assert captures.load(layout)[1] == 1


# -- real processes ----------------------------------------------------------------------------


def _captures(m) -> list[dict]:
    return captures.load(Layout(str(m.dir)))[0]


def _capture(m, reason: str, timeout: float = 20) -> dict:
    def found():
        return [c for c in _captures(m) if c["reason"] == reason]

    return wait_for(found, timeout, f"a {reason} capture")[0]


def _exit_record(m, name: str) -> dict:
    def found():
        path = m.dir / "gunicorn-monitor" / "events.jsonl"
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "exit" and rec.get("capture") == name:
                return rec
        return None

    return wait_for(found, 15, "the exit record naming the capture")


def _in_background(url: str) -> None:
    threading.Thread(target=http_get, args=(url, 60), daemon=True).start()


# Per worker class: a request that stalls the heartbeat, the function it is stuck in, and the
# signal that ends the worker.
TIMEOUTS = [
    ("sync", "/sleep?s=60&token=secret", "_sleep", "SIGABRT"),
    # gthread heartbeats from its main thread: only a GIL-holding C call stops it, and
    # then no Python handler runs either, so the SIGKILL escalation ends the worker.
    ("gthread", "/spin?s=300&token=secret", "_spin", "SIGKILL"),
    # gevent and eventlet yield in sleep: a greenlet that never yields stalls them.
    ("gevent", "/busy?s=60&token=secret", "_busy", "SIGABRT"),
    ("tornado", "/sleep?s=60&token=secret", "_sleep", "SIGABRT"),
    # Both UvicornWorkers die by SIGABRT itself: the stack is written before it is sent.
    ("uvicorn", "/sleep?s=60&token=secret", "_sleep", "SIGABRT"),
    ("uvicorn.workers", "/sleep?s=60&token=secret", "_sleep", "SIGABRT"),
    ("uvicorn.subclass", "/sleep?s=60&token=secret", "_sleep", "SIGABRT"),
]
TIMEOUTS += [("eventlet", "/busy?s=60&token=secret", "_busy", "SIGABRT")] if EVENTLET else []


@pytest.mark.parametrize("worker,path,stuck_in,signal_name", TIMEOUTS, ids=lambda v: str(v))
def test_a_timed_out_request_leaves_its_stack_path_and_phase(
    worker, path, stuck_in, signal_name, make_master, make_exporter
):
    m = make_master(worker=worker, workers=1, env={"GUNICORN_TIMEOUT": "2"}).start()
    e = make_exporter()
    m.heartbeating()
    _in_background(m.url + path)
    cap = _capture(m, "timeout")
    assert f"in {stuck_in}" in cap["stack"], cap["stack"]
    assert cap["phase"] == "request"
    [req] = cap["requests"]
    assert req["method"] == "GET" and req["path"] == path.split("?")[0]  # never the query
    assert 1.5 < req["seconds"] < 10
    rec = _exit_record(m, cap["name"])
    assert (rec["cause"], rec["signal"], rec["phase"]) == ("timeout", signal_name, "request")
    wait_for(
        lambda: value(e.scrape(), "gunicorn_worker_timeouts_total", phase="request") == 1,
        15,
        "the timeout counted by phase",
    )
    samples = e.scrape()
    assert value(samples, "gunicorn_worker_timeouts_total", phase="idle") == 0
    assert exits(samples) == {("timeout", signal_name): 1}
    log = m.output()
    line = next(x for x in log.splitlines() if "event=worker_capture" in x)
    assert f"capture={cap['name']}" in line and "phase=request" in line
    assert "secret" not in line and "secret" not in json.dumps(cap)
    assert f"in {stuck_in}" in log.split(line, 1)[1]  # the stack on the following lines
    assert "not tracked" not in _events_stacks(m)


@pytest.mark.parametrize("worker", ["gevent", "uvicorn"])
def test_many_requests_in_flight_are_each_tracked(worker, make_master):
    """A worker serving many requests at once (greenlets, an event loop) has a slot for each:
    the capture names all of them, and `events --stacks` says nothing is untracked."""
    m = make_master(worker=worker, workers=1, env={"GUNICORN_TIMEOUT": "3"}).start()
    m.heartbeating()
    # Yielding requests first (gevent's patched sleep; an awaited sleep), then the one that
    # blocks the worker's loop.
    slow = "/sleep?s=30" if worker == "gevent" else "/asleep?s=30"
    for _ in range(5):
        _in_background(m.url + slow)
    wait_for(lambda: len(inflight.read(Layout(str(m.dir)), m.worker_pids()[0]).requests) == 5,
             10, "five requests in flight")  # fmt: skip
    _in_background(m.url + ("/busy?s=60" if worker == "gevent" else "/sleep?s=60"))
    cap = _capture(m, "timeout")
    assert cap["phase"] == "request" and cap["untracked_requests"] == 0
    assert sorted(r["path"] for r in cap["requests"]) == sorted([slow.split("?")[0]] * 5 + [
        "/busy" if worker == "gevent" else "/sleep"])  # fmt: skip
    assert "not tracked" not in _events_stacks(m)


def _events_stacks(m) -> str:
    out = subprocess.run(
        [str(BIN / "gunicorn-monitor"), "events", "--stacks", "--dir", str(m.dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_worker_hanging_while_importing_the_app_is_seen_and_left_running(
    make_master, make_exporter
):
    env = {"GUNICORN_TIMEOUT": "2", "DEMO_BOOT_SLEEP": "60"}
    m = make_master(workers=1, env=env).start(wait=False)
    e = make_exporter()
    started = time.monotonic()
    wait_for(
        lambda: value(e.scrape(), "gunicorn_workers_stuck_booting") == 1,
        2 + 6,
        "gunicorn_workers_stuck_booting 1 within timeout + a few seconds",
    )
    cap = _capture(m, "stuck_booting")
    assert "in _slow_start" in cap["stack"] and cap["phase"] == "boot", cap
    assert time.monotonic() - started < 10
    [pid] = m.worker_pids()
    assert cap["pid"] == pid and alive(pid)  # seen, not stopped: Gunicorn never times it out
    assert exits(e.scrape()) == {}
    out = subprocess.run(
        [str(BIN / "gunicorn-monitor"), "events", "--stacks", "--dir", str(m.dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and "phase boot" in out.stdout and "_slow_start" in out.stdout
    # Gunicorn had twice its timeout to abort the worker, and did not: it never notified.
    wait_for(lambda: time.monotonic() - started > 2 * 2 + 1, 10, "twice the timeout")
    assert alive(pid) and exits(e.scrape()) == {}
    assert "WORKER TIMEOUT" not in m.output()


def test_the_opt_in_boot_timeout_aborts_a_hanging_boot_and_counts_it(make_master, make_exporter):
    env = {"GUNICORN_TIMEOUT": "30", "GUNICORN_BOOT_TIMEOUT": "2", "DEMO_BOOT_SLEEP": "60"}
    m = make_master(workers=1, env=env).start(wait=False)
    e = make_exporter()
    wait_for(
        lambda: value(e.scrape(), "gunicorn_worker_timeouts_total", phase="boot") >= 1,
        15,
        "a boot timeout counted with phase boot",
    )
    assert sum(n for (cause, _), n in exits(e.scrape()).items() if cause == "timeout") >= 1
    cap = _capture(m, "boot_timeout")
    assert "in _slow_start" in cap["stack"] and cap["phase"] == "boot"
    assert "WORKER TIMEOUT" in m.output()


def test_a_worker_killed_after_graceful_timeout_at_shutdown_leaves_its_stack(make_master):
    env = {"GUNICORN_GRACEFUL_TIMEOUT": "1"}
    m = make_master(workers=1, env=env).start()
    _in_background(m.url + "/sleep?s=60&ignore_abort=1")
    wait_for(lambda: inflight.read(Layout(str(m.dir)), m.worker_pids()[0]).requests, 10, "busy")
    m.signal(signal.SIGTERM)
    m.wait_exit(20)
    cap = _capture(m, "shutdown_kill", 5)
    assert "in _sleep" in cap["stack"] and cap["phase"] == "request"
    assert cap["requests"][0]["path"] == "/sleep"


def test_boot_time_is_observed_once_per_worker(make_master, make_exporter):
    m = make_master(workers=2).start()
    e = make_exporter()
    wait_for(
        lambda: value(e.scrape(), "gunicorn_worker_boot_seconds_count") == 2,
        10,
        "two boots observed",
    )
    assert value(e.scrape(), "gunicorn_worker_boot_seconds_bucket", le="+Inf") == 2
    assert m.proc.poll() is None


def test_a_capture_that_cannot_be_saved_costs_the_capture_only(make_master, make_exporter):
    m = make_master(workers=1, env={"GUNICORN_TIMEOUT": "2"}).start()
    e = make_exporter()
    captures_dir = m.dir / "gunicorn-monitor" / "captures"
    captures_dir.rmdir()
    captures_dir.write_text("not a directory")  # every save fails from here on
    for n in (1, 2):
        _in_background(m.url + "/sleep?s=60")
        wait_for(
            lambda n=n: value(e.scrape(), "gunicorn_worker_timeouts_total", phase="request") == n,
            20,
            f"timeout {n} counted by phase",
        )
        m.wait_workers(1, timeout=20)
    assert exits(e.scrape()) == {("timeout", "SIGABRT"): 2}
    out = m.output()
    assert out.count("event=directory_fault fault=missing") == 1  # said once
    assert out.count("event=worker_capture") == 2  # each capture still logged, whole
    assert value(e.scrape(), "gunicorn_monitor_directory_faults_total", fault="missing") == 1
    assert "hook_failed" not in out
    assert m.proc.poll() is None and http_get(m.url + "/")[0] == 200
