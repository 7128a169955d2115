"""The master's side of a capture: when to ask a worker for its stacks, and where they go.

It wraps two things on the arbiter instance, on top of the recorder's own wrappers:

- `kill_worker`: just before the master's SIGABRT to a timed-out worker (worker.aborted), it
  reads the worker's in-flight table and sends CAPTURE_SIGNAL; faulthandler in the worker
  writes every thread's stack from C before any Python handler runs. Before a SIGKILL (the
  timeout escalation, or the end of graceful_timeout at shutdown), it makes sure a capture was
  asked for and waits for it to be written: at most KILL_WAIT seconds once per batch, and only
  on those paths, where the master is about to kill the worker anyway.
- `murder_workers`: once per turn of the master's loop (at least once a second), after
  Gunicorn's own check, it looks at the workers still booting: their boot time once they are
  ready, a capture (without stopping them) when one first boots for longer than `timeout`,
  and, with GUNICORN_BOOT_TIMEOUT, the abort Gunicorn itself never sends to a worker that has
  not notified yet (the heartbeat file's first mtime is wall-clock time, compared with
  time.monotonic(): on 22.0 through 27.0.1 such a worker is never timed out).

A signal is sent only to a worker whose table says its handler is armed: CAPTURE_SIGNAL's
default action would end the process.

Captures are finished (read, saved under captures/, logged) when the worker is reaped, or for a
worker left running, on the first loop turn after the dump has had time to be written. The
exit record in the journal names its capture; timeouts are counted by phase.

Every file is reached through the fds of `live/` and `captures/` the recorder's directory
handle checks once per loop turn (hooks/disk.py, `held`): read with pread, never mapped, never
through a symlink or into a FIFO. While either is refused (a fault said once, there), a
capture still reads what it can and is logged whole, but not saved; workers forked meanwhile
have no table, so their captures say `unknown`.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from monitor.contract import captures, causes, inflight, metrics
from monitor.hooks import forensics
from monitor.hooks.channel import CHANNEL
from monitor.hooks.contain import contain, guard

log = logging.getLogger("gunicorn.error")

KILL_WAIT = 0.5  # seconds, at most, for dumps before the SIGKILLs of one batch
SETTLE = 0.2  # seconds after the signal after which a dump of a live worker counts as written


@dataclass
class _Pending:
    reason: str
    time: float  # wall clock, for the record
    asked: float  # monotonic
    snap: inflight.Snapshot | None
    offset: int  # where this dump starts in the worker's stacks file
    signalled: bool
    slot: int | None
    written: bool = False  # the dump grew and stopped growing: no call waits for it again


class Watch:
    """One per master, created in on_starting after the recorder (`monitor`)."""

    def __init__(self, server: Any, monitor: Any, boot_timeout: float = 0.0) -> None:
        self.server = server
        self.monitor = monitor
        self.layout = monitor.layout
        self.boot_timeout = boot_timeout
        self.pending: dict[int, _Pending] = {}
        self.booted: set[int] = set()
        self.stuck: set[int] = set()
        self.boot_aborted: set[int] = set()
        self.timeout_phase: dict[int, str] = {}
        self.last_capture: dict[int, str] = {}
        self.tableless: set[int] = set()  # workers said to have no table
        self.disk = monitor.disk
        self.disk.opened = self._opened
        with monitor.lock:
            # live/ and captures/ before the first worker is forked (then every loop turn).
            self.disk.session(self.disk.check_subdirs)
            for phase in captures.PHASES:  # every series exists at 0 from the start
                monitor.store.declare(metrics.WORKER_TIMEOUTS, phase=phase)
            monitor.store.declare(metrics.CAPTURES_DROPPED)
        for name in ("kill_worker", "murder_workers"):
            original = getattr(server, name)
            setattr(server, name, functools.partial(getattr(self, "_" + name), original))

    def _opened(self, name: str, fd: int) -> None:
        """A `live/` opened anew: files of pids that no longer run are from earlier workers."""
        if name == inflight.LIVE:
            guard("capture", inflight.discard_stale, fd)

    def _read(self, pid: int) -> inflight.Snapshot | None:
        return inflight.read_at(self.disk.held(inflight.LIVE), pid)

    def _stacks_size(self, pid: int) -> int:
        return inflight.stacks_size(self.disk.held(inflight.LIVE), pid)

    # -- wrappers ---------------------------------------------------------------------------

    def _kill_worker(self, original: Callable, pid: int, sig: int) -> Any:
        guard("capture", self._before_kill, pid, sig)
        return original(pid, sig)

    def _murder_workers(self, original: Callable) -> Any:
        result = original()
        guard("boot_watch", self.tick)
        return result

    # -- decisions at a signal --------------------------------------------------------------

    def _before_kill(self, pid: int, sig: int) -> None:
        worker = self.server.WORKERS.get(pid)
        if worker is None:
            return
        reason = forensics.capture_reason(
            causes.signal_name(sig),
            bool(getattr(worker, "aborted", False)),
            bool(getattr(self.monitor, "stopping", False)),
            pid in self.boot_aborted,
        )
        if reason is None:
            return
        # Wait for the dump before the signal goes out: SIGKILL ends the worker at once, and so
        # does SIGABRT where it has no handler (both UvicornWorkers): a standard signal is
        # delivered before a pending real-time one, so the dump would never be written.
        if sig == signal.SIGABRT:
            self.timeout_phase[pid] = forensics.phase(self.ask(pid, reason))
        elif reason == captures.SHUTDOWN_KILL:
            for other in list(self.server.WORKERS):
                if other not in self.pending and other not in self.last_capture:
                    self.ask(other, reason)
        elif pid not in self.pending and pid not in self.last_capture:
            self.timeout_phase.setdefault(pid, forensics.phase(self.ask(pid, reason)))
        self._wait_written()

    def ask(self, pid: int, reason: str) -> inflight.Snapshot | None:
        """Read the worker's table and send it CAPTURE_SIGNAL if its handler is armed."""
        snap = self._read(pid)
        if pid in self.pending:
            self.finish(pid)  # an earlier capture of the same worker goes first
        offset = self._stacks_size(pid)
        signalled = False
        if snap is not None and snap.armed and not _zombie(pid):
            try:
                os.kill(pid, inflight.CAPTURE_SIGNAL)
                signalled = True
            except OSError:
                pass
        slot = self.monitor.slots.get(pid)
        self.pending[pid] = _Pending(
            reason, time.time(), time.monotonic(), snap, offset, signalled, slot
        )
        return snap

    def _wait_written(self) -> None:
        """Until every signalled dump has grown and stopped growing, for KILL_WAIT at most
        from its ask: Gunicorn kills a batch one kill_worker call at a time, and the calls
        after the first find the dumps written, or given up on, rather than wait again."""
        deadline = time.monotonic() + KILL_WAIT
        sizes: dict[int, int] = {}
        while time.monotonic() < deadline:
            waiting = False
            for pid, p in self.pending.items():
                given_up = time.monotonic() - p.asked >= KILL_WAIT
                if not p.signalled or p.written or given_up or _zombie(pid):
                    continue
                size = self._stacks_size(pid)
                if size > p.offset and sizes.get(pid) == size:
                    p.written = True
                else:
                    waiting = True
                sizes[pid] = size
            if not waiting:
                return
            time.sleep(0.01)

    # -- once per loop turn -----------------------------------------------------------------

    def tick(self) -> None:
        now = time.monotonic()
        timeout = float(getattr(self.server, "timeout", 0) or 0)
        stuck_before = set(self.stuck)
        for pid, worker in list(self.server.WORKERS.items()):
            if pid in self.booted:
                continue
            snap = self._read(pid)
            if snap is None:
                self._no_table(pid, worker)
            elif snap.ready:
                self.booted.add(pid)
                self.stuck.discard(pid)
                with self.monitor.lock:
                    self.monitor.store.observe(metrics.WORKER_BOOT, snap.ready_at - snap.forked)
                continue
            age = forensics.boot_age(snap, now)
            if forensics.stuck_booting(age, timeout) and pid not in self.stuck:
                self.stuck.add(pid)
                log.warning(
                    "gunicorn-monitor event=worker_stuck_booting pid=%s slot=%s "
                    "booting_seconds=%.1f timeout=%s",
                    pid,
                    self.monitor.slots.get(pid),
                    age,
                    timeout,
                )
                self.ask(pid, captures.STUCK_BOOTING)
            if forensics.boot_timed_out(age, self.boot_timeout):
                self._abort_boot(pid, worker)
        for pid in list(self.pending):
            p = self.pending[pid]
            if pid not in self.server.WORKERS:
                if now - p.asked > 60:
                    self.finish(pid)  # gone without a child_exit (Gunicorn's ESRCH path)
                    self.last_capture.pop(pid, None)
                    self.timeout_phase.pop(pid, None)
                continue  # otherwise finished when reaped
            # Still running SETTLE after the ask: a boot left running, or a worker that lived
            # through its abort (a server around the app caught the SystemExit of Gunicorn's
            # SIGABRT handler: Gunicorn then never escalates). Its stack is in: written now,
            # not at an exit that may never come; the exit, if any, still names it.
            if now - p.asked >= SETTLE:
                self.finish(pid)
        if self.stuck != stuck_before:
            with self.monitor.lock:
                self.monitor._save()

    def _no_table(self, pid: int, worker: Any) -> None:
        """A worker that could not create its table (it says why in its channel slot): said
        once, for all workers alike, as the directory fault it is; its captures say unknown."""
        err = CHANNEL.table_error(worker) if pid not in self.tableless else 0
        if err:
            self.tableless.add(pid)
            why = f"worker {pid} has no in-flight table ({os.strerror(err)}): captures say unknown"
            with self.monitor.lock:
                self.disk.fault(OSError(err, why))

    def _abort_boot(self, pid: int, worker: Any) -> None:
        """What murder_workers does to a worker past its timeout: SIGABRT, then SIGKILL."""
        if pid not in self.boot_aborted:
            self.boot_aborted.add(pid)
            log.critical("WORKER TIMEOUT (pid:%s)", pid)
            log.warning(
                "gunicorn-monitor event=worker_boot_timeout pid=%s boot_timeout=%s",
                pid,
                self.boot_timeout,
            )
            worker.aborted = True
            self.server.kill_worker(pid, signal.SIGABRT)
        else:
            self.server.kill_worker(pid, signal.SIGKILL)

    # -- the capture, written -----------------------------------------------------------------

    def finish(self, pid: int) -> str | None:
        p = self.pending.pop(pid, None)
        if p is None:
            return None
        live = self.disk.held(inflight.LIVE)
        stack, truncated = inflight.read_stack(live, pid, p.offset, captures.MAX_STACK)
        if not stack:
            stack = (
                "(no stack: the worker had no capture handler armed)"
                if not p.signalled
                else "(no stack: the worker wrote none before it ended)"
            )
        record = {
            "time": p.time,
            "master_pid": self.monitor.pid,
            "pid": pid,
            "slot": p.slot,
            "reason": p.reason,
            "phase": forensics.phase(p.snap),
            "requests": forensics.requests_in_flight(p.snap, p.asked),
            "untracked_requests": p.snap.overflow if p.snap else 0,
            "booting_seconds": round(forensics.boot_age(p.snap, p.asked) or 0.0, 3)
            if p.snap and not p.snap.ready
            else None,
            "stack": stack,
            "truncated": truncated,
        }
        fname = self._save(record)
        record["name"] = fname
        if fname is not None:
            self.last_capture[pid] = fname
        log.warning("%s\n%s", forensics.log_line(record), stack.rstrip("\n"))
        return fname

    def _save(self, record: dict) -> str | None:
        """The capture's file name once saved; None when it cannot be (a fault of the
        directory, said once and counted there: the capture is still logged whole)."""
        held = self.disk.held(captures.DIR)
        if held < 0:
            return None
        try:
            fname, dropped = captures.save(held, record)
        except OSError as e:
            with self.monitor.lock:
                self.disk.fault(e)
            return None
        if dropped:
            with self.monitor.lock:
                self.monitor.store.inc(metrics.CAPTURES_DROPPED, float(dropped))
        return fname

    # -- called by the recorder -----------------------------------------------------------------

    def exit_fields(self, pid: int, cause: str) -> dict:
        """In child_exit (the recorder holds its lock): the capture's name, and the phase."""
        fields: dict[str, Any] = {}
        try:
            guard("capture", self.finish, pid)
            name = self.last_capture.pop(pid, None)
            phase = self.timeout_phase.pop(pid, None)
            if name:
                fields["capture"] = name
            if cause == causes.TIMEOUT:
                phase = phase or captures.UNKNOWN
                fields["phase"] = phase
                self.monitor.store.inc(metrics.WORKER_TIMEOUTS, phase=phase)
        except Exception as e:  # the exit record is written with or without these fields
            contain("capture", e)
        finally:
            for s in (self.booted, self.stuck, self.boot_aborted, self.tableless):
                s.discard(pid)
            inflight.discard(self.disk.held(inflight.LIVE), pid)
        return fields

    def state_fields(self) -> dict:
        """For the master's state file: the stuck gauge, and what it is measured against."""
        try:
            return self._state_fields()
        except Exception as e:
            contain("capture", e)
            return {}

    def _state_fields(self) -> dict:
        live = [p for p in self.stuck if p in self.server.WORKERS]
        return {
            "timeout": getattr(self.server, "timeout", None),
            "workers_stuck_booting": len(live),
            "booting": sorted(p for p in self.server.WORKERS if p not in self.booted),
        }


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True
