"""A real kernel OOM kill is `oom`, and a plain `kill -9` beside it stays `killed`.

The master runs inside a memory cgroup of its own with a small limit; a worker allocates past
it and the kernel kills it. cgroup v1 is writable as root on these machines, v2 where present.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from tests.harness import CLASSES, exits, http_get, wait_for

LIMIT = 256 * 1024 * 1024
V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


def _make_cgroup() -> Path:
    name = f"gunicorn-monitor-test-{uuid.uuid4().hex[:8]}"
    if (V1 / "cgroup.procs").exists():
        path = V1 / name
        try:
            path.mkdir()
            (path / "memory.limit_in_bytes").write_text(str(LIMIT))
            return path
        except OSError as e:
            pytest.skip(f"cgroup v1 memory controller not writable: {e}")
    if "memory" in (V2 / "cgroup.controllers").read_text(errors="ignore").split():
        path = V2 / name
        try:
            path.mkdir()
            (path / "memory.max").write_text(str(LIMIT))
            (path / "memory.swap.max").write_text("0")
            return path
        except OSError as e:
            pytest.skip(f"cgroup v2 memory controller not writable: {e}")
    pytest.skip("no writable memory cgroup (neither v1 nor v2) on this machine")


@pytest.fixture
def cgroup():
    path = _make_cgroup()
    yield path
    procs = path / "cgroup.procs"
    for pid in procs.read_text().split() if procs.exists() else []:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not procs.exists() or not procs.read_text().split(), 10, "cgroup empty")
    path.rmdir()


@pytest.mark.parametrize("worker", CLASSES)
def test_a_kernel_oom_kill_is_oom_and_kill_9_is_killed(worker, cgroup, make_master, make_exporter):
    enter = f'echo $$ > {cgroup}/cgroup.procs && exec "$@"'
    m = make_master(worker=worker, workers=2, prefix=("sh", "-c", enter, "sh")).start()
    e = make_exporter()

    pids = m.worker_pids()
    http_get(m.url + "/alloc?mb=512", timeout=30)
    wait_for(lambda: exits(e.scrape()) == {("oom", "SIGKILL"): 1.0}, 30, "OOM kill recorded")
    m.wait_workers(2, timeout=30)
    assert set(m.worker_pids()) != set(pids)

    os.kill(m.worker_pids()[0], signal.SIGKILL)
    want = {("oom", "SIGKILL"): 1.0, ("killed", "SIGKILL"): 1.0}
    wait_for(lambda: exits(e.scrape()) == want, 30, "kill -9 beside an OOM kill")
    assert "Perhaps out of memory" in m.output()  # Gunicorn's guess, which we replace with facts
