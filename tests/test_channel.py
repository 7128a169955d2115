"""What a worker knows about its own exit reaches its master whatever happens to the directory,
and a race between the worker's decision and the master's signal goes to what happened first.

Real Gunicorn masters and workers, real signals, a real 1 MB tmpfs for the full disk.
"""

from __future__ import annotations

import os
import re
import signal
import threading

import pytest

from monitor.contract import inflight
from monitor.contract.directory import Layout
from tests.harness import EVENTLET, PLAIN_APP, ROOT, WORKER_CLASSES, exits, http_get, wait_for
from tests.test_faults import fill, own, remove, root_only

RECYCLE_EVERY_REQUEST = ("--max-requests", "1", "--max-requests-jitter", "0")
# Where each class says it decided to leave after max_requests (in Gunicorn's error log).
DECIDED = {"uvicorn": "Maximum request limit"}
# Classes that decide before serving the request that reaches the limit (tornado decides as the
# connection closes, after it: a HUP during that request came first there, and is a reload).
RACING = ["sync", "gthread", "gevent", "uvicorn", "uvicorn.workers"] + (
    ["eventlet"] if EVENTLET else []
)


def _in_background(url: str) -> threading.Thread:
    t = threading.Thread(target=http_get, args=(url, 60), daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("worker", RACING)
def test_a_hup_reaching_a_worker_finishing_its_last_request_is_max_requests(
    worker, make_master, make_exporter
):
    """It had decided to leave before the master told it to: a recycle, not a reload."""
    m = make_master(worker=worker, workers=1, args=RECYCLE_EVERY_REQUEST)
    m.start(wait=False).wait_workers(1)
    e = make_exporter()
    [pid] = m.worker_pids()
    asgi = WORKER_CLASSES[worker][1].endswith("asgi_app")
    slow = _in_background(m.url + ("/asleep?s=3" if asgi else "/sleep?s=3"))
    said = DECIDED.get(worker.split(".")[0], "Autorestarting worker after current request.")
    wait_for(lambda: said in m.output(), 10, "the worker's decision, logged")
    m.signal(signal.SIGHUP)
    wait_for(lambda: exits(e.scrape()), 20, "the exit counted")
    ((cause, _),) = exits(e.scrape())
    assert cause == "max_requests", exits(e.scrape())
    slow.join(30)
    m.wait_workers(1, exclude={pid})

    # The next worker, told to go before it decided anything: a reload.
    [pid] = m.worker_pids()
    m.signal(signal.SIGHUP)
    wait_for(lambda: sum(exits(e.scrape()).values()) == 2, 20, "the reload counted")
    reloads = {k: v for k, v in exits(e.scrape()).items() if k[0] == "reload"}
    assert sum(reloads.values()) == 1, exits(e.scrape())


@pytest.fixture
def plain(tmp_path) -> dict:
    """An app without prometheus_client metrics: with its directory gone, the demo app's own
    library would fail requests (the app's business, not the monitor's)."""
    (tmp_path / "plainapp.py").write_text(PLAIN_APP)
    return {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}


def _recycle(m, n: int) -> None:
    """n requests, each recycling the only worker, each answered."""
    for i in range(n):
        pids = set(m.worker_pids()) or set(m.live_children())
        assert http_get(m.url + "/", timeout=20)[0] == 200, f"request {i}"
        wait_for(lambda p=pids: not p & set(m.live_children()), 20, f"recycle {i}")
        wait_for(lambda: len(m.live_children()) == 1, 20, f"replacement {i}")


def _exit_causes(m) -> list[str]:
    """Every exit the master logged, by cause (the journal may have lost some to the fault)."""
    return re.findall(r"event=worker_exit .*?cause=(\w+)", m.output())


@pytest.mark.parametrize("worker", ["sync", "uvicorn"])
def test_recycles_while_the_directory_is_removed_are_max_requests(
    worker, make_master, make_exporter, plain
):
    app = "plainapp:asgi_app" if worker == "uvicorn" else "plainapp:app"
    m = make_master(worker=worker, workers=1, app=app, args=RECYCLE_EVERY_REQUEST, env=plain)
    m.start(wait=False)
    wait_for(lambda: len(m.live_children()) == 1, 20, "a worker")
    for _ in range(4):
        remove(m.dir)
        _recycle(m, 3)
    wait_for(lambda: len(_exit_causes(m)) >= 12, 20, "every recycle recorded")
    assert set(_exit_causes(m)) == {"max_requests"}, _exit_causes(m)
    e = make_exporter()
    wait_for(lambda: set(exits(e.scrape())) == {("max_requests", "none")}, 20, "served")
    assert m.proc.poll() is None


@root_only
@pytest.mark.parametrize("worker", ["sync", "uvicorn"])
def test_recycles_on_a_full_disk_are_max_requests(worker, make_master, make_exporter, mount, plain):
    app = "plainapp:asgi_app" if worker == "uvicorn" else "plainapp:app"
    m = make_master(worker=worker, workers=1, app=app, args=RECYCLE_EVERY_REQUEST, env=plain)
    mount(own(m), "size=1m,mode=0700")
    m.start(wait=False)
    wait_for(lambda: len(m.live_children()) == 1, 20, "a worker")
    fill(own(m))
    _recycle(m, 2)
    fill(own(m))  # what the first workers' files freed, taken again
    _recycle(m, 20)
    wait_for(lambda: "event=directory_fault fault=no_space" in m.output(), 10, "the fault said")
    wait_for(lambda: len(_exit_causes(m)) >= 22, 20, "every recycle recorded")
    assert set(_exit_causes(m)) == {"max_requests"}, _exit_causes(m)
    (own(m) / "fill").unlink()
    e = make_exporter()
    wait_for(lambda: exits(e.scrape()).get(("max_requests", "none"), 0) >= 22, 20, "counted")
    assert set(exits(e.scrape())) == {("max_requests", "none")}


@pytest.mark.parametrize("worker", ["sync", "gthread", "gevent", "tornado", "uvicorn"])
def test_an_app_calling_os_exit_0_is_a_clean_exit(worker, make_master, make_exporter):
    m = make_master(worker=worker, workers=1).start()
    e = make_exporter()
    http_get(m.url + "/exit?code=0", timeout=10)
    wait_for(lambda: exits(e.scrape()) == {("clean_exit", "none"): 1.0}, 20, "a clean exit")


# An app that leaves with sys.exit(0) while it loads, the first time only.
EXITS_WHILE_LOADING = (
    "import os, sys\n"
    "_marker = os.path.join(os.path.dirname(__file__), 'loaded-once')\n"
    "if not os.path.exists(_marker):\n"
    "    open(_marker, 'w').close()\n"
    "    sys.exit(0)\n" + PLAIN_APP
)


@pytest.mark.parametrize("worker", ["sync", "uvicorn"])
def test_an_app_calling_sys_exit_0_while_loading_is_a_clean_exit(
    worker, tmp_path, make_master, make_exporter
):
    (tmp_path / "leavingapp.py").write_text(EXITS_WHILE_LOADING)
    attr = WORKER_CLASSES[worker][1].split(":")[1]
    m = make_master(
        worker=worker,
        workers=1,
        app=f"leavingapp:{attr}",
        env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
    ).start()
    e = make_exporter()
    wait_for(lambda: exits(e.scrape()) == {("clean_exit", "none"): 1.0}, 20, "a clean exit")
    assert m.proc.poll() is None


def test_gunicorns_own_timeout_traceback_shows_no_monitor_frame(make_master, make_exporter):
    """A sync worker timed out mid-request: Gunicorn logs the SystemExit its abort handler
    raised, with the frames it went through. None is the monitor's."""
    m = make_master(workers=1, env={"GUNICORN_TIMEOUT": "2"}).start()
    e = make_exporter()
    _in_background(m.url + "/sleep?s=60")
    wait_for(lambda: exits(e.scrape()) == {("timeout", "SIGABRT"): 1.0}, 30, "the timeout")
    log = m.output()
    start = log.index("Error handling request")
    traceback = log[start : log.index("SystemExit", start)]
    assert "in _sleep" in traceback, traceback  # the app's frames are there
    assert "/monitor/" not in traceback, traceback


def test_a_stray_signal_to_a_busy_sync_worker_keeps_its_traceback_clean(make_master, make_exporter):
    """SIGQUIT to a worker mid-request: Gunicorn's handle_quit raises SystemExit through the
    monitor's handler wrapper, which leaves its own frame out (Python 3.11 on)."""
    import sys

    m = make_master(workers=1).start()
    e = make_exporter()
    _in_background(m.url + "/sleep?s=60")
    layout = Layout(str(m.dir))
    [pid] = m.worker_pids()
    wait_for(lambda: inflight.read(layout, pid).requests, 10, "the request in flight")
    os.kill(pid, signal.SIGQUIT)
    wait_for(lambda: exits(e.scrape()) == {("signal", "SIGQUIT"): 1.0}, 20, "a stray SIGQUIT")
    log = m.output()
    start = log.index("Error handling request")
    traceback = log[start : log.index("SystemExit", start)]
    assert "in _sleep" in traceback, traceback
    if sys.version_info >= (3, 11):
        assert "/monitor/" not in traceback, traceback


# -- the channel itself, across real forks -------------------------------------------------------


class _Worker:
    pid: int | str = "[booting]"


def _fork(child) -> int:
    """Run `child()` in a forked process and wait for it: its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            child()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_the_channel_carries_the_first_signal_and_the_decision_across_a_fork():
    import time

    from monitor.hooks.channel import Channel

    channel = Channel()
    worker = _Worker()
    channel.give(worker, [])
    before = time.monotonic()

    def child() -> None:
        channel.claim(worker, known_class=True)
        channel.max_requests()
        channel.caught(signal.SIGTERM)
        channel.caught(signal.SIGINT)  # the first one caught stays
        channel.max_requests()  # so does the first decision
        # A process the app forks from the worker inherits the pages and writes nothing.
        _fork(lambda: channel.caught(signal.SIGQUIT))

    worker.pid = _fork(child)
    report = channel.take(worker)
    assert report is not None and report.known_class
    assert report.signal == signal.SIGTERM
    assert before < report.max_requests_at <= report.signal_at < time.monotonic()
    assert channel.take(worker) is None  # freed: read once


def test_a_slot_is_reused_zeroed_and_pages_are_added_as_needed():
    from monitor.hooks.channel import Channel

    channel = Channel()
    workers = [_Worker() for _ in range(200)]  # more than one page of slots
    for w in workers:
        channel.give(w, workers)
    assert len(channel.pages) > 1
    first = workers[0]
    first.pid = _fork(lambda: (channel.claim(first, True), channel.caught(signal.SIGTERM)))
    assert channel.take(first).signal == signal.SIGTERM
    again = _Worker()
    channel.give(again, workers[1:])
    again.pid = _fork(lambda: channel.claim(again, False))
    report = channel.take(again)
    assert report == type(report)(False, None, None, None)  # nothing of the slot's last worker
    # A worker Gunicorn forgot without a child_exit gives its slot back when slots run out.
    pages = len(channel.pages)
    more = [_Worker() for _ in range(len(channel.free) + 1)]
    for w in more:
        channel.give(w, more)  # `workers` are no longer live: their slots are taken back
    assert len(channel.pages) == pages
