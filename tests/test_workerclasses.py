"""The worker-class table names real classes, and resolves a user's subclass as its base.

Every entry is checked against the classes the installed releases really ship (the matrix runs
this on both ends of the version range), so a module that moves between releases fails here
rather than in production, where the class would silently resolve to nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import gunicorn
import pytest

from monitor.contract import workerclasses
from tests.harness import ROOT

# The eventlet worker is gone from Gunicorn 26.0 on.
_GONE = {"eventlet"} if gunicorn.version_info >= (26,) else set()


# Run in a child process: importing a worker module may monkey-patch the interpreter
# (Gunicorn 25's eventlet worker does it on import).
_RESOLVE = """
import importlib, sys, warnings
from monitor.contract import workerclasses
from tests.harness import ROOT
warnings.simplefilter("ignore", DeprecationWarning)  # uvicorn.workers says it is deprecated
module, _, name = sys.argv[1].rpartition(".")
try:
    cls = getattr(importlib.import_module(module), name)
except ImportError:
    print("missing")
    sys.exit()
Custom = type("Custom", (cls,), {"__module__": "someapp.workers"})
print(workerclasses.resolve(cls).name, workerclasses.resolve(Custom).name)
"""


def _resolved(qualified: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _RESOLVE, qualified],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.parametrize("entry", workerclasses.CLASSES, ids=lambda e: e.name)
def test_every_entry_names_a_class_the_installed_releases_ship(entry):
    for base in entry.bases:
        if entry.name in _GONE:
            assert _resolved(base) == ["missing"], f"{base} on gunicorn {gunicorn.__version__}"
        else:
            # The class itself, and a subclass in a user's module (uvicorn-gunicorn-docker).
            assert _resolved(base) == [entry.name, entry.name], base


def test_the_gunicorn_worker_class_setting_resolves_through_gunicorn_itself():
    from gunicorn.util import load_class

    for uri, name in [
        ("sync", "sync"),
        ("gthread", "gthread"),
        ("uvicorn_worker.UvicornWorker", "uvicorn"),
        ("uvicorn_worker.UvicornH11Worker", "uvicorn"),
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            cls = load_class(uri)
        assert workerclasses.resolve(cls).name == name, uri


def test_an_unknown_class_resolves_to_none():
    from gunicorn.workers.base import Worker

    assert workerclasses.resolve(Worker) is None
    assert workerclasses.resolve(object) is None


def test_capacity_follows_the_settings_that_bound_concurrency():
    class Cfg:
        threads = 4
        worker_connections = 50

    by_name = {e.name: e for e in workerclasses.CLASSES}
    assert by_name["sync"].capacity(Cfg) == 1
    assert by_name["gthread"].capacity(Cfg) == 4
    assert by_name["gevent"].capacity(Cfg) == 50
    assert by_name["uvicorn"].capacity(Cfg) == 50
    assert by_name["tornado"].capacity(Cfg) == 1
