"""Orphaned workers: counted once, as `orphaned`, by a master that outlived theirs.

A master that dies without its on_exit (SIGKILL after a USR2, the OOM killer, a crash) leaves
workers nobody reaps or counts: they notice their parent is gone and leave, or die with their
container. Only a master can count them (the sidecar writes nothing but compaction files), so
every master closes the books of the dead masters it can see in the directory: the next master
of a restarted container (which has the dead master's pid), or any other live master beside it
(the new master after a USR2). The protocol, and what a crash at each step leaves:

- Who is owed what. A dead master's counts file says how many workers it spawned and how many
  exits it counted: the difference is exactly how many of its workers were never counted, even
  those forked after its state file was last written. Its state file lists the workers it had
  at its last loop turn, each with its /proc start: those still running are watched, and each
  is counted when it dies, with its age; the rest (dead already, or never listed) are counted at
  once, without one. Counting stops when the difference is 0: never an exit too many.
- Exactly once. The orphans' exits go into the dead master's own files (`counter_<pid>.db`,
  `histogram_<pid>.db`), written only by the holder of the flock on `heartbeat/<pid>`
  (hooks/beat.py; contract/state.py, "Who writes a master's files"): the master itself while it
  lives, then the one master that takes the lock after its death (LOCK_NB: no master waits for
  it). Each count is a write of that file (a whole-file rename, or one slot in place), so
  whatever the claimant dies of, the difference on disk is still exactly what is owed, and the
  next claimant (the lock goes with the process) carries on from there.
- Done. The claimant marks the dead master's state file `stopped` (accounted for), removes its
  heartbeat file and lets go of the lock. A new master given the dead master's pid takes the
  claim over at its start, counting into the files it adopts; a claimant that sees one lets go
  at once, writing nothing more.

Cost: the directory is listed every SCAN_EVERY seconds (a state file that says stopped is not
read again until it changes), and each watched orphan costs one read of /proc a loop turn.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from monitor.contract import causes, directory, inflight, metrics, state
from monitor.contract.store import Store
from monitor.hooks import beat

log = logging.getLogger("gunicorn.error")

SCAN_EVERY = 2.0  # seconds between looks for dead masters
_STATE = re.compile(r"master-([0-9]{1,7})\.json")


@dataclass
class _Claim:
    """The books of one dead master, kept by this one until its orphans are all counted."""

    ident: int  # the dead master's pid: its files are counter_<ident>.db and the rest
    store: Store
    owed: int  # its spawns minus its exits: workers never counted yet
    watched: dict[int, int]  # still running when claimed: pid -> /proc start ticks
    lock: int = -1  # the flock on heartbeat/<ident>; ours for life when ident is our pid
    raw: dict = field(default_factory=dict)  # its last state, marked stopped when done


def outstanding(store: Store) -> int:
    """Workers spawned and never counted as exited, by a master's counts."""
    owed = store.total(metrics.WORKER_SPAWNS) - store.total(metrics.WORKER_EXITS)
    return max(0, int(round(owed)))


def _running(pid: int, ticks: int) -> bool:
    found = state.proc(pid)
    return found is not None and not found.dead and found.ticks == ticks


def _watch(master: state.Master) -> dict[int, int]:
    return {w.pid: w.ticks for w in master.workers if w.ticks and _running(w.pid, w.ticks)}


