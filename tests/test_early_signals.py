"""A worker signalled before it has finished booting is classified like any other.

Gunicorn installs the worker's own signal handlers only in init_process, and the app is imported
after that: a stray SIGTERM can land while the worker still runs the master's handlers (Gunicorn
queues it and forgets it), or while the app is still importing (a sync worker then leaves with
exit 0 once it has booted). Either way it was a stray SIGTERM: `signal` / `SIGTERM`.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.harness import CLASSES, PLAIN_APP, ROOT, WORKER_CLASSES, exits, wait_for

# Gunicorn's TornadoWorker.run() sets `alive = True` as it starts serving, which forgets a
# SIGTERM handled while it booted: that worker keeps running, and there is no exit to count.
EARLY = [c for c in CLASSES if c != "tornado"]

# The worker signals itself from its own post_fork hook: the earliest moment user code runs in a
# new worker, 0 ms after the fork, before Gunicorn's worker has installed any handler.
SELF_KILL = """
import os as _os, signal as _signal


def post_fork(server, worker):
    if worker.age <= 2:  # the first two workers only; their replacements must live
        _os.kill(_os.getpid(), _signal.SIGTERM)

"""


@pytest.mark.parametrize("worker", EARLY)
def test_a_sigterm_at_0_ms_after_the_fork_is_a_stray_sigterm(worker, make_master, make_exporter):
    m = make_master(worker=worker, workers=2, user_hooks=SELF_KILL).start()
    e = make_exporter()
    wait_for(lambda: exits(e.scrape()) == {("signal", "SIGTERM"): 2.0}, 20, "two stray SIGTERMs")
    assert m.proc.poll() is None


# A slow import: the worker is booting for this long.
SLOW_APP = "import time\n\ntime.sleep(1.5)\n" + PLAIN_APP


@pytest.mark.parametrize("worker", EARLY)
def test_a_sigterm_while_the_app_imports_is_a_stray_sigterm(
    worker, tmp_path, make_master, make_exporter
):
    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    attr = WORKER_CLASSES[worker][1].split(":")[1]
    m = make_master(
        worker=worker,
        workers=1,
        app=f"slowapp:{attr}",
        env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
    )
    m.start(wait=False)
    e = make_exporter()
    # Kill each of the first two workers as soon as it appears: booting, the app not yet loaded.
    killed: list[int] = []

    def kill_new() -> bool:
        for pid in set(m.live_children()) - set(killed):
            os.kill(pid, signal.SIGTERM)
            killed.append(pid)
        return len(killed) >= 2

    wait_for(kill_new, 30, "two workers seen booting")
    wait_for(lambda: exits(e.scrape()) == {("signal", "SIGTERM"): 2.0}, 30, "two stray SIGTERMs")
    m.wait_workers(1, exclude=set(killed), timeout=30)
    assert m.proc.poll() is None
