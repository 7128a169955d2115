"""`gunicorn-monitor status [--watch SECONDS] [--json]`: the live picture, in a terminal.

Reads the same directory the exporter reads, and works without the exporter running: each
master (pid, uptime, version, worker class, last deploy), each worker slot (pid, age, phase,
rss, pss, cpu %, requests served where the worker class reports them), and the exits of the
last hour by cause. What cannot be read is shown as `?` (null in JSON), never as a zero; a
directory (or journal) it may not read, or that vanished, is one line and exit status 2.

Bounded whatever the directory's history: the exits come from the end of the journal, read
backwards until the hour is over (exits_since), and the deploys from the counts files.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from typing import Any

import psutil

from monitor.contract import (
    captures,
    causes,
    directory,
    inflight,
    journal,
    metrics,
    state,
)
from monitor.contract.directory import Layout
from monitor.sidecar import compaction, retirement

_CLEAR = "\x1b[H\x1b[2J"


class _Cpu:
    """cpu % of each worker between two looks (the first look of a pid has no answer yet)."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, float]] = {}

    def percent(self, proc: psutil.Process) -> float | None:
        times = proc.cpu_times()
        now = time.monotonic()
        used = times.user + times.system
        before = self._last.get(proc.pid)
        self._last[proc.pid] = (now, used)
        if before is None or now <= before[0]:
            return None
        return round(100.0 * (used - before[1]) / (now - before[0]), 1)


def snapshot(layout: Layout, cpu: _Cpu) -> dict[str, Any]:
    """Everything shown, as plain data (the --json output). OSError (DirectoryError) when the
    directory, or what must be read in it, cannot be: one line for the user, not a guess."""
    directory.open_for_reading(layout.root)  # still there, still ours to read
    now_wall, now_mono = time.time(), time.monotonic()
    masters, bad = state.read(layout)
    mine, marked, last_deploy = deploys(layout)
    out = []
    # Only live children of a live master recorded there: a pid in a state file is data.
    live = state.Children().live(masters)
    for m in sorted(masters, key=lambda m: m.pid):
        if not m.alive:
            continue
        workers = [
            _worker(layout, w, now_wall, now_mono, cpu)
            for w in sorted(live.get(m.pid, []), key=lambda w: w.slot)
        ]
        # Its own start, HUP or USR2; or a mark-deploy, which names no master.
        own = [t for t in (mine.get(m.pid), marked) if t is not None]
        out.append(
            {
                "pid": m.pid,
                "uptime_seconds": round(_age(m.start_ticks, m.start_time, now_wall), 1),
                "version": m.version,
                "worker_class": m.worker_class,
                "workers_desired": m.workers_desired,
                "workers_stuck_booting": m.stuck_booting,
                "last_deploy": max(own, default=None),
                "workers": workers,
            }
        )
    return {
        "time": now_wall,
        "directory": layout.root,
        "masters": out,
        "state_files_unreadable": bad,
        "last_deploy": last_deploy,
        "exits_last_hour": dict(sorted(exits_since(layout, now_wall - 3600).items())),
        "captures": len(captures.load(layout)[0]),
    }


# How many records in a row older than the hour end the backward read: the journal is in time
# order but for one master's backlog (the records it kept while the directory could not be
# written, at most 1,000: hooks/recorder.py), appended late, after another master's newer ones.
OLD_IN_A_ROW = 2000


def exits_since(layout: Layout, since: float) -> collections.Counter:
    """Exits by cause since `since`, read from the end of the journal: its size never counts,
    only the records of the last hour (and OLD_IN_A_ROW more)."""
    found: collections.Counter = collections.Counter()
    old = 0
    with journal.Reader(layout) as reader:
        for r in reader.backwards():
            t = r.get("time")
            if not _is_time(t):
                continue
            if t <= since:
                old += 1
                if old >= OLD_IN_A_ROW:
                    break
                continue
            old = 0
            # The journal is data: only known causes are shown.
            if r.get("event") == "exit" and r.get("cause") in causes.CAUSES:
                found[r["cause"]] += 1
    return found


def deploys(layout: Layout) -> tuple[dict[int, float], float | None, float | None]:
    """The last deploy of each running master (by pid), the last mark-deploy, and the last of
    all: what gunicorn_last_deploy_timestamp_seconds is made of (the masters' `max` gauge
    files and retired.json), not the journal, whose deploy records rotate away."""
    name = metrics.LAST_DEPLOY.name
    per_file: dict[str, float] = {}
    overall = None
    try:
        dir_fd = directory.open_own_for_reading(layout)  # checked, never a symlink
    except FileNotFoundError:
        return {}, None, None
    try:
        for file in os.listdir(dir_fd):
            if not file.startswith("gauge_max_") or not file.endswith(".db"):
                continue
            try:
                values = [e.value for e in compaction.read_entries(file, dir_fd) if e.name == name]
            except (compaction.BadFile, FileNotFoundError):
                continue  # what cannot be read says nothing: shown as ? if nothing else does
            if values and math.isfinite(max(values)):
                per_file[file] = max(values)
        try:
            retired = retirement.read(dir_fd).samples.get((name, name, ()))
            overall = retired if retired is not None and math.isfinite(retired) else None
        except retirement.Unreadable:
            pass
    finally:
        os.close(dir_fd)
    mine = {}  # a master's deploys are in gauge_max_<its pid>.db (the one writer: state.py)
    for file, value in per_file.items():
        pid = file[len("gauge_max_") : -len(".db")]
        if pid.isascii() and pid.isdigit():
            mine[int(pid)] = value
    marked = per_file.get("gauge_max_deploy.db")
    overall = max([v for v in (overall, *per_file.values()) if v is not None], default=None)
    return mine, marked, overall


