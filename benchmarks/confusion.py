"""The confusion matrix of exit causes: every cause induced on every declared worker class, with
real Gunicorn masters and real signals, against the cause the monitor reported.

    .venv/bin/python benchmarks/confusion.py [--repeat N] [--classes sync,gevent,...]

Each induction runs on a fresh master (the project's gunicorn.conf.py, a fresh directory), so
each exit in the journal is the induced one. The classes are the test suite's declared ones
(tests/harness.py; eventlet only where the installed Gunicorn still ships it: run it under the
oldest-versions venv too). Prints one matrix per class, rows induced and columns reported, and
exits non-zero if any exit was reported as another cause.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gunicorn  # noqa: E402

from tests.harness import (  # noqa: E402
    CLASSES,
    ROOT,
    SUBCLASSES,
    WORKER_CLASSES,
    Master,
    http_get,
    wait_for,
)

CAUSES = [
    "reload",
    "shutdown",
    "scale_down",
    "max_requests",
    "timeout",
    "killed",
    "signal",
    "crash",
    "clean_exit",
    "boot_error",
    "app_load_error",
]


def _asgi(worker: str) -> bool:
    return WORKER_CLASSES[worker][1].endswith("asgi_app")


def _background(url: str) -> None:
    threading.Thread(target=http_get, args=(url, 60), daemon=True).start()


def _exits(m: Master) -> list[dict]:
    path = m.dir / "gunicorn-monitor" / "events.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return [r for r in map(json.loads, lines) if r.get("event") == "exit"]


def _stall(worker: str) -> str:
    """A request that stops the worker's heartbeat (see tests/test_lifecycle.py)."""
    if worker == "gthread":
        return "/spin?s=60"
    if worker in ("gevent", "eventlet"):
        return "/busy?s=60"
    return "/sleep?s=60"


# Each induction: (master keyword arguments, what to do to the running master).
def _inductions(worker: str, tmp: Path) -> dict[str, list[tuple[dict, Callable[[Master], None]]]]:
    recycle = ("--max-requests", "1", "--max-requests-jitter", "0")
    broken = tmp / "brokenapp.py"
    broken.write_text("raise RuntimeError('cannot import this app')\n")
    attr = WORKER_CLASSES[worker][1].split(":")[1]

    def kill_worker(sig: int) -> Callable[[Master], None]:
        return lambda m: os.kill(m.worker_pids()[0], sig)

    def request(path: str) -> Callable[[Master], None]:
        return lambda m: http_get(m.url + path, timeout=10)

    def timeout(m: Master) -> None:
        m.heartbeating()
        _background(m.url + _stall(worker))

    def hup_while_finishing(m: Master) -> None:
        _background(m.url + ("/asleep?s=3" if _asgi(worker) else "/sleep?s=3"))
        said = "Maximum request limit" if worker.startswith("uvicorn") else "Autorestarting"
        wait_for(lambda: said in m.output(), 10, "the decision")
        m.signal(signal.SIGHUP)

    plan = {
        "reload": [({}, lambda m: m.signal(signal.SIGHUP))],
        "shutdown": [({}, lambda m: m.signal(signal.SIGTERM))],
        "scale_down": [({"workers": 2}, lambda m: m.signal(signal.SIGTTOU))],
        "max_requests": [({"args": recycle, "wait": False}, request("/"))],
        "timeout": [({"env": {"GUNICORN_TIMEOUT": "2"}}, timeout)],
        "killed": [({}, kill_worker(signal.SIGKILL))],
        "signal": [({}, kill_worker(signal.SIGTERM)), ({}, kill_worker(signal.SIGSEGV))],
        "crash": [({}, request("/exit?code=7"))],
        "clean_exit": [({}, request("/exit?code=0"))],
        "boot_error": [
            (
                {"app": f"brokenapp:{attr}", "wait": False, "env": {"PYTHONPATH": f"{tmp}:{ROOT}"}},
                lambda m: None,
            )
        ],
        "app_load_error": [({"app": "examples.app:missing", "wait": False}, lambda m: None)],
    }
    # Tornado decides at connection close, after the request: a HUP during it came first.
    if worker != "tornado":
        plan["max_requests"].append(({"args": recycle, "wait": False}, hup_while_finishing))
    return plan


def induce(worker: str, kwargs: dict, act: Callable[[Master], None], tmp: Path) -> str:
    """Start a master, do `act`, return the cause of its first worker exit ('-' if none)."""
    kwargs = dict(kwargs)
    wait = kwargs.pop("wait", True)
    env = {"GUNICORN_TIMEOUT": "30", **kwargs.pop("env", {})}
    shared = Path(tempfile.mkdtemp(dir=tmp)) / "multiproc"
    shared.mkdir()
    m = Master(shared, worker=worker, workers=kwargs.pop("workers", 1), env=env, **kwargs)
    try:
        m.start(wait=wait)
        if not wait and "app" not in kwargs:
            m.wait_workers(1)
        act(m)
        found = wait_for(lambda: _exits(m), 40, f"{worker}: an exit")
        return found[0].get("cause", "-")
    except AssertionError:
        return "-"
    finally:
        m.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="inductions of each kind")
    parser.add_argument("--classes", default=",".join(CLASSES + SUBCLASSES))
    args = parser.parse_args()
    classes = [c for c in args.classes.split(",") if c]
    wrong = 0
    summary: list[tuple[str, int, int]] = []
    started = time.monotonic()
    print(f"gunicorn {gunicorn.__version__}, Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="confusion-") as tmpdir:
        tmp = Path(tmpdir)
        for worker in classes:
            matrix: dict[str, collections.Counter] = {}
            for cause, ways in _inductions(worker, tmp).items():
                counts = matrix.setdefault(cause, collections.Counter())
                for _ in range(args.repeat):
                    for kwargs, act in ways:
                        counts[induce(worker, kwargs, act, tmp)] += 1
            misreported = _print(worker, matrix)
            summary.append((worker, sum(sum(c.values()) for c in matrix.values()), misreported))
            wrong += misreported
    total = time.monotonic() - started
    print("\nclass: exits induced, misreported")
    for worker, induced, misreported in summary:
        print(f"  {worker}: {induced}, {misreported}")
    print(f"{'all exact' if not wrong else f'{wrong} exits misreported'} ({total:.0f} s)")
    return 1 if wrong else 0


def _print(worker: str, matrix: dict[str, collections.Counter]) -> int:
    reported = sorted({c for counts in matrix.values() for c in counts}, key=_order)
    label = len("induced \\ reported") + 2
    total = sum(sum(counts.values()) for counts in matrix.values())
    wrong = sum(n for cause, counts in matrix.items() for c, n in counts.items() if c != cause)
    print(f"\n{worker} ({WORKER_CLASSES[worker][0]}): {total - wrong}/{total} exact")
    print("induced \\ reported".ljust(label) + " ".join(reported))
    for cause, counts in matrix.items():
        cells = " ".join(str(counts.get(c, "") or ".").rjust(len(c)) for c in reported)
        print(cause.ljust(label) + cells)
    return wrong


def _order(cause: str) -> int:
    return CAUSES.index(cause) if cause in CAUSES else len(CAUSES)


if __name__ == "__main__":
    sys.exit(main())
