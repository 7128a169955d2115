"""The master's handle on `gunicorn-monitor/`: opened safely, checked every loop turn, and
every fault of it said once, counted, and recovered from by itself.

What can happen to a shared directory under a running master, and what this does about it:

- removed (`rm -rf`), or replaced by another directory: the path no longer leads to the
  directory we hold, so it is reopened, recreated 0700 if missing, and the recorder rewrites
  every file whole from its counts in memory;
- made read-only, full (ENOSPC), out of inodes, unreadable: every write raises an OSError,
  which is classified into a fixed set of faults (metrics.DIRECTORY_FAULT_KINDS); writes are
  retried on the next event and at least once per turn of the master's loop;
- made unsafe (a symlink, another user's, writable by others): refused until fixed;
- a file of ours removed or replaced (garbage, a symlink): rewritten whole (store.py);
- a subdirectory it holds (`live/`, `captures/`) removed, replaced, or made unsafe: checked
  once per turn of the master's loop (`check_subdirs`), recreated 0700 when missing, refused
  while unsafe (`held` then has nothing to hand out: workers forked meanwhile have no in-flight
  table, and captures are logged, not saved).

Each fault kind is logged once when it starts (`event=directory_fault`), then nothing until a
whole round of writes succeeds (`event=directory_recovered`), and counted in
gunicorn_monitor_directory_faults_total{fault}, which reaches the disk with the next successful
write. Gunicorn never sees any of it: no exception leaves `session`, and nothing here blocks.

The fds held are the directory's and its subdirectories' (O_RDONLY: none pins a mount
writable). Each is closed exactly once, with the number forgotten first. A forked child closes
its copies at once, except the one of `live/`, which a worker takes in post_fork (`handed`) to
create its own files in, relative to the directory its master checked: a worker resolves no
path at all.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable

from monitor.contract import captures, directory, inflight
from monitor.contract.directory import Layout

log = logging.getLogger("gunicorn.error")

# The subdirectories of `gunicorn-monitor/` held open from one loop turn to the next; the first
# is handed to every worker forked.
SUBDIRS = (inflight.LIVE, captures.DIR)
HANDED = inflight.LIVE

# A fault is over once writes have succeeded for this long without a single failure. Space
# and inodes come and go by the byte and by the file while others write beside us (a worker's
# note, a file freed by a reap): without a hold-down, one fault reads as a burst of faults.
HOLD_SECONDS = 3.0

_KINDS = {
    errno.ENOENT: "missing",
    errno.ENOTDIR: "missing",
    errno.EROFS: "read_only",
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "no_space",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
    errno.ELOOP: "unsafe",
    errno.EISDIR: "replaced",  # a directory where a file of ours goes: it cannot be replaced
    errno.ENOTEMPTY: "replaced",
}


class Disk:
    def __init__(self, layout: Layout, count: Callable[[str], None]) -> None:
        self.layout = layout
        self.owner = os.getpid()
        self.generation = 0  # goes up each time a different directory is opened
        self._count = count
        self._fd = -1
        self._id: tuple[int, int] | None = None
        self._active: dict[str, str] = {}  # fault kind -> what was said about it
        self._failed_at = 0.0  # monotonic time of the last failure
        self._subdirs: dict[str, tuple[int, tuple[int, int]]] = {}  # name -> fd, (dev, ino)
        self._handed = -1  # in a forked child: its copy of the fd of HANDED, until taken
        # Told of each subdirectory (name, fd) when it is opened anew; must not raise.
        self.opened: Callable[[str, int], None] = lambda name, fd: None

    # -- the directory fd ---------------------------------------------------------------------

    def fd(self) -> int:
        """The checked fd of `gunicorn-monitor/`, reopened (and recreated) when the path no
        longer leads to the directory we hold; OSError (DirectoryError) when it cannot be."""
        if self._fd >= 0:
            try:
                top = os.stat(self.layout.root, follow_symlinks=False)
                own = os.stat(self.layout.own, follow_symlinks=False)
            except OSError:
                top = own = None
            if own is not None and (own.st_dev, own.st_ino) == self._id:
                # The same directory, but its owner or mode may have changed under us: then
                # nothing below it is handed out either until it is fixed.
                try:
                    directory.check_private(top, self.layout.root, top=True)
                    directory.check_private(own, self.layout.own)
                except OSError:
                    for name in list(self._subdirs):
                        self._drop(name)
                    raise
                return self._fd
            self._close()
            # Removed, or another directory put in its place: said once, then recreated or
            # reopened below, and everything is written whole into it.
            gone = errno.ENOENT if own is None else errno.EEXIST
            self.fault(OSError(gone, f"{self.layout.own} was removed or replaced"), "missing")
        fd = directory.open_private(self.layout, create=True)
        st = os.fstat(fd)
        self._fd, self._id = fd, (st.st_dev, st.st_ino)
        self.generation += 1
        return fd

    def _close(self) -> None:
        fd, self._fd, self._id = self._fd, -1, None
        for name in list(self._subdirs):
            self._drop(name)
        _close_quietly(fd)

    def forked(self) -> None:
        """In a forked child (a worker): the master's directory is not the child's to write.
        Its copies of the fds are closed once, in the child, but for HANDED's: see `handed`."""
        self.owner = -1
        found = self._subdirs.pop(HANDED, None)
        self._handed = found[0] if found is not None else -1
        self._close()

    def handed(self) -> int:
        """In a worker: its copy of the fd of `live/` its master held at the fork, checked at
        the master's last loop turn, or -1 when the master had none (or it was taken). The
        caller owns it and closes it once."""
        fd, self._handed = self._handed, -1
        return fd

    # -- the subdirectories -----------------------------------------------------------------

    def held(self, name: str) -> int:
        """The fd of the subdirectory `name` as checked at the last loop turn, or -1 while
        there is none (not yet, refused, or the directory itself at fault). Never reopened
        here: between two checks the master uses the very directory it checked (a fd is an
        inode; whatever its name later leads to, nothing of ours goes anywhere else)."""
        found = self._subdirs.get(name) if os.getpid() == self.owner else None
        return found[0] if found is not None else -1

    def check_subdirs(self, fd: int) -> None:
        """A session step: each of SUBDIRS below the checked `fd`, still the one held and still
        ours alone; reopened (created 0700) when its name no longer leads to it. OSError
        (UnsafeDirectory: refused, nothing held) after trying each."""
        failed: OSError | None = None
        for name in SUBDIRS:
            try:
                self._check_subdir(fd, name)
            except OSError as e:
                failed = failed or e
        if failed is not None:
            raise failed

    def _check_subdir(self, fd: int, name: str) -> None:
        shown = os.path.join(self.layout.own, name)
        found = self._subdirs.get(name)
        if found is not None:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == found[1]:
                try:
                    directory.check_private(st, shown)  # its owner or mode changed under us
                    return
                except OSError:
                    self._drop(name)
                    raise
            self._drop(name)
            gone = errno.ENOENT if st is None else errno.EEXIST
            self.fault(OSError(gone, f"{shown} was removed or replaced"), "missing")
        sub = directory.open_subdir(fd, name, shown, create=True)
        st = os.fstat(sub)
        self._subdirs[name] = (sub, (st.st_dev, st.st_ino))
        self.opened(name, sub)

    def _drop(self, name: str) -> None:
        found = self._subdirs.pop(name, None)
        if found is not None:
            _close_quietly(found[0])

    # -- faults -------------------------------------------------------------------------------

    def session(self, *steps: Callable[[int], None], settle: bool = False) -> bool:
        """Run each step with the directory fd; True if all succeeded.

        A step that fails does not stop the others (the counts go before the journal, and a
        journal write failing must not keep counts off the disk). Faults are said once and
        counted. Only a `settle` session (the master's loop turn, which rewrites a whole file
        while a fault lasts) ends them, when it succeeds HOLD_SECONDS after the last failure:
        an in-place update succeeding on a full disk proves nothing.
        """
        if os.getpid() != self.owner:
            return False
        try:
            fd = self.fd()
        except OSError as e:
            self.fault(e)
            return False
        failed = None
        for step in steps:
            try:
                step(fd)
            except OSError as e:
                failed = failed or e
        if failed is not None:
            self.fault(failed)
            return False
        if settle:
            self.recovered()
        return True

    def classify(self, e: OSError) -> str:
        if isinstance(e, directory.UnsafeDirectory):
            return "unsafe"
        kind = _KINDS.get(e.errno or 0, "io")
        if kind == "no_space":
            try:
                fs = os.statvfs(self._fd if self._fd >= 0 else self.layout.root)
                if fs.f_files and fs.f_favail == 0:
                    return "no_inodes"
            except OSError:
                pass
        return kind

    def fault(self, e: OSError, kind: str | None = None) -> None:
        kind = kind or self.classify(e)
        self._failed_at = time.monotonic()
        if kind in self._active:
            return
        self._active[kind] = str(e)
        try:
            self._count(kind)
        except Exception:
            pass
        log.error(
            "gunicorn-monitor event=directory_fault fault=%s path=%s error=%r "
            "(Gunicorn unaffected; counts kept in memory, retried every loop turn, said once)",
            kind,
            self.layout.own,
            str(e),
        )

    def recovered(self) -> None:
        if not self._active or time.monotonic() - self._failed_at < HOLD_SECONDS:
            return
        for kind in sorted(self._active):
            log.warning(
                "gunicorn-monitor event=directory_recovered fault=%s path=%s "
                "(every count written again)",
                kind,
                self.layout.own,
            )
        self._active.clear()

    @property
    def faults(self) -> frozenset[str]:
        return frozenset(self._active)


def _close_quietly(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
