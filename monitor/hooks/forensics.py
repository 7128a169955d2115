"""Why a worker hung: the pure decisions, evidence in, answer out (like classify.py).

The gathering is elsewhere: the worker's table and stacks file (monitor/contract/inflight.py,
monitor/hooks/capture.py) and the master's watch (monitor/hooks/watch.py). Here: which phase a
worker was in, which requests it was serving and for how long, when a boot counts as stuck or
as timed out, and the one log line that says all of it.
"""

from __future__ import annotations

from monitor.contract import captures
from monitor.contract.inflight import Snapshot


def phase(snap: Snapshot | None) -> str:
    """boot until post_worker_init; then request or idle where the class reports requests."""
    if snap is None:
        return captures.UNKNOWN
    if not snap.ready:
        return captures.BOOT
    if not snap.tracks or snap.unreadable:
        return captures.UNKNOWN
    return captures.REQUEST if snap.requests or snap.overflow else captures.IDLE


def requests_in_flight(snap: Snapshot | None, now: float) -> list[dict] | str:
    """[{method, path, seconds}], longest first; `unknown` where the worker cannot say."""
    if snap is None or not snap.tracks:
        return captures.UNKNOWN
    found = [
        {"method": r.method, "path": r.path, "seconds": round(max(0.0, now - r.started), 3)}
        for r in snap.requests
    ]
    return sorted(found, key=lambda r: -r["seconds"])


def boot_age(snap: Snapshot | None, now: float) -> float | None:
    """Seconds a worker has been booting (monotonic), None once it is ready or unknown."""
    if snap is None or snap.ready:
        return None
    return max(0.0, now - snap.forked)


def stuck_booting(age: float | None, timeout: float) -> bool:
    """Booting for longer than `timeout`: Gunicorn would have aborted it, had it ever notified."""
    return age is not None and timeout > 0 and age > timeout


def boot_timed_out(age: float | None, boot_timeout: float) -> bool:
    return age is not None and boot_timeout > 0 and age > boot_timeout


def capture_reason(sig_name: str, aborted: bool, stopping: bool, booting: bool) -> str | None:
    """Which capture a signal from the master calls for, if any."""
    if sig_name == "SIGABRT" and aborted:
        return captures.BOOT_TIMEOUT if booting else captures.TIMEOUT
    if sig_name == "SIGKILL" and aborted:
        return captures.TIMEOUT  # the escalation: normally captured at the SIGABRT already
    if sig_name == "SIGKILL" and stopping:
        return captures.SHUTDOWN_KILL
    return None


def describe(requests: list[dict] | str) -> str:
    """`GET /sleep 3.1s, POST /upload 0.4s` for a log line; `unknown` or `none`."""
    if isinstance(requests, str):
        return requests
    if not requests:
        return "none"
    return ", ".join(f"{r['method']} {r['path']} {r['seconds']}s" for r in requests)


def log_line(record: dict) -> str:
    """The structured line; the caller puts the stack on the following lines."""
    return (
        "gunicorn-monitor event=worker_capture pid={pid} slot={slot} reason={reason} "
        "phase={phase} requests={requests} capture={name}".format(
            pid=record.get("pid"),
            slot=record.get("slot"),
            reason=record.get("reason"),
            phase=record.get("phase"),
            requests=_quote(describe(record.get("requests", captures.UNKNOWN))),
            name=record.get("name"),
        )
    )


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"' if " " in text else text
