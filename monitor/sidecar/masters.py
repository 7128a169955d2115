"""The recorded masters (contract/state.py's files), kept up to date from what changed.

Why: every look (a scrape's inputs and its collection, the sampler, /-/ready) parsed every
`master-<pid>.json` in `gunicorn-monitor/`: with the files of 50,000 dead masters there, the
first scrape took 14.6 s and each later one seconds, until retirement removed them. Here the
kernel says which entries changed (sidecar/dirwatch.py: inotify on the directory's fd, or its
stat), a state file is parsed again only when it was replaced (another inode, size or mtime:
the hooks replace it whole), and a look costs what changed plus one /proc read per master
parsed live.

What a look skips, and why that is the same answer:
- A master parsed dead (stopped, or its process gone, or its pid another process's) stays dead
  until its file changes: a dead process never runs again, and a new master given its pid
  writes the file anew.
- The backlog: the state files, at the first listing, of pids that no process has (so of dead
  masters). They say nothing about the live masters, only which dead ones are accounted for
  (`stopped`), which the counts need. With more than BACKLOG of them, a look leaves them
  unparsed and `unread` says how many are left; `read_backlog()` (the retirement's thread,
  sidecar/retirement.py) parses them, a batch at a time, after its first pass has removed most
  of them. Until then the lifecycle collector leaves out its counter families (a gap, never a
  partial sum). Without a background reader (`background` False) the first look parses them.

Every file is opened relative to the directory's fd, opened and checked by the readers' rules
(contract/directory.py), and without following a symlink, as contract/state.py's readers do; a
master parsed live is one the kernel vouches for (state.Genuine), else it is `forged`.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import NamedTuple

from monitor.contract import state
from monitor.contract.directory import Layout, open_own_for_reading
from monitor.sidecar.dirwatch import DirWatch

log = logging.getLogger("gunicorn_monitor")

BACKLOG = 256  # dead masters' state files a look parses itself; more are read in the background


class Recorded(NamedTuple):
    """What a look found: the masters whose files are well formed (live and dead), and how many
    files were malformed or could not be read (state.read_all's answer)."""

    masters: list[state.Master]
    malformed: int
    unreadable: int


def _is_state_name(name: str) -> bool:
    """What state.read_all's glob took: `master-*.json` (a bad pid in it is malformed)."""
    return name.startswith("master-") and name.endswith(".json") and len(name) >= 12


def _pid_of(name: str) -> int | None:
    pid = name[len("master-") : -len(".json")]
    return int(pid) if pid.isascii() and pid.isdigit() and len(pid) <= 7 else None


class MasterIndex:
    """`look()`: the recorded masters now, at the cost of what changed since the last look.

    Thread-safe (the scrape and the sampler ask); `version` moves whenever a state file came,
    went or was replaced, or a master parsed live died."""

    def __init__(self, layout: Layout, *, background: bool = False, use_inotify: bool = True):
        self.layout = layout
        self.background = background  # a thread calls read_backlog(): looks leave it unread
        self.version = 0
        self.gone_at_start = 0  # files (state and count) of pids no process had at first listing
        # Opened by the readers' rules (ours, or root's that only root may write; no level a
        # symlink): what is parsed is the directory that was checked.
        self._watch = DirWatch(layout.own, use_inotify, lambda: open_own_for_reading(layout))
        self._lock = threading.Lock()
        # name -> (identity, what it said: a Master, state.MALFORMED or UNREADABLE), once parsed
        self._entries: dict[str, tuple[tuple | None, object]] = {}
        self._unread: dict[str, None] = {}  # the backlog, in listing order
        self._live: set[str] = set()  # the names of masters parsed live
        self._answered: tuple[int, Recorded] | None = None  # the last answer, and its version
        self._listed = False

    @property
    def unread(self) -> int:
        """Dead masters' state files not parsed yet (the backlog)."""
        return len(self._unread)

    def look(self) -> Recorded:
        with self._lock:
            try:
                changed = self._watch.look()
                if changed is None:
                    self._relist()
            except OSError as e:  # missing, or not a directory we may list
                self._watch.close()  # listed whole at the next look
                for name in [*self._entries, *self._unread]:
                    self._forget(name)
                # Missing: nothing recorded. Refused or unreadable: it may hold a live
                # master's file, so whoever counts masters must not answer (state.read_all).
                return Recorded([], 0, 0 if isinstance(e, FileNotFoundError) else 1)
            if changed is not None:
                for name in changed:
                    if _is_state_name(name):
                        self._refresh(name)
            self._recheck_live()
            return self._answer()

    def read_backlog(self, batch: int = BACKLOG) -> int:
        """Parse the backlog, `batch` files under the lock at a time (a look waits for one
        batch at most); returns how many were parsed (files gone meanwhile not counted)."""
        parsed = 0
        while True:
            with self._lock:
                names = list(self._unread)[:batch]
                if not names:
                    return parsed
                for name in names:
                    parsed += self._refresh(name)
                self.version += 1

    # -- under the lock ----------------------------------------------------------------

    def _relist(self) -> None:
        """The whole listing: the first look, or when the events cannot be trusted to be all."""
        fd = self._watch.fd
        names = os.listdir(fd) if fd is not None else []
        first, self._listed = not self._listed, True
        # Listed again after each overflow of inotify's queue (a first retirement removing
        # 175,000 files overflows it): the backlog's names are not looked at again.
        present = {n for n in names if n.startswith("master-") and n.endswith(".json")}
        present = {n for n in present if _is_state_name(n)}
        dead: list[str] = []
        for name in present:
            if name not in self._unread or first:
                pid = _pid_of(name)
                if first and pid is not None and not state.pid_exists(pid):
                    dead.append(name)  # decided below: parsed now, or left to the backlog
                else:
                    self._refresh(name)
        if first:
            self.gone_at_start = self._gone_files(names, dead)
        left = self.background and len(dead) > BACKLOG
        for name in dead:
            if left:
                self._unread[name] = None
            else:
                self._refresh(name)
        for name in [n for n in self._entries if n not in present]:
            self._forget(name)
        for name in [n for n in self._unread if n not in present]:
            self._forget(name)

    def _gone_files(self, names: list[str], dead: list[str]) -> int:
        """The dead masters' state files, and the count files (named for their master's pid,
        contract/appfiles.py) of no master with a state file and a process: how much the
        first retirement pass has to read, as a size (no kill(0) a count file)."""
        live = {n[len("master-") : -len(".json")] for n in self._entries}
        pids = [n[n.rfind("_") + 1 : -len(".db")] for n in names if n.endswith(".db")]
        return len(dead) + sum(1 for p in pids if p.isdigit() and p not in live)

    def _refresh(self, name: str) -> int:
        """Parse `name` again if it was replaced (or never parsed); 1 if it was parsed."""
        fd = self._watch.fd
        if fd is None:
            return 0  # the directory went (read_backlog, between looks): the next look lists it
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            self._forget(name)
            return 0
        except OSError:
            self._set(name, None, state.UNREADABLE)
            return 0
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        kept = self._entries.get(name)
        if kept is not None and kept[0] == identity:
            return 0
        self._unread.pop(name, None)
        said = state.read_file(fd, name)
        if isinstance(said, state.Master) and said.alive:
            # What the directory says is checked against the kernel (state.Genuine): a file
            # naming an unrelated process is served and sampled as no master.
            if not state.Genuine(fd)(said.pid):
                said.alive, said.forged = False, True
        self._set(name, identity, said)
        return 1

    def _set(self, name: str, identity: tuple | None, said: object) -> None:
        if said is None:  # gone between the stat and the open
            self._forget(name)
            return
        self._entries[name] = (identity, said)
        if isinstance(said, state.Master) and said.alive:
            self._live.add(name)
        else:
            self._live.discard(name)
        self.version += 1

    def _forget(self, name: str) -> None:
        self._unread.pop(name, None)
        self._live.discard(name)
        if self._entries.pop(name, None) is not None:
            self.version += 1

    def _recheck_live(self) -> None:
        """A master parsed live is live while its process is the one recorded (one /proc
        read); once dead it stays so until its file changes."""
        for name in list(self._live):
            said = self._entries[name][1]
            assert isinstance(said, state.Master)
            if not state.is_running(said.pid, said.start_time, said.start_ticks):
                said.alive = False
                self._live.discard(name)
                self.version += 1

    def _answer(self) -> Recorded:
        """The answer, made again only when something changed (its version)."""
        if self._answered is not None and self._answered[0] == self.version:
            return self._answered[1]
        masters, malformed, unreadable = [], 0, 0
        for name in sorted(self._entries):
            said = self._entries[name][1]
            if isinstance(said, state.Master):
                masters.append(said)
            elif said == state.MALFORMED:
                malformed += 1
            elif said == state.UNREADABLE:
                unreadable += 1
        self._answered = (self.version, Recorded(masters, malformed, unreadable))
        return self._answered[1]
