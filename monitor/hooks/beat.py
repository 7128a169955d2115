"""The master's heartbeat (contract/heartbeat.py), and the lock on it that makes the master the
one writer of its counts (contract/state.py, "Who writes a master's files").

Safety rules, as everywhere in the hooks:

- At most one beat a second, from the master's loop: the directory fd the recorder checked, the
  checked `heartbeat/` below it, the file opened by name with O_NOFOLLOW | O_NONBLOCK (a symlink
  or a FIFO put in its place is removed, never followed or waited on), one pwrite, closed.
- The only fd kept is the lock's, read-only (it never pins a mount writable), closed exactly
  once: by the master when it stops or the file is replaced, or by a forked child at once
  (a child closing its copy releases nothing of the master's; it never unlocks).
- Never waits: the lock is taken with LOCK_NB. Held by another process (a master still counting
  the orphans of a dead master of our pid), our counts wait in memory and are written once it
  lets go; any other failure to take it is no reason to hold counts back.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time

from monitor.contract import directory
from monitor.contract import heartbeat as contract
from monitor.contract.directory import Layout

log = logging.getLogger("gunicorn.error")

_CREATE = os.O_CREAT | contract.FLAGS


def _open(hb_fd: int, name: str, mode: int) -> int:
    """Open (creating) a heartbeat file; a symlink or FIFO in its place is removed first."""
    try:
        fd = os.open(name, mode | _CREATE, 0o600, dir_fd=hb_fd)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENXIO):
            raise
        os.unlink(name, dir_fd=hb_fd)
        fd = os.open(name, mode | _CREATE, 0o600, dir_fd=hb_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        os.unlink(name, dir_fd=hb_fd)
        fd = os.open(name, mode | _CREATE, 0o600, dir_fd=hb_fd)
    return fd


def lock(hb_fd: int, name: str) -> int | None:
    """An fd holding LOCK_EX on heartbeat/<name> (created if missing), or None if another process
    holds it. OSError when it cannot be opened. The caller closes the fd once."""
    fd = _open(hb_fd, name, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


still_linked = contract.still_linked  # the sidecar's retirement asks it too


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class Heartbeat:
    """One master's: `beat` once per loop turn, `owned` before its counts are written."""

    def __init__(self, layout: Layout, pid: int, ticks: int) -> None:
        self.layout = layout
        self.pid = pid
        self.ticks = ticks
        self.name = str(pid)
        self.waiting = False  # the lock is held by another process: counts wait
        self._last = -contract.BEAT_EVERY
        self._lock = -1
        self._lock_id: tuple[int, int] | None = None
        self._whole: tuple[int, int] | None = None  # the file we last wrote whole

    def beat(self, own_fd: int, force: bool = False) -> None:
        """Write the beat (at most every BEAT_EVERY seconds unless `force`); OSError on failure."""
        now = time.monotonic()
        if not force and now - self._last < contract.BEAT_EVERY:
            return
        hb = directory.open_heartbeats(own_fd, self.layout, create=True)
        try:
            fd = _open(hb, self.name, os.O_WRONLY)
            try:
                st = os.fstat(fd)
                ident = (st.st_dev, st.st_ino)
                if ident == self._whole and st.st_size == contract.SIZE:
                    data, at = contract.encode_beat(now), contract.BEAT_AT
                else:
                    data, at = contract.encode(self.pid, self.ticks, now), 0
                if os.pwrite(fd, data, at) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
                self._whole = ident
            finally:
                os.close(fd)
            if self._lock_id != ident:
                self._hold(hb)
        finally:
            os.close(hb)
        self._last = now

    def owned(self, own_fd: int) -> bool:
        """May our counts be written now? Only False while another process holds the lock."""
        if self._lock >= 0:
            return True
        try:
            hb = directory.open_heartbeats(own_fd, self.layout, create=True)
        except OSError:
            return True
        try:
            self._hold(hb)
        except OSError:
            return True
        finally:
            os.close(hb)
        return not self.waiting

    def _hold(self, hb: int) -> None:
        self._release()
        fd = lock(hb, self.name)
        if fd is None and not self.waiting:
            log.warning(
                "gunicorn-monitor event=counts_waiting path=%s reason=%r",
                contract.path(self.layout, self.pid),
                "another master is counting the orphans of a dead master of this pid; "
                "counts are kept in memory and written once it is done",
            )
        self.waiting = fd is None
        if fd is not None:
            st = os.fstat(fd)
            self._lock, self._lock_id = fd, (st.st_dev, st.st_ino)

    def _release(self) -> None:
        fd, self._lock, self._lock_id = self._lock, -1, None
        if fd >= 0:
            close_quietly(fd)

    def moved(self) -> None:
        """The directory was removed or replaced: the lock held is on a file nobody can open
        any more, so it guards nothing; `owned` takes the new directory's."""
        self._release()

    def forked(self) -> None:
        """In a forked child: its copy of the lock fd goes; the master's lock stays held."""
        self._release()

    def remove(self, own_fd: int) -> None:
        """At the master's stop: its state says stopped, so the heartbeat has nothing to say."""
        try:
            hb = directory.open_heartbeats(own_fd, self.layout)
        except OSError:
            hb = -1
        try:
            if hb >= 0 and self._lock >= 0 and still_linked(hb, self.name, self._lock):
                os.unlink(self.name, dir_fd=hb)
        finally:
            if hb >= 0:
                os.close(hb)
            self._release()
