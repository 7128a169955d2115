"""The sidecar: per-slot worker memory, health, bad input, and the command line."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
from prometheus_client.core import GaugeMetricFamily

from monitor.sidecar.collectors.scrape import ScrapeCollector
from tests.harness import BIN, exits, free_port, http_get, value, wait_for


def _slots(samples: dict, name: str = "gunicorn_worker_memory_bytes") -> dict[str, dict]:
    found: dict[str, dict] = {}
    for (n, labels), v in samples.items():
        if n == name:
            d = dict(labels)
            found.setdefault(d["worker"], {})[d.get("type", "value")] = v
    return found


def test_memory_series_follow_the_live_worker_of_each_slot(make_master, make_exporter):
    m = make_master(workers=2).start()
    e = make_exporter()
    samples = wait_for(lambda: (s := e.scrape()) and len(_slots(s)) == 2 and s, 10, "2 slots")
    slots = _slots(samples)
    assert set(slots) == {"0", "1"}
    for types in slots.values():
        assert set(types) == {"rss", "pss", "uss", "swap"}
        assert types["rss"] > 1_000_000 and 0 < types["uss"] <= types["rss"]

    by_slot = {str(w["slot"]): int(pid) for pid, w in m.state()["workers"].items()}
    os.kill(by_slot["0"], signal.SIGKILL)
    m.wait_workers(2, exclude={by_slot["0"]})
    replacement = next(int(p) for p, w in m.state()["workers"].items() if w["slot"] == 0)
    started = psutil.Process(replacement).create_time()

    def slot0_is_replacement() -> bool:
        s = _slots(e.scrape(), "gunicorn_worker_start_time_seconds")
        return set(s) == {"0", "1"} and abs(s["0"]["value"] - started) < 0.5

    wait_for(slot0_is_replacement, 10, "slot 0 shows the replacement")
    after = e.scrape()
    assert set(_slots(after)) == {"0", "1"}
    assert value(after, "gunicorn_worker_exit_memory_bytes_count", cause="killed") == 1
    assert value(after, "gunicorn_worker_exit_memory_bytes_count", cause="timeout") == 0

    m.signal(signal.SIGTERM)
    m.wait_exit()
    gone = e.scrape()  # the very next scrape: the finished master's workers are gone
    assert _slots(gone) == {}
    assert value(gone, "gunicorn_up") == 0
    assert ("gunicorn_master_memory_bytes", (("type", "rss"),)) not in gone


def test_500_recycles_lose_no_exit_and_add_no_series(make_master, make_exporter):
    m = make_master(workers=2, env={"GUNICORN_MAX_REQUESTS": "1"}).start()
    e = make_exporter()
    served, series = 1, set()  # start() asked once whether the app answers
    for i in range(500):
        assert http_get(m.url + "/")[0] == 200
        served += 1
        if i % 25 == 0:
            series.update(k for k in e.scrape() if k[0].startswith("gunicorn_worker_"))
    want = {("max_requests", "none"): float(served)}
    wait_for(lambda: exits(e.scrape()) == want, 60, f"{served} exits")
    final = e.scrape()
    series.update(k for k in final if k[0].startswith("gunicorn_worker_"))
    slots = {dict(labels).get("worker") for _, labels in series} - {None}
    assert slots <= {"0", "1", "2", "3"}, slots  # bounded by the overlap, never by churn
    spawned = served + 2  # each exit's replacement is forked on the master's next loop turn
    wait_for(lambda: value(e.scrape(), "gunicorn_worker_spawns_total") == spawned, 10, "spawns")
    m.signal(signal.SIGTERM)
    m.wait_exit()
    assert exits(e.scrape()) == {**want, ("shutdown", "SIGTERM"): 2.0}


def test_ready_means_a_live_master_is_recorded(make_master, make_exporter):
    e = make_exporter()  # before Gunicorn: healthy, not ready
    assert http_get(e.url + "/-/healthy")[0] == 200
    assert http_get(e.url + "/-/ready")[0] == 503
    assert value(e.scrape(), "gunicorn_up") == 0
    m = make_master(workers=1).start()
    wait_for(lambda: http_get(e.url + "/-/ready")[0] == 200, 10, "ready")
    m.signal(signal.SIGTERM)
    m.wait_exit()
    assert http_get(e.url + "/-/ready")[0] == 503
    status, body = http_get(e.url + "/")
    assert status == 200 and b"/metrics" in body or b"metrics" in body


def test_openmetrics_and_gzip_by_request_headers(make_exporter):
    e = make_exporter()
    req = {"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"}
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(e.url + "/metrics", headers=req)) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        text = gzip.decompress(r.read()).decode()
    assert text.rstrip().endswith("# EOF")
    assert "gunicorn_worker_exits_total" in text


def test_bad_files_in_the_shared_directory_are_skipped_and_counted(make_master, make_exporter):
    m = make_master(workers=1).start()
    own = m.dir / "gunicorn-monitor"
    (own / "counter_999999.db").write_bytes(b"")
    (own / "histogram_999998.db").write_bytes(b"\xff" * 100)
    (own / "master-1.json").write_text("{not json")
    e = make_exporter()
    samples = e.scrape()
    assert value(samples, "gunicorn_exporter_files_skipped_total") >= 3
    assert value(samples, "gunicorn_worker_spawns_total") == 1
    assert value(samples, "gunicorn_up") == 1


def test_overlapping_scrapes_collect_once():
    class Slow:
        calls = 0

        def collect(self):
            Slow.calls += 1
            time.sleep(0.3)
            return []

    scrape = ScrapeCollector({"slow": Slow()})
    threads = [threading.Thread(target=lambda: list(scrape.collect())) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert Slow.calls <= 2  # one running, at most one more for those that came after it


def test_a_source_is_collected_again_exactly_when_its_inputs_changed():
    class Source:
        def __init__(self) -> None:
            self.calls = 0

        def collect(self):
            self.calls += 1
            return [GaugeMetricFamily(f"g{id(self)}", "A gauge.", value=self.calls)]

    app, lifecycle = Source(), Source()
    parts: dict = {}
    scrape = ScrapeCollector({"app": app, "lifecycle": lifecycle}, parts=lambda: dict(parts))
    for app_inputs, own_inputs, want in [
        (1, "a", (1, 1)),
        (2, "a", (2, 1)),  # the app's files moved: the app alone is read again
        (2, "a", (2, 1)),
        (2, "b", (2, 2)),
        (None, "b", (3, 2)),  # inputs unknown (a refused directory, no parts): collected
        (3, None, (4, 3)),
    ]:
        parts.clear()
        parts.update({k: v for k, v in [("app", app_inputs), ("lifecycle", own_inputs)] if v})
        names = {f.name for f in scrape.collect()}
        assert (app.calls, lifecycle.calls) == want
        assert {f"g{id(app)}", f"g{id(lifecycle)}"} <= names  # reused families are served


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "gunicorn-monitor"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_bad_flags_and_directories_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "not-a-dir").write_text("")  # a missing one is waited for (test_start_order)
    cases = [
        ("serve", "--bogus"),
        ("serve", "--dir", str(tmp_path / "not-a-dir")),
        ("serve", "--dir", str(tmp_path), "--listen", "nonsense"),
        ("events", "--dir", str(tmp_path / "missing")),
    ]
    for args in cases:
        result = _cli(*args)
        assert result.returncode == 2, args
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_a_port_in_use_is_one_line_and_exit_2(shared_dir):
    import socket

    with socket.socket() as s:
        port = free_port()
        s.bind(("127.0.0.1", port))
        s.listen()
        result = _cli("serve", "--dir", str(shared_dir), "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr


def test_mark_deploy_moves_the_deploy_gauge_and_is_journaled(shared_dir, make_exporter):
    e = make_exporter()
    assert value(e.scrape(), "gunicorn_last_deploy_timestamp_seconds") == 0
    before = time.time()
    assert _cli("mark-deploy", "--dir", str(shared_dir)).returncode == 0
    assert value(e.scrape(), "gunicorn_last_deploy_timestamp_seconds") >= before
    events = _cli("events", env={"PROMETHEUS_MULTIPROC_DIR": str(shared_dir)})
    assert '"event": "mark_deploy"' in events.stdout


def test_a_sidecar_of_another_user_serves_a_gap_never_zeros(make_master, make_exporter, tmp_path):
    """The hooks write their files 0600, for the sidecar of the same user (README: trust
    model). Another user's sidecar reads none of them: that is a gap, counted, never zeros that
    Prometheus would take for a reset."""
    # Under /tmp itself: pytest's own temporary tree is closed to other users.
    shared = Path(tempfile.mkdtemp(prefix="gm-other-user-"))
    try:
        _other_user_scrape(shared, make_master, make_exporter, tmp_path)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _other_user_scrape(shared, make_master, make_exporter, tmp_path) -> None:
    m = make_master(shared_dir=shared, workers=2, log_path=tmp_path / "g.log").start()
    for d in (shared, shared / "gunicorn-monitor"):
        d.chmod(0o755)
    e = make_exporter(
        shared_dir=shared,
        prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
    )
    samples = e.scrape()
    assert value(samples, "gunicorn_exporter_errors_total", kind="unreadable") >= 1
    assert ("gunicorn_up", ()) not in samples, "unread is not down"
    assert not [k for k in samples if k[0].startswith("gunicorn_worker_")], samples
    os.kill(m.worker_pids()[0], signal.SIGKILL)  # the counts move where it cannot see them
    assert not [k for k in e.scrape() if k[0].startswith("gunicorn_worker_exits")]
    e.kill()
    assert "Traceback" not in e.proc.stdout.read().decode()
