"""Each master's heartbeat: when its loop last turned, for the sidecar to judge it up or not.

A master that is alive is not always working: stopped (SIGSTOP, a debugger), or wedged in a
hook of the user's that never returns, it still runs, reaps nothing and restarts nothing.
So each master writes, at most once a second and only from its own loop (once per turn, or from
the reaping of a graceful stop), its CLOCK_MONOTONIC reading into `heartbeat/<master pid>`, and
the sidecar judges (`judge`):

- stopped: /proc says `T` or `t`: not up, at once;
- stalled: its loop has not turned for longer than STALL_SECONDS: not up;
- otherwise up. A heartbeat that cannot be read (a master of an earlier version, a file not
  written yet) says nothing: the master is then judged by its process state alone.

Gunicorn's loop turns at least once a second (it waits for signals for one second at most), so
STALL_SECONDS is ten missed turns; a HUP that loads a preloaded app for longer than that reads as
a stall while it loads (GunicornMasterDown waits longer than that before it fires).

The file, 32 bytes: `gmbeat01`, the master's pid (u32), 4 reserved bytes, its start ticks
(/proc, u64: a file a dead master of the same pid left says nothing of a new one), and the beat
(a double, seconds). Written whole once, then only the beat, by an in-place pwrite of 8 aligned
bytes: no rename, so the directory and the file's inode never change with a beat, and the
sidecar's kept-body inputs (sidecar/cache.py) carry its judgement, never the beat. A reader reads
twice and takes two equal reads.

CLOCK_MONOTONIC is one clock for every process of a kernel (the sidecar beside Gunicorn, in a pod
or a compose project, shares it; a time namespace would not, and is used by neither); a step of
the wall clock moves none of it.

The file also carries the ownership of the master's counts (contract/state.py, "Who writes a
master's files"): whoever holds an flock on it writes `counter_<pid>.db` and its siblings.
"""

from __future__ import annotations

import math
import os
import struct
import time
from dataclasses import dataclass

from monitor.contract import directory
from monitor.contract.directory import Layout

STALL_SECONDS = 10.0
BEAT_EVERY = 1.0  # a master writes at most this often
MAGIC = b"gmbeat01"
_FORMAT = struct.Struct("<8sIIQd")
SIZE = _FORMAT.size
BEAT_AT = SIZE - 8
_BEAT = struct.Struct("<d")
assert SIZE == 32
# O_NONBLOCK: a FIFO put in a heartbeat's place must not hang whoever opens it.
FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def path(layout: Layout, pid: int) -> str:
    return os.path.join(layout.heartbeats, str(pid))


def still_linked(hb_fd: int, name: str, fd: int) -> bool:
    """Is the locked file still the one at heartbeat/<name> (not removed or replaced)? Asked
    by whoever holds the lock that says who writes a master's files (contract/state.py)."""
    try:
        st = os.stat(name, dir_fd=hb_fd, follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def encode(pid: int, ticks: int, beat: float) -> bytes:
    return _FORMAT.pack(MAGIC, pid, 0, ticks, beat)


def encode_beat(beat: float) -> bytes:
    return _BEAT.pack(beat)


def decode(data: bytes, pid: int, ticks: int) -> float | None:
    """The beat of `pid` started at `ticks`, or None: too short, another format, another master."""
    if len(data) != SIZE:
        return None
    magic, found_pid, _, found_ticks, beat = _FORMAT.unpack(data)
    if magic != MAGIC or found_pid != pid or found_ticks != ticks or not math.isfinite(beat):
        return None
    return beat


def read(layout: Layout, pid: int, ticks: int) -> float | None:
    """The master's last beat (its CLOCK_MONOTONIC seconds), or None when there is none to read.
    Read through the readers' checked directory fds, never through a symlink."""
    try:
        fd = open_for_reading(layout, pid)
    except OSError:
        return None
    try:
        return read_fd(fd, pid, ticks)
    finally:
        os.close(fd)


def read_fd(fd: int, pid: int, ticks: int) -> float | None:
    """The beat in an open heartbeat file, as `read`; None if it cannot be read."""
    try:
        for _ in range(3):
            first = os.pread(fd, SIZE, 0)
            if first == os.pread(fd, SIZE, 0):  # not torn by a write in between
                return decode(first, pid, ticks)
        return None
    except OSError:  # a directory or a device in its place
        return None


def open_for_reading(layout: Layout, pid: int) -> int:
    """The heartbeat file of `pid`, opened by the readers' rules (OSError if it cannot be)."""
    own = directory.open_own_for_reading(layout)
    try:
        hb = directory.open_subdir_for_reading(own, directory.HEARTBEATS, layout.heartbeats)
    finally:
        os.close(own)
    try:
        return os.open(str(pid), os.O_RDONLY | FLAGS, dir_fd=hb)
    finally:
        os.close(hb)


@dataclass(frozen=True)
class Verdict:
    """A live master, judged: stopped by a signal, how long since its loop turned (None when
    no heartbeat could be read), and what follows."""

    stopped: bool
    age: float | None

    @property
    def stalled(self) -> bool:
        return self.age is not None and self.age > STALL_SECONDS

    @property
    def up(self) -> bool:
        return not self.stopped and not self.stalled


def judge(stopped: bool, beat: float | None, now: float | None = None) -> Verdict:
    """The verdict on a live master from its process state and its last beat. A beat ahead of
    `now` (a master in another time namespace) is no evidence of a stall: age unknown."""
    if beat is None:
        return Verdict(stopped, None)
    age = (time.monotonic() if now is None else now) - beat
    return Verdict(stopped, max(0.0, age) if age > -1.0 else None)
