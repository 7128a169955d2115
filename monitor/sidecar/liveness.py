"""Whether each live master is up: stopped, stalled or working (contract/heartbeat.py).

Judged once per scrape and shared: the kept-body inputs (sidecar/cache.py) judge first, and the
collection that follows them (collectors/lifecycle.py) serves those same verdicts, so a body is
never kept for inputs that judged otherwise. The inputs carry the verdict, never the beat: a
master that is up changes no input from one beat to the next, while the age of a master that is
not up is part of its verdict, so its scrapes are collected anew and the age keeps growing.

Each live master's /proc stat and heartbeat files are kept open between scrapes (`_Files`),
read again by pread: opening them anew, through the checked directories, was most of what one
more master cost a scrape (benchmarks/exporter_cost.py, 4 masters of 16 workers). A kept stat
file answers for the process it was opened for only (ESRCH once it is gone, even if its pid is
reused), and a heartbeat file no longer linked (its directory removed and written again, say)
is opened anew by its name.
"""

from __future__ import annotations

import os
import threading
import time

from monitor.contract import heartbeat, state
from monitor.contract.directory import Layout

FRESH = 1.0  # seconds a verdict is served again by the collection that follows its judging


class Liveness:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._judged: dict[tuple[int, int], tuple[float, heartbeat.Verdict | None]] = {}
        self._kept: dict[tuple[int, int], _Files] = {}  # closed only by _close
        self._lock = threading.Lock()

    def judge(self, pid: int, ticks: int | None) -> heartbeat.Verdict | None:
        """The master `pid` started at `ticks` (its /proc start) now; None if that process no
        longer runs (gone, a zombie, or its pid given to another)."""
        with self._lock:
            key, verdict = self._judge(pid, ticks)
            if key is not None:
                self._judged[key] = (time.monotonic(), verdict)
        return verdict

    def _judge(
        self, pid: int, ticks: int | None
    ) -> tuple[tuple[int, int] | None, heartbeat.Verdict | None]:
        key = (pid, ticks) if ticks is not None else None
        files = self._kept.get(key) if key is not None else None
        if files is None:
            try:
                fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return key, None
            files = _Files(self.layout, pid, fd)
            found = state.proc_of(fd)
            if found is None or found.dead or (ticks is not None and found.ticks != ticks):
                files.close()
                return key, None
            if key is None:  # a state file without ticks (an earlier version): not kept
                try:
                    key = (pid, found.ticks)
                    return key, heartbeat.judge(found.stopped, files.beat(found.ticks))
                finally:
                    files.close()
            self._kept[key] = files
        else:
            found = state.proc_of(files.stat)
            if found is None or found.dead:
                self._close(key)
                return key, None
        return key, heartbeat.judge(found.stopped, files.beat(key[1]))

    def _close(self, key: tuple[int, int]) -> None:
        files = self._kept.pop(key, None)
        if files is not None:
            files.close()

    def recent(self, pid: int, ticks: int | None) -> heartbeat.Verdict | None:
        """The verdict judged for this scrape (within FRESH seconds), else judged now."""
        with self._lock:
            found = self._judged.get((pid, ticks)) if ticks is not None else None
        if found is not None and time.monotonic() - found[0] < FRESH:
            return found[1]
        return self.judge(pid, ticks)

    def forget_all_but(self, keys: set[tuple[int, int]]) -> None:
        """Verdicts and kept files of masters no longer recorded go (bounded by the masters on
        record)."""
        with self._lock:
            self._judged = {k: v for k, v in self._judged.items() if k in keys}
            for key in [k for k in self._kept if k not in keys]:
                self._close(key)


class _Files:
    """A live master's /proc stat file and its heartbeat file (-1 while none could be opened),
    kept open between judgements."""

    def __init__(self, layout: Layout, pid: int, stat: int) -> None:
        self.layout, self.pid, self.stat, self.hb = layout, pid, stat, -1

    def beat(self, ticks: int) -> float | None:
        """Its last beat (heartbeat.read), through the kept file while it is still linked."""
        if self.hb >= 0:
            try:
                linked = os.fstat(self.hb).st_nlink > 0
            except OSError:
                linked = False
            if not linked:
                os.close(self.hb)
                self.hb = -1
        if self.hb < 0:
            try:
                self.hb = heartbeat.open_for_reading(self.layout, self.pid)
            except OSError:
                return None
        return heartbeat.read_fd(self.hb, self.pid, ticks)

    def close(self) -> None:
        os.close(self.stat)
        if self.hb >= 0:
            os.close(self.hb)
            self.hb = -1
