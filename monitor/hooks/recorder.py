"""The master's recorder: every worker's birth and death, with its cause.

Gunicorn knows how each worker ended but hands no hook the exit status, runs no worker hook on
SIGTERM, and under UvicornWorker runs no worker hook on any signal. So the master gathers the
evidence itself, and decides in child_exit:

- the exact wait status, by wrapping the `os.waitpid` that arbiter.py calls (the only place the
  status exists; this also sees boot errors, for which child_exit is never called);
- what the master itself did, by wrapping the arbiter's own `kill_worker`, `reload`, `stop`,
  `reexec` and `spawn_worker` on the instance;
- Gunicorn's `worker.aborted` timeout flag;
- kernel OOM kill counters;
- what the worker says about itself (the first signal it caught, when it decided to leave after
  max_requests), through memory shared with it (hooks/channel.py), never through the directory.

Every call into it from Gunicorn goes through monitor/hooks/contain.py (see the package's rules).

Its counts live in memory (contract/store.py) and are written through one checked directory fd
(hooks/disk.py) after every event and once per turn of the master's loop: a directory that is
removed, full, read-only, unsafe or tampered with costs recording, never a request, and
recording resumes by itself with every count intact. Only the master writes: a forked worker
drops the recorder (os.register_at_fork), so nothing it inherited can reach the master's files.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import gunicorn
import gunicorn.arbiter

from monitor.contract import appfiles, causes, directory, journal, metrics, state
from monitor.contract.store import Store
from monitor.hooks import classify, oom, settings
from monitor.hooks import contain as contain_module
from monitor.hooks.beat import Heartbeat
from monitor.hooks.channel import CHANNEL
from monitor.hooks.contain import contain, guard
from monitor.hooks.disk import Disk
from monitor.hooks.orphans import Orphans

log = logging.getLogger("gunicorn.error")

_RETIRING = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT)
_TERMINATING = _RETIRING + (signal.SIGKILL, signal.SIGABRT)
_PENDING_RECORDS = 1000  # journal records kept while the directory is unwritable (oldest go)


class _Waitpid:
    """Stands in for the `os` module inside gunicorn.arbiter, to see each worker's wait status."""

    def __init__(self, real_os: Any, monitor: Monitor) -> None:
        self._os = real_os
        self._monitor = monitor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._os, name)

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        wpid, status = self._os.waitpid(pid, options)
        if wpid:
            self._monitor.reaped(wpid, status)
        if self._monitor.stopping:
            # A graceful stop reaps in a loop of its own for up to graceful_timeout: a master
            # doing that is not stalled.
            guard("waitpid", self._monitor.beat)
        return wpid, status


