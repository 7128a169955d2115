"""The faults benchmarks/churn.py does to the shared directory while workers churn, and when.

- `Tmpfs`: the directory lives on a small real tmpfs (mounted as root), so that it can be filled;
  unmounted at the end.
- `remove`: `rm -rf` of the directory itself while the masters run, repeated for a few seconds
  (each time it comes back it is removed again); recreated by the masters' hooks, or by the
  driver right after the last removal, as a deploy script that clears the directory does.
- `fill`: one file takes every free byte of the tmpfs, and is topped up while the fault lasts
  (a reaped worker's files free a little space), then removed.

`Faults` keeps each fault's window (monotonic times), so that the driver can tell which faults a
request overlapped: on the app that writes its own prometheus_client files there, a request's
outcome depends on them (churn.py says how).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REMOVED, FULL, SIDECAR = "removed", "full", "sidecar"


@dataclass
class Window:
    kind: str
    began: float  # monotonic
    exits_before: int
    ended: float | None = None
    exits_after: int = 0
    detail: str = ""


class Faults:
    """The faults done so far, each with its window; thread-safe."""

    def __init__(self, exits: Callable[[], int]) -> None:
        self.exits = exits
        self.windows: list[Window] = []
        self.lock = threading.Lock()

    def begin(self, kind: str) -> Window:
        window = Window(kind, time.monotonic(), self.exits())
        with self.lock:
            self.windows.append(window)
        return window

    def end(self, window: Window, detail: str) -> None:
        with self.lock:
            window.ended, window.detail = time.monotonic(), detail
        window.exits_after = self.exits()

    def during(self, t0: float, t1: float) -> frozenset[str]:
        """The kinds of fault whose window overlapped [t0, t1] (an open one: up to now)."""
        with self.lock:
            return frozenset(
                w.kind for w in self.windows if w.began <= t1 and (w.ended is None or w.ended >= t0)
            )

    def last_end(self, kind: str) -> float | None:
        """When the last fault of this kind ended (None if none has, or one is open)."""
        with self.lock:
            ends = [w.ended for w in self.windows if w.kind == kind]
        return None if not ends or None in ends else max(ends)  # type: ignore[type-var]

    def first_begin(self, kind: str) -> float | None:
        with self.lock:
            begins = [w.began for w in self.windows if w.kind == kind]
        return min(begins) if begins else None


class Tmpfs:
    """A tmpfs of `size` mounted at `path` (needs root), unmounted by `close`."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            check=True,
        )

    def used(self) -> int:
        fs = os.statvfs(self.path)
        return (fs.f_blocks - fs.f_bfree) * fs.f_frsize

    def close(self) -> None:
        # Lazily: a process we could not kill may still hold a file there.
        subprocess.run(["umount", "-l", str(self.path)], check=False)


def remove(shared: Path, faults: Faults, seconds: float, recreate: bool) -> None:
    """`rm -rf` the directory, again each time it comes back, for `seconds`; then it is
    recreated (by the driver if `recreate`, else by the masters' hooks at their next event)."""
    window = faults.begin(REMOVED)
    removals = 0
    deadline = time.monotonic() + seconds
    while True:
        for _ in range(50):  # ENOTEMPTY while a master or a worker creates a file in it
            shutil.rmtree(shared, ignore_errors=True)
            if not shared.exists():
                break
        removals += 1
        if time.monotonic() > deadline:
            break
        _wait(lambda: shared.exists() or time.monotonic() > deadline, 0.01)
    gone_at = time.monotonic()
    if recreate:
        shared.mkdir(mode=0o700, exist_ok=True)
    _wait(lambda: shared.exists(), 0.01, 60)
    by = "the driver (mkdir)" if recreate else "the masters"
    faults.end(
        window,
        f"rm -rf {removals} times in {gone_at - window.began:.1f} s, then recreated by {by}"
        f" {time.monotonic() - gone_at:.2f} s after the last",
    )


def fill(mount: Path, faults: Faults, hold: float) -> None:
    """One file takes every free byte of the tmpfs for `hold` seconds, topped up meanwhile."""
    path = mount / "fill"
    window = faults.begin(FULL)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        _top_up(fd)
        filled = os.fstat(fd).st_size
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            time.sleep(0.2)
            _top_up(fd)
        grown = os.fstat(fd).st_size - filled
    finally:
        os.close(fd)
        os.unlink(path)
    faults.end(
        window,
        f"a file took every free byte ({filled / 2**20:.1f} MiB, {grown / 2**10:.0f} KiB more"
        f" while held), removed after {hold:.0f} s",
    )


def _top_up(fd: int) -> None:
    """Write until ENOSPC (what `dd if=/dev/zero` does)."""
    for chunk in (1 << 20, 4096, 512):
        try:
            while True:
                os.write(fd, b"\0" * chunk)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise


def _wait(condition: Callable[[], bool], every: float, timeout: float | None = None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while not condition():
        if deadline is not None and time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the directory to come back")
        time.sleep(every)