class Orphans:
    """One master's claims. `monitor` is its recorder: pid, layout, store, pending records."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor
        self.claims: dict[int, _Claim] = {}
        self._settled: dict[str, tuple[int, int]] = {}  # state files that say stopped
        self._scanned = -SCAN_EVERY

    # -- a dead master of our own pid (a restarted container) ------------------------------

    def predecessor(self, fd: int) -> dict | None:
        """Before our counts file is adopted and our state file replaces its: the state a dead
        master of our pid left, if it is not accounted for."""
        found = state.load(fd, self.monitor.pid)
        if found is None:
            return None
        raw, master = found
        if master.stopped or master.alive:
            return None
        return raw

    def adopted(self, raw: dict, spawns: float, exits: float) -> None:
        """Our counts file was adopted with `spawns` and `exits` in it: what its earlier master
        of our pid (its state `raw`) owes is ours to count, into our own files."""
        owed = max(0, int(round(spawns - exits)))
        try:
            watched = _watch(state.parse(raw, self.monitor.pid))
        except ValueError:
            watched = {}
        self._claimed(_Claim(self.monitor.pid, self.monitor.store, owed, watched))

    # -- once a loop turn ---------------------------------------------------------------------

    def tick(self, fd: int) -> None:
        """Look for dead masters (every SCAN_EVERY seconds), count the orphans that died, and
        write the dead masters' files. OSError from a write; the counts stay in memory."""
        now = time.monotonic()
        if now - self._scanned >= SCAN_EVERY:
            self._scanned = now
            self._scan(fd)
        failed: OSError | None = None
        for claim in list(self.claims.values()):
            try:
                self._count(fd, claim)
            except OSError as e:
                failed = failed or e
        if failed is not None:
            raise failed

    def _scan(self, fd: int) -> None:
        names = set()
        for name in os.listdir(fd):
            found = _STATE.fullmatch(name)
            if found is None:
                continue
            names.add(name)
            pid = int(found.group(1))
            if pid == self.monitor.pid or pid in self.claims:
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if self._settled.get(name) == (st.st_ino, st.st_mtime_ns):
                continue
            loaded = state.load(fd, pid)
            if loaded is None:
                continue
            if loaded[1].stopped:
                self._settled[name] = (st.st_ino, st.st_mtime_ns)
            elif not loaded[1].alive:
                self._claim(fd, pid, loaded)
        self._settled = {k: v for k, v in self._settled.items() if k in names}

    def _claim(self, fd: int, pid: int, seen: tuple[dict, state.Master]) -> None:
        """Take the books of the dead master `pid`, unless another master has them."""
        hb = directory.open_heartbeats(fd, self.monitor.layout, create=True)
        try:
            lock = beat.lock(hb, str(pid))
            if lock is None:
                return  # another master counts them
            try:
                again = state.load(fd, pid)  # what it says now that it is ours to say
                linked = beat.still_linked(hb, str(pid), lock)
                if not linked or again is None or again[1].alive:
                    beat.close_quietly(lock)
                    return
                if again[1].stopped or again[1].start_ticks != seen[1].start_ticks:
                    # Accounted for meanwhile; its heartbeat file has nothing more to say.
                    os.unlink(str(pid), dir_fd=hb)
                    beat.close_quietly(lock)
                    return
                store = Store(str(pid))
                store.load(fd)
            except BaseException:
                beat.close_quietly(lock)
                raise
        finally:
            os.close(hb)
        raw, master = again
        claim = _Claim(pid, store, outstanding(store), _watch(master), lock, raw)
        self._claimed(claim)

    def _claimed(self, claim: _Claim) -> None:
        self.claims[claim.ident] = claim
        m = self.monitor
        log.warning(
            "gunicorn-monitor event=orphans_claimed master_pid=%s owed=%s watched=%s",
            claim.ident,
            claim.owed,
            len(claim.watched),
        )
        m.pending.append(
            {
                "time": time.time(),
                "event": "orphans_claimed",
                "master_pid": m.pid,
                "dead_master_pid": claim.ident,
                "owed": claim.owed,
                "watched": len(claim.watched),
            }
        )

    def _count(self, fd: int, claim: _Claim) -> None:
        if claim.lock >= 0 and not self._still_ours(fd, claim):
            self._release(claim)  # a new master of that pid: its files are its own now
            return
        for pid, ticks in list(claim.watched.items()):
            if not _running(pid, ticks):
                del claim.watched[pid]
                self._orphan(claim, pid, state.age_of(ticks))
        for _ in range(claim.owed - len(claim.watched)):
            self._orphan(claim, None, None)  # dead already, or forked after its last state
        if claim.owed <= 0:
            claim.watched.clear()  # nothing owed: whatever still runs was counted
        if claim.lock >= 0:
            claim.store.write(fd)
        if claim.owed <= 0:
            self._done(fd, claim)

    def _orphan(self, claim: _Claim, pid: int | None, age: float | None) -> None:
        if claim.owed <= 0:
            return
        claim.owed -= 1
        claim.store.inc(metrics.WORKER_EXITS, cause=causes.ORPHANED, signal=causes.NO_SIGNAL)
        if age is not None:
            claim.store.observe(metrics.WORKER_LIFETIME, age, cause=causes.ORPHANED)
        m = self.monitor
        age_text = round(age, 3) if age is not None else None
        log.warning(
            "gunicorn-monitor event=worker_exit pid=%s master_pid=%s cause=%s signal=%s "
            "age_seconds=%s (its master died first)",
            pid,
            claim.ident,
            causes.ORPHANED,
            causes.NO_SIGNAL,
            age_text,
        )
        m.pending.append(
            {
                "time": time.time(),
                "event": "exit",
                "master_pid": claim.ident,
                "counted_by": m.pid,
                "pid": pid,
                "cause": causes.ORPHANED,
                "signal": causes.NO_SIGNAL,
                "age_seconds": age_text,
            }
        )
        if pid is not None:
            inflight.discard(m.disk.held(inflight.LIVE), pid)
            m.retire_app_files(pid)

    def _still_ours(self, fd: int, claim: _Claim) -> bool:
        """Our lock is still on its heartbeat file, and no new master has taken its pid."""
        try:
            hb = directory.open_heartbeats(fd, self.monitor.layout)
        except OSError:
            return False
        try:
            if not beat.still_linked(hb, str(claim.ident), claim.lock):
                return False
        finally:
            os.close(hb)
        now = state.load(fd, claim.ident)
        return now is None or not now[1].alive

    def _done(self, fd: int, claim: _Claim) -> None:
        del self.claims[claim.ident]
        if claim.lock < 0:
            return  # our own pid's predecessor: our state file already replaced its
        try:
            marked = {**claim.raw, "stopped": True, "workers": {}}
            state.write(self.monitor.layout, claim.ident, marked, fd)
            hb = directory.open_heartbeats(fd, self.monitor.layout)
            try:
                if beat.still_linked(hb, str(claim.ident), claim.lock):
                    os.unlink(str(claim.ident), dir_fd=hb)
            finally:
                os.close(hb)
        finally:
            self._release(claim)
        log.info("gunicorn-monitor event=orphans_accounted master_pid=%s", claim.ident)

    def _release(self, claim: _Claim) -> None:
        self.claims.pop(claim.ident, None)
        fd, claim.lock = claim.lock, -1
        if fd >= 0:
            beat.close_quietly(fd)

    def forked(self) -> None:
        """In a forked child: its copies of the locks go (the master keeps holding them)."""
        for claim in self.claims.values():
            fd, claim.lock = claim.lock, -1
            if fd >= 0:
                beat.close_quietly(fd)
        self.claims = {}

    def stopped(self) -> None:
        """At the master's stop: claims not done are left for the next master to carry on."""
        for claim in list(self.claims.values()):
            self._release(claim)
