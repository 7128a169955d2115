"""The masters' index (monitor/sidecar/masters.py): the same answer as parsing every state file,
at the cost of what changed; a backlog of dead masters' files is left to a background reader."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor.contract import directory, state
from monitor.contract.directory import Layout
from monitor.sidecar import masters
from monitor.sidecar.masters import MasterIndex
from tests.harness import write_master

GONE = 1_000_000  # pids from here on: no process has one
_HOLD = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], str(os.getpid())), os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return directory.create(str(tmp_path / "multiproc"))


@pytest.fixture
def live(layout: Layout) -> Iterator[subprocess.Popen]:
    """A real process recorded as a live master (its own pid and /proc start), holding the
    lock on its heartbeat file as a master does (state.Genuine: else it is `forged`)."""
    os.makedirs(layout.heartbeats, mode=0o700, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, layout.heartbeats], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    ticks = state.start_ticks(proc.pid)
    recorded = {"pid": proc.pid, "start_time": 1.0, "start_ticks": ticks, "version": "27.0.1"}
    state.write(layout, proc.pid, recorded | {"worker_class": "sync", "workers": {}})
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def parses(monkeypatch) -> list[int]:
    """The pids of the state files parsed from now on."""
    seen: list[int] = []
    parse = state.parse

    def counted(raw: object, pid: int) -> state.Master:
        seen.append(pid)
        return parse(raw, pid)

    monkeypatch.setattr(state, "parse", counted)
    return seen


def said(recorded: masters.Recorded) -> list[tuple[int, bool, bool]]:
    return sorted((m.pid, m.alive, m.stopped) for m in recorded.masters)


def test_a_look_parses_only_what_changed(layout, live, parses):
    for i in range(20):
        write_master(layout, GONE + i)
    Path(layout.own, "master-123x.json").write_bytes(b"{")  # malformed, counted at each look
    index = MasterIndex(layout)
    first = index.look()
    assert said(first) == said(masters.Recorded(*state.read_all(layout)))
    assert first.malformed == 1 and (live.pid, True, False) in said(first)
    parses.clear()
    assert index.look() == first and parses == []  # nothing changed: nothing parsed
    write_master(layout, GONE + 3, spawns=2, stopped=False)  # replaced: parsed again, alone
    assert (GONE + 3, False, False) in said(index.look())
    assert parses == [GONE + 3]
    version = index.version
    live.kill()
    live.wait()
    assert (live.pid, False, False) in said(index.look())  # dead, and no file parsed for it
    assert index.version > version and parses == [GONE + 3]
    os.unlink(os.path.join(layout.own, f"master-{GONE}.json"))
    assert GONE not in {m.pid for m in index.look().masters}
    assert said(index.look()) == said(masters.Recorded(*state.read_all(layout)))


def test_a_backlog_of_dead_masters_is_left_to_a_background_reader(layout, live, parses):
    n = masters.BACKLOG + 44
    for i in range(n):
        write_master(layout, GONE + i)
    index = MasterIndex(layout, background=True)
    first = index.look()
    assert said(first) == [(live.pid, True, False)]  # the live master at once, no dead one
    assert parses == [live.pid] and index.unread == n
    assert index.gone_at_start >= n  # their state files, and their count files
    write_master(layout, GONE + 7, stopped=False)  # what changes is parsed at the next look
    assert (GONE + 7, False, False) in said(index.look()) and index.unread == n - 1
    assert index.read_backlog(batch=100) == n - 1
    assert index.unread == 0
    assert len(index.look().masters) == n + 1
    assert said(index.look()) == said(masters.Recorded(*state.read_all(layout)))