class Monitor:
    """Master-side recorder. One per master process; created in on_starting."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.pid = os.getpid()
        self.layout = directory.Layout(directory.resolve())
        self.store = Store(str(self.pid))
        self._declare()
        self.disk = Disk(self.layout, self._count_fault)
        self.journal = journal.Journal(self.layout)
        self.pending: collections.deque[dict] = collections.deque(maxlen=_PENDING_RECORDS)
        self.generation = 0  # the disk's, when the counts were last written whole
        self.adopted = False
        self.state_id: tuple[int, int] | None = None
        self.lock = threading.RLock()  # nworkers_changed may run in the control-socket thread
        self.oom_paths = oom.counter_paths()
        self.oom_seen = oom.read_oom_kills(self.oom_paths)
        self.started = state.process_start_time(self.pid) or time.time()
        # Who this master is, in /proc: no wall-clock step changes it (None if unreadable:
        # readers then compare the wall-clock start_time, as for earlier versions).
        self.start_ticks = state.start_ticks(self.pid)
        self.heartbeat = Heartbeat(self.layout, self.pid, self.start_ticks or 0)
        self.orphans = Orphans(self)  # workers of dead masters, counted once (orphans.py)
        self.statuses: dict[int, int] = {}
        self.sent: dict[int, set[int]] = {}
        self.phase: dict[int, str] = {}
        self.told_at: dict[int, float] = {}  # monotonic: when the master first told it to go
        self.slots: dict[int, int] = {}
        # Durations from the monotonic clock (a wall-clock step moves none of them); the wall
        # time and /proc start of each worker are for its state-file entry.
        self.spawned_at: dict[int, float] = {}
        self.spawned_wall: dict[int, float] = {}
        self.worker_ticks: dict[int, int] = {}
        self.retiring_for_reload: set[int] = set()
        self.vacancies = 0
        self.stopping = False
        self.stopped_at: float | None = None
        self.dirty = False
        self.desired = server.num_workers
        # Set by the watch (watch.py): the capture and phase of an exit, the stuck-booting gauge.
        self.exit_fields: Callable[[int, str], dict] = lambda pid, cause: {}
        self.state_fields: Callable[[], dict] = dict
        os.register_at_fork(after_in_child=self._forked)
        self._wrap_arbiter()
        self.disk.session(self._write_counts)  # adopt what an earlier master of our pid left

    def _declare(self) -> None:
        """The usual series exist from the start at 0: recording one is then an in-place write,
        which a full disk cannot fail (store.py)."""
        for spec in (
            metrics.WORKER_SPAWNS,
            metrics.WORKER_RESTARTS,
            metrics.WORKER_ABORTS,
            metrics.MASTER_RELOADS,
        ):
            self.store.declare(spec)
        for cause, sig in causes.KNOWN_EXITS:
            self.store.declare(metrics.WORKER_EXITS, cause=cause, signal=sig)
        for fault in metrics.DIRECTORY_FAULT_KINDS:
            self.store.declare(metrics.DIRECTORY_FAULTS, fault=fault)

    def _forked(self) -> None:
        """In every child the master forks (workers, the USR2 child): the recorder is not the
        child's. Its copy of the directory fd is closed, and contained failures are no longer
        counted into the master's files."""
        self.disk.forked()
        self.heartbeat.forked()
        self.orphans.forked()
        if contain_module.counter == self.count_failure:
            contain_module.counter = None

    # -- wiring ---------------------------------------------------------------------------

    def _wrap_arbiter(self) -> None:
        gunicorn.arbiter.os = _Waitpid(os, self)
        s = self.server
        for name in ("kill_worker", "reload", "stop", "reexec", "spawn_worker", "manage_workers"):
            original = getattr(s, name)
            setattr(s, name, functools.partial(getattr(self, "_" + name), original))

    def _kill_worker(self, original: Callable, pid: int, sig: int) -> Any:
        guard("kill_worker", self._note_signal, pid, sig)
        return original(pid, sig)

    def _note_signal(self, pid: int, sig: int) -> None:
        if sig not in _TERMINATING:
            return
        with self.lock:
            self.sent.setdefault(pid, set()).add(sig)
            worker = self.server.WORKERS.get(pid)
            if sig == signal.SIGABRT and worker is not None and worker.aborted:
                self.store.inc(metrics.WORKER_ABORTS)
                self._event("abort", pid=pid, slot=self.slots.get(pid))
            if pid in self.phase:
                return
            if self.stopping and sig in _RETIRING + (signal.SIGKILL,):
                self.phase[pid] = causes.RELOAD if self.server.reexec_pid else causes.SHUTDOWN
            elif sig in _RETIRING:
                if pid in self.retiring_for_reload:
                    self.phase[pid] = causes.RELOAD
                else:
                    self.phase[pid] = causes.SCALE_DOWN
            if pid in self.phase:
                # Taken before the signal goes out: a worker that decided to leave after
                # max_requests before this moment is a max_requests exit (classify.py).
                self.told_at[pid] = time.monotonic()

    def _reload(self, original: Callable) -> Any:
        guard("reload", self._deploy, "reload")
        with self.lock:
            self.retiring_for_reload.update(self.server.WORKERS)
        return original()

    def _reexec(self, original: Callable) -> Any:
        before = self.server.reexec_pid
        result = original()
        # The forked child goes on to exec the new master; and a USR2 during an upgrade is
        # ignored by Gunicorn ("Child exists"): only a new child is an upgrade.
        if os.getpid() == self.pid and not before and self.server.reexec_pid:
            guard("reexec", self._deploy, "upgrade")
        return result

    def _stop(self, original: Callable, *args: Any, **kwargs: Any) -> Any:
        self.stopping = True
        return original(*args, **kwargs)

    def _spawn_worker(self, original: Callable) -> Any:
        pid = original()
        # Only the master returns here; the child exits inside spawn_worker.
        guard("spawn_worker", self._spawned, pid)
        return pid

    # -- events ---------------------------------------------------------------------------

    def _event(self, event: str, **fields: Any) -> None:
        """Journal an event, and write it with every count changed before it."""
        self.pending.append({"time": time.time(), "event": event, "master_pid": self.pid, **fields})
        self.disk.session(self._write_counts, self._write_journal)

    # -- the disk -------------------------------------------------------------------------------

    def _write_counts(self, fd: int, verify: bool = False) -> None:
        if self.disk.generation != self.generation:
            # The lock we hold, if any, is on the heartbeat file of the directory we wrote
            # into before (removed or replaced since): it keeps nobody out of this one. Our
            # counts go here only under the lock on its own, or the sidecar's retirement could
            # take them for a dead master's while we write them again (counted twice).
            self.heartbeat.moved()
        if not self.heartbeat.owned(fd):
            return  # another master is counting a dead predecessor's orphans into our files
        if self.disk.generation != self.generation:
            # A directory we have not written into yet: at start, or recreated after a fault.
            if not self.adopted:
                # A dead master of our pid (a restarted container) may have left workers never
                # counted: what its files owe is ours to count (orphans.py).
                predecessor = _contained("orphans", self.orphans.predecessor, fd)
                spawns = self.store.total(metrics.WORKER_SPAWNS)
                ended = self.store.total(metrics.WORKER_EXITS)
                for name in self.store.load(fd):
                    self.disk.fault(OSError(f"{name} is not a prometheus_client file"), "replaced")
                self.adopted = True
                if predecessor is not None:
                    _contained(
                        "orphans",
                        self.orphans.adopted,
                        predecessor,
                        self.store.total(metrics.WORKER_SPAWNS) - spawns,
                        self.store.total(metrics.WORKER_EXITS) - ended,
                    )
            self.store.forget_files()
            self.state_id = None
            self.generation = self.disk.generation
        replaced: list[str] = []
        try:
            replaced = self.store.write(fd, verify)
        except OSError as e:
            replaced = getattr(e, "replaced", [])
            raise
        finally:
            for name in replaced:
                self.disk.fault(OSError(f"{name} was removed or replaced; rewritten"), "replaced")

    def _write_journal(self, fd: int) -> None:
        while self.pending:
            self.journal.append(self.pending[0], fd)
            self.pending.popleft()

    def _write_state(self, fd: int) -> None:
        if not self.dirty and self.state_id is not None:
            name = os.path.basename(self.layout.master_state(self.pid))
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                same = (st.st_dev, st.st_ino) == self.state_id
            except FileNotFoundError:
                same = False
            if same:
                return
            self.disk.fault(OSError(f"{name} was removed or replaced; rewritten"), "replaced")
        self.state_id = state.write(self.layout, self.pid, self._state(), fd)
        self.dirty = False

    def _count_fault(self, fault: str) -> None:
        self.store.inc(metrics.DIRECTORY_FAULTS, fault=fault)

    def _deploy(self, kind: str) -> None:
        with self.lock:
            self.store.inc(metrics.MASTER_RELOADS)
            self.store.set_max(metrics.LAST_DEPLOY, time.time())
            self._event(kind)

    def started_master(self) -> None:
        with self.lock:
            self.store.set_max(metrics.LAST_DEPLOY, time.time())
            previous = os.environ.get("GUNICORN_PID")
            self._event("master_start", previous_master_pid=int(previous) if previous else None)
            self._save()
            self.flush()

    def _spawned(self, pid: int) -> None:
        with self.lock:
            taken = {
                slot
                for p, slot in self.slots.items()
                if p not in self.retiring_for_reload and p not in self.phase
            }
            slot = next(i for i in range(len(taken) + 1) if i not in taken)
            self.slots[pid] = slot
            self.spawned_at[pid] = time.monotonic()
            self.spawned_wall[pid] = time.time()
            found = state.proc(pid)
            if found is not None:
                self.worker_ticks[pid] = found.ticks
            worker = self.server.WORKERS.get(pid)
            self.store.inc(metrics.WORKER_SPAWNS)
            restart = self.vacancies > 0
            if restart:
                self.vacancies -= 1
                self.store.inc(metrics.WORKER_RESTARTS)
            self._event(
                "spawn",
                pid=pid,
                slot=slot,
                generation=getattr(worker, "age", None),
                restart=restart,
            )
            self._save()

    def desired_changed(self, new: int) -> None:
        with self.lock:
            if new == self.desired:
                return
            old, self.desired = self.desired, new
            self._event("scale", workers_desired=new, previous=old)
            self._save()

    def reaped(self, pid: int, status: int) -> None:
        """Called for every reaped child, before Gunicorn looks at it."""
        try:
            if os.getpid() != self.pid:
                return
            if pid not in self.server.WORKERS:
                return
            self.statuses[pid] = status
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) in (3, 4):
                # Gunicorn halts on these without calling child_exit: record the exit now.
                self.exited(self.server.WORKERS[pid])
        except Exception as e:
            contain("waitpid", e)

    def exited(self, worker: Any) -> None:
        with self.lock:
            pid = worker.pid
            if pid not in self.slots and pid not in self.statuses:
                return  # already recorded (boot error), or never ours
            report = CHANNEL.take(worker)
            evidence = classify.Evidence(
                status=self.statuses.pop(pid, None),
                master_signals=frozenset(self.sent.pop(pid, ())),
                master_phase=self.phase.pop(pid, None),
                told_at=self.told_at.pop(pid, None),
                aborted=bool(getattr(worker, "aborted", False)),
                oom_kills=self._new_oom_kills(),
                reported=report is not None and report.known_class,
                max_requests_at=report.max_requests_at if report else None,
                caught=causes.signal_name(report.signal) if report and report.signal else None,
                caught_at=report.signal_at if report else None,
            )
            cause, sig = classify.classify(evidence)
            if sig == "SIGKILL" and cause == causes.OOM:
                self.oom_seen += 1
            slot = self.slots.pop(pid, None)
            self.retiring_for_reload.discard(pid)
            spawned = self.spawned_at.pop(pid, None)
            self.spawned_wall.pop(pid, None)
            self.worker_ticks.pop(pid, None)
            age = time.monotonic() - spawned if spawned is not None else None
            self.store.inc(metrics.WORKER_EXITS, cause=cause, signal=sig)
            if age is not None:
                self.store.observe(metrics.WORKER_LIFETIME, age, cause=cause)
            if cause not in (causes.RELOAD, causes.SHUTDOWN, causes.SCALE_DOWN):
                self.vacancies += 1
            status = evidence.status
            code = os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
            # The line Gunicorn's own "was sent SIGTERM!" never was: what happened, and why.
            (log.info if cause in causes.PLANNED else log.warning)(
                "gunicorn-monitor event=worker_exit pid=%s slot=%s cause=%s signal=%s "
                "exit_code=%s age_seconds=%s",
                pid,
                slot,
                cause,
                sig,
                code,
                round(age, 3) if age is not None else None,
            )
            self._event(
                "exit",
                pid=pid,
                slot=slot,
                generation=getattr(worker, "age", None),
                age_seconds=round(age, 3) if age is not None else None,
                cause=cause,
                signal=sig,
                exit_code=code,
                aborted=evidence.aborted,
                **self.exit_fields(pid, cause),
            )
            self._save()
        self.retire_app_files(pid)

    def retire_app_files(self, pid: int) -> None:
        try:
            _retire_app_files(pid, self.layout)
        except OSError as e:  # the top directory, or `.compacting/`, refused or failing
            with self.lock:
                self.disk.fault(e)
        except Exception as e:
            contain("retire_app_files", e)

    def count_failure(self, hook: str) -> None:
        """Counted in memory; written with the next event or loop turn."""
        if os.getpid() != self.pid:
            return
        with self.lock:
            self.store.inc(metrics.HOOK_ERRORS, hook=hook)

    def _new_oom_kills(self) -> int:
        return max(0, oom.read_oom_kills(self.oom_paths) - self.oom_seen)

    def stopped(self) -> None:
        """on_exit: workers SIGKILLed at the very end of stop() are often never reaped."""
        deadline = time.monotonic() + 1.0
        for pid, worker in list(self.server.WORKERS.items()):
            while True:
                try:
                    wpid, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if wpid:
                    self.statuses[pid] = status
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            self.exited(worker)
        with self.lock:
            self._event("master_stop")
            self.stopped_at = time.time()
            self._save()
            self.flush()
            self.orphans.stopped()  # not done: the next master carries on
            self.disk.session(self.heartbeat.remove)

    def _save(self) -> None:
        # Written once per turn of the master's loop (see _manage_workers), not per event:
        # replacing a file costs about a millisecond of wall time on ext4, and an exit and the
        # spawn that replaces it come in the same turn.
        self.dirty = True

    def _manage_workers(self, original: Callable) -> Any:
        result = original()
        guard("manage_workers", self.flush)
        return result

    def flush(self) -> None:
        """Once per turn of the master's loop: the state if it changed, and a check that every
        file is still ours and where it belongs (rewritten whole when not)."""
        with self.lock:
            if self.disk.faults:
                self.dirty = True  # a whole file written is what tells the fault is over
            self.disk.session(
                _step("heartbeat", self.heartbeat.beat),
                _step("orphans", self.orphans.tick),
                functools.partial(self._write_counts, verify=True),
                self._write_journal,
                self._write_state,
                self.disk.check_subdirs,
                self._check_staging,
                settle=True,
            )

    def _check_staging(self, _fd: int) -> None:
        """With folding on, `.compacting/staged/` checked (and made) once a loop turn: refused
        (another user's, a symlink), it is a fault said once that lasts while it does, not one
        said again at each exit. The sidecar then stages what the master could not."""
        if _folding():
            top = directory.open_top(self.layout)
            try:
                os.close(appfiles.open_staged(top, self.layout))
            finally:
                os.close(top)

    def beat(self) -> None:
        """The heartbeat alone, between loop turns (a graceful stop reaping): rate-limited."""
        if os.getpid() == self.pid:
            with self.lock:
                self.disk.session(_step("heartbeat", self.heartbeat.beat))

    def _state(self) -> dict:
        cfg = self.server.cfg
        return {
            "pid": self.pid,
            "start_time": self.started,
            **({"start_ticks": self.start_ticks} if self.start_ticks is not None else {}),
            "stopped": self.stopped_at is not None,
            "version": gunicorn.__version__,
            "worker_class": cfg.worker_class_str,
            "workers_desired": self.desired,
            "workers": {
                str(pid): {
                    "slot": slot,
                    "spawned": self.spawned_wall.get(pid),
                    "ticks": self.worker_ticks.get(pid),
                }
                for pid, slot in self.slots.items()
            },
            "updated": time.time(),
            **self.state_fields(),
        }


