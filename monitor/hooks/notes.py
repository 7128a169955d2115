"""What a worker says about itself on its way out, for the master to read when it reaps it.

The master cannot see everything: a sync worker turns an external SIGTERM into a clean exit 0,
indistinguishable from a max_requests recycle by its status alone. The worker knows, so it
leaves a one-word note (`SIGTERM`, `max_requests`) that the master reads in child_exit. The
first note wins: a worker recycling after max_requests that then gets SIGTERM left because of
max_requests.
"""

from __future__ import annotations

import os

from monitor.contract.directory import Layout


def leave(layout: Layout, pid: int, text: str) -> None:
    try:
        fd = os.open(layout.note(pid), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def take(layout: Layout, pid: int) -> str | None:
    path = layout.note(pid)
    try:
        with open(path) as f:
            text = f.read(64).strip()
    except FileNotFoundError:
        return None
    os.unlink(path)
    return text or None


def discard_stale(layout: Layout) -> None:
    """Notes of pids that no longer run are from workers of an earlier master."""
    try:
        names = os.listdir(layout.notes)
    except FileNotFoundError:
        return
    for name in names:
        try:
            os.kill(int(name), 0)
        except (ValueError, ProcessLookupError):
            try:
                os.unlink(os.path.join(layout.notes, name))
            except OSError:
                pass
        except PermissionError:
            pass
