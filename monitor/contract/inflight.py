"""What a worker is doing right now, in a small file it owns, readable while the worker is wedged.

When the master aborts a worker, that worker cannot answer questions: it may hold the GIL in a
C call. So each worker keeps its state where the master can read it without the worker's help:
`gunicorn-monitor/live/<pid>.inflight`, created by the worker right after the fork, with a fixed
size, and updated in place through a shared mapping (a store into memory, no system call per
request). Next to it, `<pid>.stacks` receives the worker's thread stacks, written by
`faulthandler` from C when the master sends CAPTURE_SIGNAL.

Safety:
- The worker maps only a file it has just created itself (directory.create_file: O_CREAT |
  O_EXCL | O_NOFOLLOW, relative to the fd of `live/` the master checked and handed it at the
  fork), allocated with posix_fallocate before it is mapped: nobody else's file is ever
  truncated or mapped through a name swapped in, and a full disk fails the creation (the
  worker then simply has no table) instead of raising SIGBUS on a later store.
- Only the worker writes it; the master only reads it (pread, never a mapping, relative to
  the same checked fd, never through a symlink or into a FIFO) and removes it once the worker
  is reaped.
- A slot is busy while its start time is not 0. The worker writes the method and path of a
  request first and its start time last (one aligned 8-byte store), and frees the slot by
  zeroing the start time: a reader never pairs a start time with another request's path. A
  reader reads each slot twice; a slot that changed in between is read again, a few times,
  then reported as unreadable: a gap, not a guess.

Layout: a 64-byte header, then `capacity` slots of 256 bytes.
"""

from __future__ import annotations

import mmap
import os
import signal
import stat
import struct
import time
from dataclasses import dataclass

from monitor.contract import directory, state
from monitor.contract.directory import Layout

LIVE = "live"
# A real-time signal no Gunicorn worker class, uvicorn or faulthandler's defaults touch:
# Gunicorn's Worker.init_signals resets only its own list, so the handler survives it.
CAPTURE_SIGNAL = signal.SIGRTMIN + 7
MAX_CAPACITY = 1024

_MAGIC = b"gmflight"
# magic pid capacity phase armed tracks forked ready overflow served
_HEADER = struct.Struct("<8sIIBBBxddQQ")
_SERVED = struct.Struct("<Q")
_SERVED_AT = _HEADER.size - _SERVED.size
_HEADER_SIZE = 64
# A slot: 8 reserved bytes, started (monotonic; 0.0 when free), method, path length, path.
_STARTED = struct.Struct("<d")
_REQUEST = struct.Struct("<16sH222s")
_SLOT = struct.Struct("<8xd16sH222s")
_SLOT_SIZE = _SLOT.size
assert _SLOT_SIZE == 256

BOOTING, READY = 0, 1


def live_dir(layout: Layout) -> str:
    return os.path.join(layout.own, LIVE)


def table_name(pid: int) -> str:
    return f"{pid}.inflight"


def stacks_name(pid: int) -> str:
    return f"{pid}.stacks"


def _size(capacity: int) -> int:
    return _HEADER_SIZE + capacity * _SLOT_SIZE


class Table:
    """The worker's side. Slots are handed out from a free list: one per request in flight.

    pop() and append() on a list are atomic under the GIL, so gthread's pool threads share it
    without a lock, and a slot belongs to one request at a time.
    """

    def __init__(self, mm: mmap.mmap, pid: int, capacity: int, tracks: bool) -> None:
        self._mm = mm
        self._pid = pid
        self._capacity = capacity
        self._tracks = tracks
        self._armed = False
        self._ready = 0.0
        self._forked = time.monotonic()
        self._overflow = 0
        self._served = 0
        self._free = list(range(capacity - 1, -1, -1))
        self._offsets = [_HEADER_SIZE + i * _SLOT_SIZE for i in range(capacity)]
        self._header(BOOTING)

    @classmethod
    def create(cls, live_fd: int, pid: int, capacity: int, tracks: bool) -> Table:
        """A new table in the checked directory `live_fd`; OSError when it cannot be made."""
        capacity = max(0, min(capacity, MAX_CAPACITY))
        size = _size(capacity)
        # Ours, new, allocated: ENOSPC here, never SIGBUS later (the module's docstring).
        fd = directory.create_file(live_fd, table_name(pid), os.O_RDWR, size)
        try:
            mm = mmap.mmap(fd, size)  # the mapping keeps its own reference to the file
        finally:
            os.close(fd)
        return cls(mm, pid, capacity, tracks)

    def _header(self, phase: int) -> None:
        _HEADER.pack_into(
            self._mm,
            0,
            _MAGIC,
            self._pid,
            self._capacity,
            phase,
            self._armed,
            self._tracks,
            self._forked,
            self._ready,
            self._overflow,
            self._served,
        )

    def armed(self) -> None:
        """faulthandler is registered for CAPTURE_SIGNAL: the master may send it."""
        self._armed = True
        self._header(READY if self._ready else BOOTING)

    def ready(self, tracks: bool) -> None:
        """The boot is over; `tracks`: whether this worker reports its requests after all (a
        class without request hooks whose app could not be wrapped does not)."""
        self._ready = time.monotonic()
        self._tracks = tracks
        self._header(READY)

    # acquire/release run on every request: a few stores into the mapping, nothing else.
    def acquire(self, method: str, path: str) -> int:
        try:
            i = self._free.pop()
        except IndexError:
            self._overflow += 1  # more requests than slots: counted, said in the capture
            self._header(READY)
            return -1
        raw = path.encode("utf-8", "replace")
        off = self._offsets[i]
        # The request first, its start time last: the slot turns busy only once it is whole.
        _REQUEST.pack_into(self._mm, off + 16, method.encode(), min(len(raw), 222), raw)
        _STARTED.pack_into(self._mm, off + 8, time.monotonic())
        return i

    def release(self, i: int) -> None:
        self._served += 1  # gthread's threads may race here: a count off by one, never a hang
        _SERVED.pack_into(self._mm, _SERVED_AT, self._served)
        if i >= 0:
            _STARTED.pack_into(self._mm, self._offsets[i] + 8, 0.0)
            self._free.append(i)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    started: float  # time.monotonic() of the worker: the same clock as the master's on Linux