def _step(name: str, step: Callable[[int], None]) -> Callable[[int], None]:
    """A disk session step whose faults of the directory (OSError) are the session's, and whose
    own failures are contained: they never keep the steps after it from running."""

    def run(fd: int) -> None:
        try:
            step(fd)
        except OSError:
            raise
        except Exception as e:
            contain(name, e)

    return run


def _contained(name: str, fn: Callable, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as e:
        contain(name, e)
        return None


@functools.cache
def _folding() -> bool:
    """appfiles.FOLD_ENV, read once per master process (a bad value is logged once, as off)."""
    return bool(settings.monitor_setting(settings.FOLD_APP_METRICS))


def _retire_app_files(pid: int, layout: directory.Layout) -> None:
    """The app's own prometheus_client files of a dead worker.

    Its live-mode gauges go, as prometheus_client documents (mark_process_dead), and that is
    all by default: the app may serve the same directory with a stock MultiProcessCollector,
    which must keep seeing the dead worker's counts. With folding on (appfiles.FOLD_ENV) the
    rest is moved out of the glob for the exporter to compact, here in the master before it
    forks a replacement that could reuse the pid and append to the dead worker's files.
    Everything by name relative to the checked top directory's fd. OSError when refused.
    """
    top = directory.open_top(layout)
    try:
        appfiles.mark_process_dead(top, pid)
        if _folding():
            appfiles.stage_process_files(top, layout, pid)
    finally:
        os.close(top)
