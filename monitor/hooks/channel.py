"""The worker-to-master channel: what a worker knows about its own exit, in memory it shares
with its master, with no file in between.

The master cannot see everything: a sync worker turns an external SIGTERM into a clean exit 0,
indistinguishable by its status from a max_requests recycle, and uvicorn counts its requests
itself. The worker knows, so it says it here, and the master reads it when it reaps the worker.
Through the shared directory, a removed, full, read-only or tampered directory would cost the
cause of an exit (a recycle read as `unknown`); a mapping made before the fork cannot be
removed, filled or swapped by anyone.

Protocol:
- The master maps anonymous shared pages (`mmap(-1, PAGE, MAP_SHARED)`), adding one when every
  slot is taken, never removing one. In pre_fork it zeroes a free slot and keeps its number on
  the worker object; the child inherits both the pages and the object.
- The worker (post_fork) claims the slot: its pid, then whether its class is one the monitor
  knows (so that an exit with no fact is its own, `clean_exit`, not missing evidence). Then it
  writes facts as they happen, each in its own aligned field, each with one C call
  (`struct.pack_into`): a signal handler that runs between two bytecodes can never tear or
  overwrite another fact. The first caught signal is one 16-byte store of (signal, time); a
  nested handler that lands between the check and the store writes its own, which the outer
  one then replaces: the signal caught first wins either way.
- Only the process that claimed the slot writes it: a process the app forks from a worker
  inherits the pages, and writes nothing.
- The master reads the slot in child_exit (the worker is dead: every store is visible), checks
  the pid in it, and frees it. One field it reads while the worker lives: why the worker could
  not create its in-flight table, if it could not (an errno, one aligned 4-byte store), so that
  the master says it once for all its workers instead of each worker in its own log.

Times are `time.monotonic()`: CLOCK_MONOTONIC, one clock for every process on Linux, so the
master compares the worker's moments with its own (the signals it sent) directly.

Slot (64 bytes): owner pid u32, flags u32, max_requests_at f64, signal u64 + signal_at f64,
table errno u32.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

PAGE = mmap.PAGESIZE
SLOT = 64
_PER_PAGE = PAGE // SLOT
_OWNER = struct.Struct("<II")  # pid, flags
_AT = struct.Struct("<d")
_SIGNAL = struct.Struct("<Qd")
_ERRNO = struct.Struct("<I")
_MAX_REQUESTS_AT = 8
_SIGNAL_AT = 16
_TABLE_ERRNO_AT = 32
KNOWN_CLASS = 1  # flag: the worker's class is in the worker-class table

ATTRIBUTE = "_gunicorn_monitor_slot"  # on the worker object: the slot's number


@dataclass(frozen=True)
class Report:
    """What a worker said about itself; times are monotonic, None when it never happened."""

    known_class: bool
    max_requests_at: float | None
    signal: int | None
    signal_at: float | None


class Channel:
    """One per process tree: the master hands out and reads slots, a worker writes its own."""

    def __init__(self) -> None:
        self.pages: list[mmap.mmap] = []
        self.free: list[int] = []
        self.held: dict[int, Any] = {}  # slot -> worker object, in the master
        self._mine: int | None = None  # in a worker: its slot
        self._pid = 0  # in a worker: the pid that claimed it

    # -- the master ---------------------------------------------------------------------------

    def give(self, worker: Any, live_workers: Any) -> None:
        """pre_fork: a zeroed slot for `worker`, its number kept on the worker object.

        A slot whose worker Gunicorn forgot without a child_exit (it found the pid gone when
        it signalled it) is taken back here, before a page is added."""
        if not self.free:
            live = {id(w) for w in live_workers}
            for slot, held in list(self.held.items()):
                if id(held) not in live:
                    del self.held[slot]
                    self.free.append(slot)
        if not self.free:
            base = len(self.pages) * _PER_PAGE
            self.pages.append(mmap.mmap(-1, PAGE, flags=mmap.MAP_SHARED))
            self.free.extend(range(base + _PER_PAGE - 1, base - 1, -1))
        slot = self.free.pop()
        page, offset = self._where(slot)
        page[offset : offset + SLOT] = bytes(SLOT)
        self.held[slot] = worker
        setattr(worker, ATTRIBUTE, slot)

    def take(self, worker: Any) -> Report | None:
        """child_exit: what the worker said, and its slot freed. None when it never claimed its
        slot (it died before post_fork ran), or had none."""
        slot = getattr(worker, ATTRIBUTE, None)
        if slot is None or self.held.get(slot) is not worker:
            return None
        del self.held[slot]
        self.free.append(slot)
        page, offset = self._where(slot)
        pid, flags = _OWNER.unpack_from(page, offset)
        if pid != worker.pid:
            return None
        (max_at,) = _AT.unpack_from(page, offset + _MAX_REQUESTS_AT)
        sig, sig_at = _SIGNAL.unpack_from(page, offset + _SIGNAL_AT)
        return Report(
            known_class=bool(flags & KNOWN_CLASS),
            max_requests_at=max_at or None,
            signal=sig or None,
            signal_at=sig_at if sig else None,
        )

    def table_error(self, worker: Any) -> int:
        """The errno a live worker met creating its in-flight table; 0 when none (yet)."""
        slot = getattr(worker, ATTRIBUTE, None)
        if slot is None or self.held.get(slot) is not worker:
            return 0
        page, offset = self._where(slot)
        if _OWNER.unpack_from(page, offset)[0] != worker.pid:
            return 0  # not claimed yet
        return _ERRNO.unpack_from(page, offset + _TABLE_ERRNO_AT)[0]

    # -- the worker ---------------------------------------------------------------------------

    def claim(self, worker: Any, known_class: bool) -> None:
        """post_fork, in the new worker: the slot the master gave it is its own."""
        slot = getattr(worker, ATTRIBUTE, None)
        if slot is None:
            return
        self._mine, self._pid = slot, os.getpid()
        page, offset = self._where(slot)
        _OWNER.pack_into(page, offset, self._pid, KNOWN_CLASS if known_class else 0)

    def max_requests(self) -> None:
        """The worker decided to leave after max_requests: now (the first time only)."""
        where = self._own()
        if where is not None and not _AT.unpack_from(where[0], where[1] + _MAX_REQUESTS_AT)[0]:
            _AT.pack_into(where[0], where[1] + _MAX_REQUESTS_AT, time.monotonic())

    def caught(self, signum: int) -> None:
        """The worker caught `signum`: kept only if it is the first it caught."""
        where = self._own()
        if where is not None and not _SIGNAL.unpack_from(where[0], where[1] + _SIGNAL_AT)[0]:
            _SIGNAL.pack_into(where[0], where[1] + _SIGNAL_AT, signum, time.monotonic())

    def no_table(self, errno: int) -> None:
        """The worker could not create its in-flight table (hooks/capture.py), for `errno`."""
        where = self._own()
        if where is not None:
            _ERRNO.pack_into(where[0], where[1] + _TABLE_ERRNO_AT, errno)

    def _own(self) -> tuple[mmap.mmap, int] | None:
        if self._mine is None or os.getpid() != self._pid:
            return None
        return self._where(self._mine)

    def _where(self, slot: int) -> tuple[mmap.mmap, int]:
        return self.pages[slot // _PER_PAGE], (slot % _PER_PAGE) * SLOT


# The one channel of this process: the master's, inherited by every worker it forks.
CHANNEL = Channel()
