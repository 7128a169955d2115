"""What the monitor costs a fleet in series, and that every scrape is valid exposition.

Every pod pays for every series the sidecar serves, so the budget is a test: at rest with 4
workers at most 81 series from the monitor (the app's own metrics excluded), and each further
worker at most 7. Histograms have series only for causes that have happened. And a live scrape
after every cause passes `promtool check metrics` (text, plain and gzip) and prometheus_client's
strict OpenMetrics parser (OpenMetrics, plain and gzip; promtool reads only the text format).
"""

from __future__ import annotations

import gzip
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

from monitor.contract import causes, metrics
from tests.harness import (
    BIN,
    ROOT,
    check_metrics,
    exits,
    http_get,
    parse,
    value,
    wait_for,
    write_multiprocess_file,
)

AT_REST_4_WORKERS = 81  # README "Series per pod": 80, and one to spare
PER_WORKER = 7
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
STABLE = 2.5  # seconds


def monitor_series(samples: dict) -> set:
    """The series the monitor serves: everything but the app's own metrics."""
    return {key for key in samples if key[0].startswith("gunicorn_")}


def slots(samples: dict) -> set[str]:
    return {dict(labels)["worker"] for _, labels in samples if "worker" in dict(labels)}


def settled(e, workers: int) -> set:
    """The monitor's series once `workers` workers are up and sampled and nothing has changed
    for STABLE seconds (the master records a boot on its next loop turn, a second apart)."""
    last: dict = {"series": None, "since": 0.0}

    def stable() -> set | None:
        time.sleep(0.25)
        samples = e.scrape()
        if value(samples, "gunicorn_workers") != workers or len(slots(samples)) != workers:
            last["series"] = None
            return None
        series = monitor_series(samples)
        if series != last["series"]:
            last.update(series=series, since=time.monotonic())
            return None
        return series if time.monotonic() - last["since"] >= STABLE else None

    return wait_for(stable, 30, f"{workers} workers settled")


def test_series_at_rest_stay_within_the_budget_and_grow_by_at_most_7_a_worker(
    make_master, make_exporter
):
    m = make_master(workers=4).start()
    e = make_exporter()
    at_four = settled(e, 4)
    for _ in range(4):
        m.signal(signal.SIGTTIN)
        time.sleep(0.05)  # Gunicorn handles one queued signal per loop turn; a burst is merged
    m.wait_workers(8)
    at_eight = settled(e, 8)
    names = sorted({name for name, _ in at_four})
    assert len(at_four) <= AT_REST_4_WORKERS, (len(at_four), names)
    per_worker = (len(at_eight) - len(at_four)) / 4
    assert per_worker <= PER_WORKER, sorted(at_eight - at_four)
    # no histogram has a series before anything happened to it
    assert not {n for n in names if n.startswith("gunicorn_worker_lifetime_seconds")}
    assert not {n for n in names if n.startswith("gunicorn_worker_exit_memory_bytes")}


