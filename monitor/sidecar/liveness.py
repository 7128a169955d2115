"""Whether each live master is up: stopped, stalled or working (contract/heartbeat.py).

Judged once per scrape and shared: the kept-body inputs (sidecar/cache.py) judge first, and the
collection that follows them (collectors/lifecycle.py) serves those same verdicts, so a body is
never kept for inputs that judged otherwise. The inputs carry the verdict, never the beat: a
master that is up changes no input from one beat to the next, while the age of a master that is
not up is part of its verdict, so its scrapes are collected anew and the age keeps growing.
"""

from __future__ import annotations

import threading
import time

from monitor.contract import heartbeat, state
from monitor.contract.directory import Layout

FRESH = 1.0  # seconds a verdict is served again by the collection that follows its judging


class Liveness:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._judged: dict[tuple[int, int], tuple[float, heartbeat.Verdict | None]] = {}
        self._lock = threading.Lock()

    def judge(self, pid: int, ticks: int | None) -> heartbeat.Verdict | None:
        """The master `pid` started at `ticks` (its /proc start) now; None if that process no
        longer runs (gone, a zombie, or its pid given to another)."""
        found = state.proc(pid)
        if found is None or found.dead or (ticks is not None and found.ticks != ticks):
            verdict = None
        else:
            ticks = found.ticks
            verdict = heartbeat.judge(found.stopped, heartbeat.read(self.layout, pid, ticks))
        if ticks is not None:
            with self._lock:
                self._judged[(pid, ticks)] = (time.monotonic(), verdict)
        return verdict

    def recent(self, pid: int, ticks: int | None) -> heartbeat.Verdict | None:
        """The verdict judged for this scrape (within FRESH seconds), else judged now."""
        with self._lock:
            found = self._judged.get((pid, ticks)) if ticks is not None else None
        if found is not None and time.monotonic() - found[0] < FRESH:
            return found[1]
        return self.judge(pid, ticks)

    def forget_all_but(self, keys: set[tuple[int, int]]) -> None:
        """Verdicts of masters no longer recorded go (bounded by the masters on record)."""
        with self._lock:
            self._judged = {k: v for k, v in self._judged.items() if k in keys}
