"""What a worker says about itself on its way out, for the master to read when it reaps it.

The master cannot see everything: a sync worker turns an external SIGTERM into a clean exit 0,
indistinguishable from a max_requests recycle by its status alone. The worker knows, so it
leaves a one-word note (`SIGTERM`, `max_requests`) that the master reads in child_exit. The
first note wins: a worker recycling after max_requests that then gets SIGTERM left because of
max_requests.

A note only refines a cause, so a worker that cannot leave one (the directory is gone, full,
read-only, or not safe to write) says nothing: the master watches the same directory and
reports its faults, once. Notes are written under `notes/` opened level by level without
following symlinks, and created O_EXCL: a worker never writes through a symlink.
"""

from __future__ import annotations

import os

from monitor.contract import directory, state
from monitor.contract.directory import Layout

_MAX = 64  # bytes of a note worth reading


def leave(layout: Layout, pid: int, text: str) -> None:
    try:
        own = directory.open_private(layout, create=False)
    except OSError:
        return
    try:
        notes = directory.open_notes(own, layout)
    except OSError:
        os.close(own)
        return
    os.close(own)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(str(pid), flags, 0o600, dir_fd=notes)
        try:
            os.write(fd, text.encode()[:_MAX])
        finally:
            os.close(fd)
    except OSError:
        pass  # FileExistsError: the first note wins; anything else: see the module docstring
    finally:
        os.close(notes)


def take(own_fd: int, layout: Layout, pid: int) -> str | None:
    """The note of a reaped worker, removed; None when it left none (or it is unreadable)."""
    try:
        notes = directory.open_notes(own_fd, layout, create=True)
    except OSError:
        return None
    try:
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # never a FIFO hang
            fd = os.open(str(pid), flags, dir_fd=notes)
        except OSError:
            return None
        try:
            text = os.read(fd, _MAX).decode(errors="replace").strip()
        finally:
            os.close(fd)
        os.unlink(str(pid), dir_fd=notes)
        return text or None
    except OSError:
        return None
    finally:
        os.close(notes)


def discard_stale(own_fd: int, layout: Layout) -> None:
    """Notes of pids that no longer run are from workers of an earlier master."""
    try:
        notes = directory.open_notes(own_fd, layout, create=True)
    except OSError:
        return
    try:
        for name in os.listdir(notes):
            if not state.names_live_pid(name):
                try:
                    os.unlink(name, dir_fd=notes)
                except OSError:
                    pass
    finally:
        os.close(notes)
