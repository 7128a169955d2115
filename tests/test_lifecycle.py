"""Every worker exit, on every worker class, counted once with its true cause.

Each scenario is what an operator lives through, done for real: a Gunicorn master started with
the project's gunicorn.conf.py, real signals, a real scrape of the real exporter. After every
step the complete set of non-zero exit series must equal what was induced: nothing else moves.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

import psutil
import pytest

from tests.harness import CLASSES, ROOT, SUBCLASSES, exits, http_get, value, wait_for


def _background_get(url: str) -> threading.Thread:
    t = threading.Thread(target=http_get, args=(url, 60), daemon=True)
    t.start()
    return t


class Scenario:
    """Induce one event at a time and check the whole exit table after each."""

    def __init__(self, master, exporter) -> None:
        self.m, self.e = master, exporter
        self.expected: Counter = Counter()

    def expect(self, what: str, **new: int) -> dict:
        for key, n in new.items():
            cause, sig = key.split("__")
            self.expected[(cause, sig)] += n
        want = {k: float(v) for k, v in self.expected.items()}
        wait_for(lambda: exits(self.e.scrape()) == want, 30, what)
        return self.e.scrape()

    def replaced(self, before: list[int], n: int = 2) -> None:
        self.m.wait_workers(n, timeout=30)
        assert set(self.m.worker_pids()) != set(before)


def _timeout_paths(worker: str) -> tuple[str, str, str, str]:
    """(request that times out, expected signal, request that ignores SIGABRT, expected signal)."""
    if worker == "gthread":
        # gthread heartbeats from its main thread while requests sleep in the pool: only code
        # that holds the GIL stalls it, and then the SIGABRT handler cannot run either.
        return "/spin?s=60", "SIGKILL", "/spin?s=60", "SIGKILL"
    if worker in ("gevent", "eventlet"):
        # Their sleep yields to the heartbeat: a greenlet that never yields stalls it. In
        # Python bytecode the SIGABRT handler still runs; in one long C call it cannot.
        return "/busy?s=60", "SIGABRT", "/spin?s=60", "SIGKILL"
    return "/sleep?s=60", "SIGABRT", "/sleep?s=60&ignore_abort=1", "SIGKILL"


@pytest.mark.parametrize("worker", CLASSES)
def test_every_cause_on_a_running_master(worker, make_master, make_exporter):
    m = make_master(worker=worker, workers=2, env={"GUNICORN_TIMEOUT": "2"}).start()
    e = make_exporter()
    s = Scenario(m, e)
    first = s.expect("clean start")
    assert value(first, "gunicorn_up") == 1
    assert value(first, "gunicorn_workers") == 2
    assert value(first, "gunicorn_workers_desired") == 2

    # The seed's symptom: a stray `kill -TERM` on a worker. Not a deploy, not clean.
    pids = m.worker_pids()
    os.kill(pids[0], signal.SIGTERM)
    s.expect("external SIGTERM", signal__SIGTERM=1)
    s.replaced(pids)

    pids = m.worker_pids()
    os.kill(pids[0], signal.SIGKILL)
    s.expect("external SIGKILL without OOM evidence", killed__SIGKILL=1)
    s.replaced(pids)

    pids = m.worker_pids()
    os.kill(pids[0], signal.SIGSEGV)
    s.expect("external SIGSEGV", signal__SIGSEGV=1)
    s.replaced(pids)

    pids = m.worker_pids()
    http_get(m.url + "/exit?code=7", timeout=10)
    s.expect("os._exit(7)", crash__none=1)
    s.replaced(pids)

    stall, stall_sig, stubborn, stubborn_sig = _timeout_paths(worker)
    m.heartbeating()
    pids = m.worker_pids()
    _background_get(m.url + stall)
    s.expect("handler past --timeout", **{f"timeout__{stall_sig}": 1})
    s.replaced(pids)

    m.heartbeating()
    pids = m.worker_pids()
    _background_get(m.url + stubborn)
    after = s.expect("handler ignoring SIGABRT", **{f"timeout__{stubborn_sig}": 1})
    s.replaced(pids)
    assert value(after, "gunicorn_worker_aborts_total") == 2

    pids = m.worker_pids()
    m.signal(signal.SIGTTOU)
    s.expect("TTOU", scale_down__SIGTERM=1)
    m.wait_workers(1)
    wait_for(lambda: value(e.scrape(), "gunicorn_workers_desired") == 1, 10, "desired 1")

    # Serving: a tornado worker forgets a SIGTERM that reaches it before its run() starts
    # (Gunicorn's limit, README: run() sets `alive` again), and the one left may be the
    # replacement of the last timeout, still loading the app on a busy machine. The one worker
    # left answering a request is past that point; an age (heartbeating) was not enough.
    wait_for(lambda: http_get(m.url + "/", timeout=5)[0] == 200, 30, "the worker left serving")
    pids = m.worker_pids()
    m.signal(signal.SIGHUP)
    hup = s.expect("HUP reload", reload__SIGTERM=1)
    m.wait_workers(2, exclude=set(pids))
    assert value(hup, "gunicorn_master_reloads_total") == 1

    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    final = s.expect("master TERM", shutdown__SIGTERM=2)
    assert value(final, "gunicorn_up") == 0
    assert value(final, "gunicorn_workers") == 0
    assert value(final, "gunicorn_worker_spawns_total") == 2 + 6 + 2
    assert value(final, "gunicorn_worker_restarts_total") == 6
    assert value(final, "gunicorn_monitor_hook_errors_total") == 0
    assert "event=hook_failed" not in m.output()
    # The log says what the exit was, beside Gunicorn's own "was sent SIGTERM!".
    assert "event=worker_exit" in m.output() and "cause=signal signal=SIGTERM" in m.output()


@pytest.mark.parametrize("worker", CLASSES + SUBCLASSES)
def test_max_requests_recycles_are_max_requests(worker, make_master, make_exporter):
    m = make_master(worker=worker, workers=1, env={"GUNICORN_MAX_REQUESTS": "1"})
    # No start() probe: its request would recycle the worker before the count below starts, and
    # gunicorn <= 23's gthread drops a request that reaches a worker on its way out.
    m.start(wait=False).wait_workers(1)
    e = make_exporter()
    for i in range(5):
        pids = m.worker_pids()
        assert http_get(m.url + "/")[0] == 200
        want = {("max_requests", "none"): i + 1.0}
        wait_for(lambda w=want: exits(e.scrape()) == w, 20, f"recycle #{i}")
        m.wait_workers(1, exclude=set(pids))


@pytest.mark.parametrize("worker", CLASSES)
def test_a_worker_that_fails_to_boot_is_a_boot_error(worker, make_master, make_exporter, tmp_path):
    broken = tmp_path / "brokenapp.py"
    broken.write_text("raise RuntimeError('cannot import this app')\n")
    m = make_master(
        worker=worker,
        workers=1,
        app="brokenapp:app",
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}"},
    ).start(wait=False)
    assert m.wait_exit() == 3
    e = make_exporter()
    assert exits(e.scrape()) == {("boot_error", "none"): 1.0}


@pytest.mark.parametrize("worker", CLASSES)
def test_an_app_that_fails_to_load_is_an_app_load_error(worker, make_master, make_exporter):
    m = make_master(worker=worker, workers=1, app="examples.app:missing").start(wait=False)
    assert m.wait_exit() == 4
    e = make_exporter()
    assert exits(e.scrape()) == {("app_load_error", "none"): 1.0}


def test_quick_shutdown_by_sigint(make_master, make_exporter):
    m = make_master(workers=2).start()
    e = make_exporter()
    m.signal(signal.SIGINT)
    m.wait_exit()
    assert exits(e.scrape()) == {("shutdown", "SIGQUIT"): 2.0}


def test_counts_survive_a_new_master_and_stale_state(make_master, make_exporter):
    first = make_master(workers=1).start()
    e = make_exporter()
    os.kill(first.worker_pids()[0], signal.SIGKILL)
    wait_for(lambda: exits(e.scrape()) == {("killed", "SIGKILL"): 1.0}, 20, "first kill")
    first.wait_workers(1)
    # The master dies without its on_exit: its state file stays behind, stale.
    first.kill()
    wait_for(lambda: value(e.scrape(), "gunicorn_up") == 0, 10, "dead master is down")

    second = make_master(workers=1).start()
    os.kill(second.worker_pids()[0], signal.SIGKILL)
    # The first master's worker died with it, uncounted: the second counts it, once.
    want = {("killed", "SIGKILL"): 2.0, ("orphaned", "none"): 1.0}
    wait_for(lambda: exits(e.scrape()) == want, 20, "second kill")
    assert value(e.scrape(), "gunicorn_up") == 1
    second.wait_workers(1)
    samples = e.scrape()
    assert value(samples, "gunicorn_workers") == 1
    spawns = value(samples, "gunicorn_worker_spawns_total")
    assert spawns - sum(exits(samples).values()) == 1


def test_a_usr2_upgrade_retires_the_old_workers_as_reload(make_master, make_exporter):
    old = make_master(workers=2).start()
    e = make_exporter()
    old_workers = set(old.worker_pids())
    old.signal(signal.SIGUSR2)

    def new_master() -> int | None:
        for child in psutil.Process(old.pid).children():
            if (
                child.pid not in old_workers
                and (old.dir / "gunicorn-monitor").joinpath(f"master-{child.pid}.json").exists()
            ):
                return child.pid
        return None

    new_pid = wait_for(new_master, 20, "the new master")
    try:
        wait_for(lambda: value(e.scrape(), "gunicorn_workers") == 4, 20, "old and new workers")
        assert value(e.scrape(), "gunicorn_master_reloads_total") == 1
        old.signal(signal.SIGTERM)
        assert old.wait_exit() == 0
        samples = e.scrape()
        assert exits(samples) == {("reload", "SIGTERM"): 2.0}
        assert value(samples, "gunicorn_up") == 1
        assert value(samples, "gunicorn_workers") == 2
        assert http_get(old.url + "/")[0] == 200  # the new master serves on the same socket
    finally:
        new_workers = [p.pid for p in psutil.Process(new_pid).children()]
        os.kill(new_pid, signal.SIGKILL)
        for pid in new_workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_worker_outliving_graceful_timeout_is_a_shutdown_by_sigkill(make_master, make_exporter):
    """Gunicorn SIGKILLs it at the end of stop() and often never reaps it: on_exit does."""
    m = make_master(workers=2, env={"GUNICORN_GRACEFUL_TIMEOUT": "1"}).start()
    e = make_exporter()
    _background_get(m.url + "/sleep?s=60")
    wait_for(lambda: value(e.scrape(), "demo_requests_total", endpoint="/sleep") == 1, 10, "busy")
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    assert exits(e.scrape()) == {("shutdown", "SIGTERM"): 1.0, ("shutdown", "SIGKILL"): 1.0}
