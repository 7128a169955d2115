"""A failing monitor hook never takes Gunicorn down: it is contained, logged once, counted."""

from __future__ import annotations

import os
import signal

import psutil

from tests.harness import FAILING_WORKER_HOOK, exits, http_get, value, wait_for


def test_an_unwritable_state_file_costs_nothing_but_a_log_line(make_master, make_exporter):
    m = make_master(workers=2).start()
    e = make_exporter()
    # The state file's path becomes a directory: every later state write in the master fails.
    state = m.dir / "gunicorn-monitor" / f"master-{m.pid}.json"
    state.unlink()
    (state / "blocker").mkdir(parents=True)
    for n in (1, 2, 3):
        # The harness cannot read the state file any more: ask the kernel for the workers.
        kids = wait_for(lambda: len(c := m.live_children()) == 2 and c, 20)
        os.kill(kids[0], signal.SIGKILL)
        wait_for(lambda n=n: exits(e.scrape()).get(("killed", "SIGKILL")) == n, 20, f"kill {n}")
    # The state is written once per turn of the master's loop, after it manages its workers:
    # a file of ours that cannot be replaced is a fault of the directory, said once, counted.
    wait_for(
        lambda: value(e.scrape(), "gunicorn_monitor_directory_faults_total", fault="replaced") == 1,
        10,
        "the fault counted",
    )
    assert m.proc.poll() is None, "the master must survive"
    assert http_get(m.url + "/")[0] == 200
    assert m.output().count("event=directory_fault fault=replaced") == 1
    assert "Traceback" not in m.output()


def test_a_failing_worker_hook_does_not_stop_the_worker(make_master, make_exporter):
    m = make_master(workers=2, user_hooks=FAILING_WORKER_HOOK).start()
    e = make_exporter()
    assert http_get(m.url + "/")[0] == 200
    assert exits(e.scrape()) == {}
    assert "event=hook_failed hook=post_worker_init" in m.output()


def test_a_hup_with_the_directory_gone_keeps_the_master(make_master, tmp_path):
    m = make_master(workers=1).start()
    old = set(m.worker_pids())
    # The directory disappears under the running master, and its path becomes unusable.
    m.dir.rename(tmp_path / "moved")
    m.dir.write_text("not a directory any more")
    m.signal(signal.SIGHUP)
    wait_for(lambda: "(kept running)" in m.output(), 10, "one line about it")
    # Reloaded: a new worker runs (the demo app's own metrics have nowhere to go now, which is
    # the app's business), and the master that re-read its config is still there.
    wait_for(
        lambda: {c.pid for c in psutil.Process(m.pid).children()} - old, 20, "a reloaded worker"
    )
    assert m.proc.poll() is None, "the master must survive its own config reload"
