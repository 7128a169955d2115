"""Which entries of a directory may have changed since the last look: the kernel says.

Why: with folding off, the app's directory keeps a set of files for every worker that ever
lived, and listing 100,000 entries costs tens of milliseconds: a scrape must not pay that when
no entry was added, removed or renamed. inotify names each entry that was (one ioctl and a read
a look, plus what changed; inotify_simple wraps the system calls). The watch is on the directory
this holds open, never on a path that could be swapped: files are opened under that fd.

A look answers None, "list the directory whole", when the events cannot be trusted to be all:
the first look, a directory replaced (another inode at the path) or gone, a watch lost, or the
event queue overflowed (fs.inotify.max_queued_events changes between two looks).

Where inotify cannot be had (fs.inotify.max_user_instances reached, a kernel without it, no
/proc), the directory's own stat stands in: adding, removing or renaming an entry moves its
mtime and ctime. Those come from the kernel's coarse clock, one tick (1 to 10 ms) at a time, so
a change in the same tick as a listing can leave them as they were: a stat less than two ticks
old when the directory was listed does not vouch for the next look, which lists again. In that
mode any change costs a full listing; it is logged once.

Neither sees a file rewritten in place under the same name (mmap writes move no timestamp):
the caller reads the files of live processes on every look, and the app index audits the
whole directory in the background (monitor/sidecar/appindex.py, RESCAN).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable

log = logging.getLogger("gunicorn_monitor")

try:
    from inotify_simple import INotify, flags

    _MASK = (
        flags.CREATE
        | flags.DELETE
        | flags.MOVED_FROM
        | flags.MOVED_TO
        | flags.DELETE_SELF
        | flags.MOVE_SELF
        | flags.ONLYDIR
    )
    _LOST = flags.Q_OVERFLOW | flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF | flags.UNMOUNT
except ImportError:  # pragma: no cover - a dependency; stat mode if it is missing
    INotify = None  # type: ignore[assignment,misc]

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)  # the clock of file times; 5 in <linux/time.h>
try:
    _TICK = time.clock_getres(_COARSE) * 1e9
except OSError:
    _TICK = 10e6  # the coarsest jiffy (HZ=100)


class DirWatch:
    """`look()`: the names that may have changed since the last look, or None: list it whole.

    `fd` is the directory as last opened (O_NOFOLLOW), for listing it and opening its files;
    None while it does not exist. `mode` is "inotify" or "stat".
    """

    def __init__(
        self, path: str, use_inotify: bool = True, opener: Callable[[], int] | None = None
    ) -> None:
        """`opener`: how the directory is opened (an fd the caller's checks vouch for, e.g.
        contract/directory.py's readers' rules); by default `path`, without following a
        symlink."""
        self.path = path
        self._opener = opener or (lambda: os.open(path, _DIR))
        self.fd: int | None = None
        self._id: tuple[int, int] | None = None
        self._inotify = None
        self._wd = -1
        self._want_inotify = use_inotify and INotify is not None
        self.mode = "inotify" if self._want_inotify else "stat"
        self._listed: tuple | None = None  # stat mode: the stat a full listing vouches for

    def look(self) -> set[str] | None:
        """Names that may have changed, or None. FileNotFoundError while the directory is
        missing (its fd is closed then)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            self.close()
            raise
        if self.fd is None or (st.st_dev, st.st_ino) != self._id:
            self._open()
            return None
        if self._inotify is not None:
            names = set()
            for event in self._inotify.read(timeout=0):
                if event.wd != self._wd:
                    continue  # the watch of a directory replaced since
                if event.mask & _LOST:
                    if not event.mask & flags.Q_OVERFLOW:
                        self.close()  # the watched directory went: open anew next look
                    return None
                names.add(event.name)
            return names
        key = (st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        if key == self._listed:
            return set()
        fresh = time.clock_gettime_ns(_COARSE) - max(key[:2]) < 2 * _TICK
        self._listed = None if fresh else key
        return None

    def _open(self) -> None:
        self.close()
        fd = self._opener()
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):  # O_DIRECTORY says so already; belt and braces
            os.close(fd)
            raise NotADirectoryError(self.path)
        self.fd, self._id = fd, (st.st_dev, st.st_ino)
        if self._want_inotify:
            try:
                if self._inotify is None:
                    self._inotify = INotify(nonblocking=True)
                # The fd's own directory, whatever the path names by now.
                self._wd = self._inotify.add_watch(f"/proc/self/fd/{fd}", _MASK)
                self.mode = "inotify"
                return
            except OSError as e:
                self._stop_inotify()
                self._want_inotify = False
                log.warning(
                    "event=dir_watch_unavailable dir=%s mode=stat error=%r: every change to "
                    "the directory costs a listing of it",
                    self.path,
                    e,
                )
        self.mode = "stat"
        self._listed = None

    def _stop_inotify(self) -> None:
        if self._inotify is not None:
            notify, self._inotify = self._inotify, None
            notify.close()  # ours alone: closed once
        self._wd = -1

    def close(self) -> None:
        """Forget the directory: the next look opens it anew and answers None."""
        if self._inotify is not None and self._wd >= 0:
            try:
                self._inotify.rm_watch(self._wd)
            except OSError:
                pass  # already gone with its directory
        self._wd = -1
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
        self._id = None
        self._listed = None