def _age(ticks: int | None, wall: float | None, now_wall: float) -> float:
    """Seconds since a process started: from its /proc start ticks, which no wall-clock step
    moves; by the wall clock only from a state file of an earlier version."""
    if ticks is not None:
        return state.age_of(ticks)
    return now_wall - (wall or now_wall)


def _is_time(t: object) -> bool:
    return isinstance(t, int | float) and not isinstance(t, bool)


def _worker(layout: Layout, w: state.Worker, now: float, mono: float, cpu: _Cpu) -> dict:
    row: dict[str, Any] = {
        "slot": w.slot,
        "pid": w.pid,
        "age_seconds": round(_age(w.ticks, w.spawned, now), 1) if w.ticks or w.spawned else None,
        "phase": None,
        "in_flight": None,
        "requests_served": None,
        "rss_bytes": None,
        "pss_bytes": None,
        "cpu_percent": None,
    }
    snap = inflight.read(layout, w.pid)
    if snap is not None:
        if not snap.ready:
            row["phase"] = captures.BOOT
        elif not snap.tracks:
            row["phase"] = captures.UNKNOWN
        else:
            row["phase"] = captures.REQUEST if snap.requests else captures.IDLE
            row["requests_served"] = snap.served
            row["in_flight"] = [
                {"method": r.method, "path": r.path, "seconds": round(mono - r.started, 1)}
                for r in snap.requests
            ]
    try:
        proc = psutil.Process(w.pid)
        with proc.oneshot():
            row["rss_bytes"] = proc.memory_info().rss
            row["cpu_percent"] = cpu.percent(proc)
        row["pss_bytes"] = proc.memory_full_info().pss
    except (psutil.Error, OSError, AttributeError):
        pass  # gone, or not ours to read: shown as unknown
    return row


def render(snap: dict[str, Any]) -> str:
    lines = [f"gunicorn-monitor status  {snap['directory']}  {_clock(snap['time'])}"]
    if not snap["masters"]:
        lines.append("no live Gunicorn master recorded here")
    for m in snap["masters"]:
        lines.append(
            f"master {m['pid']}  up {_span(m['uptime_seconds'])}  gunicorn {m['version']}  "
            f"{m['worker_class']}  workers {len(m['workers'])}/{m['workers_desired']}  "
            f"deployed {_clock(m['last_deploy']) if m['last_deploy'] else '?'}"
            + (
                f"  STUCK BOOTING {m['workers_stuck_booting']}"
                if m["workers_stuck_booting"]
                else ""
            )
        )
        lines.append(
            f"  {'slot':>4} {'pid':>8} {'age':>8} {'phase':>8} {'rss':>9} {'pss':>9} "
            f"{'cpu%':>6} {'served':>7}  in flight"
        )
        for w in m["workers"]:
            flight = w["in_flight"]
            flight_text = (
                "?"
                if flight is None
                else ", ".join(f"{r['method']} {r['path']} {r['seconds']}s" for r in flight)
            )
            lines.append(
                f"  {w['slot']:>4} {w['pid']:>8} {_span(w['age_seconds']):>8} "
                f"{w['phase'] or '?':>8} {_mib(w['rss_bytes']):>9} {_mib(w['pss_bytes']):>9} "
                f"{_opt(w['cpu_percent']):>6} {_opt(w['requests_served']):>7}  {flight_text}"
            )
    deploy = snap["last_deploy"]
    lines.append(f"last deploy: {_clock(deploy) if deploy else '?'}")
    exits = snap["exits_last_hour"]
    text = ", ".join(f"{cause} {n}" for cause, n in exits.items()) if exits else "none"
    lines.append(f"exits in the last hour: {text}")
    if snap["captures"]:
        lines.append(f"captures: {snap['captures']} (gunicorn-monitor events --stacks)")
    if snap["state_files_unreadable"]:
        lines.append(f"unreadable state files: {snap['state_files_unreadable']}")
    return "\n".join(lines) + "\n"


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _span(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d"


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f}M"


def _opt(v: object) -> str:
    return "?" if v is None else str(v)


def run(layout: Layout, watch: float = 0.0, as_json: bool = False) -> int:
    """Print the picture (again every `watch` seconds); DirectoryError (one line for the user)
    when something it must read cannot be read, or the directory vanished."""
    try:
        return _run(layout, watch, as_json)
    except directory.DirectoryError:
        raise
    except OSError as e:
        raise directory.DirectoryError(e.errno, directory.cannot_read(layout.own, e)) from None


def _run(layout: Layout, watch: float, as_json: bool) -> int:
    cpu = _Cpu()
    if not watch:
        # cpu % needs two looks: a short first interval, so one call answers.
        snapshot(layout, cpu)
        time.sleep(0.2)
        snap = snapshot(layout, cpu)
        sys.stdout.write(json.dumps(snap, sort_keys=True) + "\n" if as_json else render(snap))
        return 0
    try:
        while True:
            snap = snapshot(layout, cpu)
            if as_json:
                sys.stdout.write(json.dumps(snap, sort_keys=True) + "\n")
            else:
                sys.stdout.write(_CLEAR + render(snap))
            sys.stdout.flush()
            time.sleep(watch)
    except KeyboardInterrupt:
        return 0