@dataclass(frozen=True)
class Snapshot:
    pid: int
    ready: bool
    armed: bool
    tracks: bool  # this worker reports its requests (hooks, or its app wrapped)
    forked: float  # monotonic
    ready_at: float  # monotonic, 0.0 while booting
    requests: tuple[Request, ...]
    unreadable: int  # slots that changed under every read
    overflow: int  # requests that found no free slot
    served: int  # requests finished


def read(layout: Layout, pid: int) -> Snapshot | None:
    """The worker's table, by the directory's path (`gunicorn-monitor status`); see read_at."""
    try:
        own = directory.open_own_for_reading(layout)
    except OSError:
        return None
    try:
        live = directory.open_subdir_for_reading(own, LIVE, live_dir(layout))
    except OSError:
        return None
    finally:
        os.close(own)
    try:
        return read_at(live, pid)
    finally:
        os.close(live)


def read_at(live_fd: int, pid: int) -> Snapshot | None:
    """The worker's table in the directory `live_fd` (-1: none), or None when it has none
    (creation failed, or another pid's, or not a table)."""
    if live_fd < 0:
        return None
    try:
        fd = directory.open_file(live_fd, table_name(pid))
    except OSError:
        return None
    try:
        head = os.pread(fd, _HEADER.size, 0)
        if len(head) < _HEADER.size:
            return None
        magic, fpid, cap, phase, armed, tracks, forked, ready_at, overflow, served = _HEADER.unpack(
            head
        )
        if magic != _MAGIC or fpid != pid or cap > MAX_CAPACITY:
            return None
        requests, unreadable = [], 0
        for i in range(cap):
            slot = _read_slot(fd, _HEADER_SIZE + i * _SLOT_SIZE)
            if slot is None:
                unreadable += 1
            elif slot.started:
                requests.append(slot)
    finally:
        os.close(fd)
    return Snapshot(
        pid,
        phase == READY,
        bool(armed),
        bool(tracks),
        forked,
        ready_at,
        tuple(requests),
        unreadable,
        overflow,
        served,
    )


def _read_slot(fd: int, off: int) -> Request | None:
    for _ in range(3):
        first = os.pread(fd, _SLOT_SIZE, off)
        second = os.pread(fd, _SLOT_SIZE, off)
        if len(first) < _SLOT_SIZE or first != second:
            continue
        started, method, n, path = _SLOT.unpack(first)
        return Request(
            method.rstrip(b"\0").decode("ascii", "replace"),
            path[: min(n, 222)].decode("utf-8", "replace"),
            started,
        )
    return None


def read_stack(live_fd: int, pid: int, offset: int, limit: int) -> tuple[str, bool]:
    """What the worker's stacks file holds from `offset` on (at most `limit` bytes), and
    whether there was more; empty when there is no such file to read (or no `live_fd`)."""
    if live_fd < 0:
        return "", False
    try:
        fd = directory.open_file(live_fd, stacks_name(pid))
    except OSError:
        return "", False
    try:
        data = os.pread(fd, limit + 1, offset)
    except OSError:
        return "", False
    finally:
        os.close(fd)
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


def stacks_size(live_fd: int, pid: int) -> int:
    """The size of the worker's stacks file (0 when there is none, or it is not a file)."""
    if live_fd < 0:
        return 0
    try:
        st = os.stat(stacks_name(pid), dir_fd=live_fd, follow_symlinks=False)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def discard(live_fd: int, pid: int) -> None:
    """A reaped worker's files, from the directory `live_fd` (nothing without one)."""
    if live_fd < 0:
        return
    for name in (table_name(pid), stacks_name(pid)):
        try:
            os.unlink(name, dir_fd=live_fd)
        except OSError:
            pass


def discard_stale(live_fd: int) -> None:
    """Files of pids that no longer run are from workers of an earlier master."""
    for name in os.listdir(live_fd):
        if not state.names_live_pid(name.split(".", 1)[0]):
            try:
                os.unlink(name, dir_fd=live_fd)
            except OSError:
                pass
