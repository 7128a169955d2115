"""`gunicorn-monitor events --stacks`: the captures, for a person reading a terminal at 3 a.m.

Each capture (monitor/contract/captures.py) with the exit it belongs to (the journal's exit
record names it): time, slot, pid, cause, phase, the requests in flight, then the stack.
Nothing in a capture is trusted to be well formed: a missing field prints as `?`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from monitor.contract import captures, journal
from monitor.contract.directory import Layout


def render(layout: Layout, last: int = 0) -> tuple[str, int]:
    """The text for the captures (the last N if N > 0), and the count of unreadable files."""
    records, bad = captures.load(layout)
    if last > 0:
        records = records[-last:]
    with journal.Reader(layout) as reader:  # streamed: only exits with a capture are kept
        exits = _exits_by_capture(reader.records())
    blocks = [_block(rec, exits.get(rec["name"])) for rec in records]
    if not blocks:
        return "no captures\n", bad
    return "\n".join(blocks), bad


def _exits_by_capture(records: Iterable[dict]) -> dict[str, dict]:
    return {
        r["capture"]: r
        for r in records
        if r.get("event") == "exit" and isinstance(r.get("capture"), str)
    }


def _when(t: object) -> str:
    if isinstance(t, int | float) and not isinstance(t, bool):
        try:
            return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
        except (OverflowError, OSError, ValueError):
            pass
    return "?"


def _field(rec: dict, key: str) -> str:
    value = rec.get(key)
    return "?" if value is None else str(value)


def _block(rec: dict, exit_rec: dict | None) -> str:
    if exit_rec is not None:
        cause = f"{_field(exit_rec, 'cause')} ({_field(exit_rec, 'signal')})"
    else:
        cause = "(still running)" if rec.get("reason") == captures.STUCK_BOOTING else "?"
    head = (
        f"{_when(rec.get('time'))}  slot {_field(rec, 'slot')}  pid {_field(rec, 'pid')}  "
        f"cause {cause}  phase {_field(rec, 'phase')}  captured for {_field(rec, 'reason')}"
    )
    lines = [head]
    if rec.get("booting_seconds") is not None:
        lines.append(f"  booting for {rec['booting_seconds']}s")
    lines.append("  requests in flight: " + _requests(rec.get("requests")))
    if rec.get("untracked_requests"):
        lines.append(f"  (+{rec['untracked_requests']} not tracked: more than the worker's slots)")
    lines.append("  stack:" + ("  (truncated)" if rec.get("truncated") else ""))
    stack = rec.get("stack") if isinstance(rec.get("stack"), str) else ""
    lines.extend("    " + line for line in stack.rstrip("\n").splitlines())
    lines.append(f"  file: {rec['name']}")
    return "\n".join(lines) + "\n"


def _requests(requests: object) -> str:
    if isinstance(requests, str):
        return requests
    if not isinstance(requests, list):
        return "?"
    if not requests:
        return "none"
    shown = []
    for r in requests:
        if isinstance(r, dict):
            shown.append(f"{r.get('method', '?')} {r.get('path', '?')} ({r.get('seconds', '?')}s)")
    return ", ".join(shown) or "?"