def test_optional_collectors_can_be_switched_off(make_master, make_exporter, shared_dir):
    m = make_master(workers=2).start()
    on = make_exporter()
    off = make_exporter(
        args=("--no-collector.smaps", "--no-collector.lifetime", "--no-collector.exit_memory"),
        env={"GUNICORN_MONITOR_COLLECTOR_APP": "false"},
    )
    pid = m.worker_pids()[0]
    wait_for(lambda: len(slots(off.scrape())) == 2, 10, "2 slots")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: exits(on.scrape()) == {("killed", "SIGKILL"): 1.0}, 10, "the kill")
    full = wait_for(
        lambda: (
            (s := on.scrape())
            and value(s, "gunicorn_worker_exit_memory_bytes_count", cause="killed") == 1
            and s
        ),
        10,
        "exit memory recorded",
    )
    lean = wait_for(lambda: (s := off.scrape()) and exits(s) and s, 10, "the kill, lean")
    assert exits(lean) == {("killed", "SIGKILL"): 1.0}  # the counts never switch off
    for name in ("gunicorn_worker_lifetime_seconds", "gunicorn_worker_exit_memory_bytes"):
        assert any(k[0].startswith(name) for k in full), name
        assert not any(k[0].startswith(name) for k in lean), name
    assert {dict(k[1]).get("type") for k in lean} - {None} == {"rss"}
    assert "demo_requests_total" in {k[0] for k in full}
    assert not any(k[0].startswith("demo_") for k in lean)
    assert len(monitor_series(lean)) < len(monitor_series(full))

    bad = subprocess.run(
        [str(BIN / "gunicorn-monitor"), "serve", "--dir", str(shared_dir)],
        env={**os.environ, "GUNICORN_MONITOR_COLLECTOR_SMAPS": "maybe"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "GUNICORN_MONITOR_COLLECTOR_SMAPS" in bad.stderr and "Traceback" not in bad.stderr


def _scrapes(url: str) -> dict[tuple[str, bool], str]:
    """The same scrape in every form Prometheus may ask for: text or OpenMetrics, gzip or not."""
    found = {}
    for accept in ("text/plain; version=0.0.4", OPENMETRICS):
        for gz in (False, True):
            headers = {"Accept": accept, **({"Accept-Encoding": "gzip"} if gz else {})}
            req = urllib.request.Request(url + "/metrics", headers=headers)
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                assert (r.headers.get("Content-Encoding") == "gzip") == gz
            found[(accept, gz)] = (gzip.decompress(body) if gz else body).decode()
    return found


def _check(url: str, what: str) -> dict:
    """Every form of one scrape is valid; returns its samples."""
    scraped = _scrapes(url)
    for (accept, gz), text in scraped.items():
        if accept == OPENMETRICS:
            families = list(om_parse(text))  # strict: raises on anything out of spec
            assert families, what
        else:
            output = check_metrics(text.encode())
            assert not output.strip(), (what, gz, output)  # not a lint finding either
    samples = parse(scraped[("text/plain; version=0.0.4", False)])
    happened = {cause for cause, _ in exits(samples)}
    for name in ("gunicorn_worker_lifetime_seconds", "gunicorn_worker_exit_memory_bytes"):
        labelled = {dict(k[1]).get("cause") for k in samples if k[0].startswith(name)}
        assert labelled <= happened, (what, name, labelled - happened)
    return samples


def _unseen_causes(path, ident: str) -> None:
    """The causes no test here brings about (oom needs a memory cgroup, see test_oom.py; unknown
    never happens; clean_exit and orphaned have tests of their own), as a master records them: in
    the contract's format."""
    exits_spec, life = metrics.WORKER_EXITS, metrics.WORKER_LIFETIME
    unseen = (
        (causes.OOM, "SIGKILL"),
        (causes.UNKNOWN, causes.NO_SIGNAL),
        (causes.CLEAN_EXIT, causes.NO_SIGNAL),
        (causes.ORPHANED, causes.NO_SIGNAL),
    )
    write_multiprocess_file(
        path / f"counter_{ident}.db",
        [
            (exits_spec, exits_spec.name + "_total", {"cause": c, "signal": s}, 1.0)
            for c, s in unseen
        ],
    )
    histogram = []
    for cause, _ in unseen:
        histogram.append((life, life.name + "_sum", {"cause": cause}, 42.0))
        histogram.append((life, life.name + "_bucket", {"cause": cause, "le": "60.0"}, 1.0))
    write_multiprocess_file(path / f"histogram_{ident}.db", histogram)


def test_a_live_scrape_after_every_cause_is_valid_exposition(make_master, make_exporter, tmp_path):
    env = {"GUNICORN_TIMEOUT": "2", "GUNICORN_MAX_REQUESTS": "30"}
    m = make_master(workers=2, env=env).start()
    e = make_exporter()
    counts = {"at rest": len(monitor_series(_check(e.url, "at rest")))}

    def happened(cause: str, sig: str | None = None) -> None:
        def seen() -> bool:
            return any(c == cause and sig in (None, s) for c, s in exits(e.scrape()))

        wait_for(seen, 30, cause)
        counts[cause] = len(monitor_series(_check(e.url, cause)))

    for sig, cause in ((signal.SIGTERM, causes.SIGNAL), (signal.SIGKILL, causes.KILLED)):
        pids = m.worker_pids()
        os.kill(pids[0], sig)
        happened(cause)
        m.wait_workers(2, exclude={pids[0]})
    http_get(m.url + "/exit?code=7", timeout=10)
    happened(causes.CRASH)
    m.wait_workers(2)
    threading.Thread(target=http_get, args=(m.url + "/sleep?s=60", 60), daemon=True).start()
    happened(causes.TIMEOUT)
    m.wait_workers(2)
    for _ in range(70):
        http_get(m.url + "/", timeout=10)
    happened(causes.MAX_REQUESTS)
    m.wait_workers(2)
    m.signal(signal.SIGTTOU)
    happened(causes.SCALE_DOWN)
    m.wait_workers(1)
    m.signal(signal.SIGHUP)
    happened(causes.RELOAD)
    m.signal(signal.SIGTERM)
    m.wait_exit()
    happened(causes.SHUTDOWN)

    broken = tmp_path / "brokenapp.py"
    broken.write_text("raise RuntimeError('cannot import this app')\n")
    failing = [
        (causes.BOOT_ERROR, {"app": "brokenapp:app", "env": {"PYTHONPATH": f"{tmp_path}:{ROOT}"}}),
        (causes.APP_LOAD_ERROR, {"app": "examples.app:missing"}),
    ]
    for cause, kwargs in failing:
        make_master(workers=1, **kwargs).start(wait=False).wait_exit()
        happened(cause)
    _unseen_causes(m.dir / "gunicorn-monitor", "999999")
    for cause in (causes.OOM, causes.UNKNOWN, causes.CLEAN_EXIT, causes.ORPHANED):
        happened(cause)
    logging.getLogger(__name__).info("monitor series after each cause: %s", counts)
    assert set(counts) == {"at rest", *causes.CAUSES}
