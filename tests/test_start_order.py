"""The sidecar starts in any order: before the directory exists, beside an empty one, before or
after Gunicorn, and again after a SIGKILL, and the very next scrape after Gunicorn is up serves
everything, with no restart. A directory that exists but may not be trusted or read stops it
at start with one line; one that turns unsafe later is refused until it is fixed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from tests.harness import (
    BIN,
    Exporter,
    check_metrics,
    exits,
    http_get,
    parse,
    value,
    wait_for,
)


def _ready(e: Exporter) -> tuple[int, str]:
    status, body = e.get("/-/ready")
    return status, body.decode()


def _assert_waiting(e: Exporter, reason: str) -> None:
    """Up and healthy, not ready (and why), serving nothing of Gunicorn's: `gunicorn_up 0` for
    a directory not there yet, and for one it may not read a gap, with the refusal counted."""
    assert e.get("/-/healthy")[0] == 200
    status, why = _ready(e)
    assert status == 503 and reason in why, why
    status, body = e.get("/metrics")
    assert status == 200
    check_metrics(body)
    samples = parse(body.decode())
    if "does not exist yet" in reason:
        assert value(samples, "gunicorn_up") == 0 and ("gunicorn_up", ()) in samples
    else:
        assert ("gunicorn_up", ()) not in samples, "a master may be up there: a gap, not a 0"
        refused = value(samples, "gunicorn_exporter_errors_total", kind="unreadable")
        assert refused >= 1
        again = value(e.scrape(), "gunicorn_exporter_errors_total", kind="unreadable")
        assert again == refused + 1, "every refused scrape is counted"
    assert not [k for k in samples if k[0].startswith("gunicorn_worker_")], samples


def _assert_everything(e: Exporter, workers: int) -> dict:
    """One scrape, no waiting: the master, its workers' slots and the counts are all there."""
    samples = e.scrape()
    assert value(samples, "gunicorn_up") == 1
    assert value(samples, "gunicorn_workers") == workers
    slots = {
        dict(labels)["worker"]
        for name, labels in samples
        if name == "gunicorn_worker_memory_bytes" and dict(labels)["type"] == "rss"
    }
    assert slots == {str(i) for i in range(workers)}
    assert value(samples, "gunicorn_worker_spawns_total") >= workers
    assert _ready(e)[0] == 200
    return samples


def _kill_one_worker(m, e: Exporter, workers: int) -> None:
    """SIGKILL a worker, wait for its replacement, and see the exit and its memory counted."""
    victim = m.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    m.wait_workers(workers, exclude={victim})

    def counted() -> bool:
        s = e.scrape()
        return (
            exits(s).get(("killed", "SIGKILL")) == 1
            and value(s, "gunicorn_worker_exit_memory_bytes_count", cause="killed") == 1
        )

    wait_for(counted, 15, "the killed worker's exit and its memory at exit")


def test_sidecar_first_before_the_directory_exists(tmp_path, make_master):
    shared = tmp_path / "volume" / "multiproc"
    e = Exporter(shared).start()
    try:
        _assert_waiting(e, "does not exist yet")
        assert not shared.exists(), "the sidecar must not create the directory"
        m = make_master(shared_dir=shared, workers=2, log_path=tmp_path / "g.log").start()
        _assert_everything(e, 2)
        # The journal appeared after the sidecar started: it follows it from its first line.
        _kill_one_worker(m, e, 2)
        for _ in range(3):
            assert http_ok(m.url)
        samples = e.scrape()  # the app's own counter, from files that did not exist at start
        assert value(samples, "demo_requests_total", endpoint="/") >= 3
    finally:
        e.kill()
    assert b"Traceback" not in e.proc.stdout.read()


def http_ok(url: str) -> bool:
    return http_get(url + "/")[0] == 200


def test_sidecar_first_beside_an_empty_directory(shared_dir, make_master, make_exporter):
    e = make_exporter()
    _assert_waiting_empty(e)
    make_master(workers=2).start()
    _assert_everything(e, 2)


def _assert_waiting_empty(e: Exporter) -> None:
    status, why = _ready(e)
    assert status == 503 and "no live Gunicorn master" in why, why
    status, body = e.get("/metrics")
    assert status == 200
    check_metrics(body)
    assert value(parse(body.decode()), "gunicorn_up") == 0


def test_sidecar_before_gunicorn_over_a_previous_runs_files(shared_dir, make_master, make_exporter):
    """A restarted pod on a kept volume: the last run's counts are served, down, until the new
    master is up; then the next scrape has it."""
    old = make_master(workers=1).start()
    os.kill(old.worker_pids()[0], signal.SIGKILL)
    old.wait_workers(1, exclude=set(old.seen_pids))
    old.signal(signal.SIGTERM)
    old.wait_exit()
    e = make_exporter()
    samples = e.scrape()
    assert value(samples, "gunicorn_up") == 0
    assert exits(samples).get(("killed", "SIGKILL")) == 1
    assert _ready(e)[0] == 503
    make_master(workers=2).start()
    samples = _assert_everything(e, 2)
    assert exits(samples).get(("killed", "SIGKILL")) == 1  # the kept count, still there


def test_sidecar_after_gunicorn(make_master, make_exporter):
    m = make_master(workers=2).start()
    e = make_exporter()
    _assert_everything(e, 2)
    _kill_one_worker(m, e, 2)


def test_sidecar_killed_and_restarted_in_the_middle(make_master, make_exporter):
    m = make_master(workers=2).start()
    e = make_exporter()
    for _ in range(3):  # exits and scrapes interleaved
        victim = m.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        m.wait_workers(2, exclude={victim})
        e.scrape()
    want = {("killed", "SIGKILL"): 3.0}
    wait_for(lambda: exits(e.scrape()) == want, 10, "three exits counted")
    for _ in range(5):
        assert http_ok(m.url)
    scrapes = threading.Thread(target=lambda: [e.get("/metrics", 2) for _ in range(50)])
    scrapes.start()
    e.proc.send_signal(signal.SIGKILL)  # in the middle of a scrape, most likely
    e.proc.wait(10)
    scrapes.join(60)
    again = make_exporter()
    samples = _assert_everything(again, 2)
    assert exits(samples) == want
    assert value(samples, "demo_requests_total", endpoint="/") >= 5


# A directory that must not be read.


def _serve(directory: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [*prefix, str(BIN / "gunicorn-monitor"), "serve", "--dir", str(directory)]
    cmd += ["--listen", "127.0.0.1:1"]  # never reached: the directory check comes first
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)


def _one_line_exit_2(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_an_unusable_or_unsafe_directory_is_one_line_and_exit_2(tmp_path):
    real = tmp_path / "real"
    (real / "gunicorn-monitor").mkdir(parents=True, mode=0o700)
    (tmp_path / "link").symlink_to(real)
    _one_line_exit_2(_serve(tmp_path / "link"), "symlink")
    (tmp_path / "file").write_text("")
    _one_line_exit_2(_serve(tmp_path / "file"), "not a directory")
    others = tmp_path / "others"
    (others / "gunicorn-monitor").mkdir(parents=True)
    os.chown(others, 65534, 65534)
    _one_line_exit_2(_serve(others), "owned by uid 65534")
    open_own = tmp_path / "open"
    (open_own / "gunicorn-monitor").mkdir(parents=True)
    (open_own / "gunicorn-monitor").chmod(0o777)
    _one_line_exit_2(_serve(open_own), "writable by group or others")


def test_a_directory_it_may_not_read_is_one_line_and_exit_2():
    closed = Path(tempfile.mkdtemp(prefix="gm-closed-"))  # root's, 0700; /tmp is open to all
    try:
        nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
        _one_line_exit_2(_serve(closed, nobody), "not readable")
    finally:
        shutil.rmtree(closed)


def test_a_directory_that_turns_unsafe_is_refused_until_fixed(make_master, make_exporter):
    m = make_master(workers=1).start()
    e = make_exporter()
    _assert_everything(e, 1)
    own = m.dir / "gunicorn-monitor"
    own.chmod(0o777)
    try:
        _assert_waiting(e, "writable by group or others")
    finally:
        own.chmod(0o700)
    _assert_everything(e, 1)
    log = e.proc.stdout
    e.kill()
    text = log.read().decode()
    assert text.count("event=directory_refused") == 1, text


@pytest.mark.parametrize("late", ["symlink", "foreign"])
def test_a_directory_that_appears_unsafe_is_never_read(tmp_path, make_master, late):
    """The path appears later, but as a symlink to (or another user's copy of) a live
    Gunicorn's directory: nothing from it is served."""
    m = make_master(shared_dir=tmp_path / "real", workers=1, log_path=tmp_path / "g.log")
    m.start()
    path = tmp_path / "late"
    e = Exporter(path).start()
    try:
        _assert_waiting(e, "does not exist yet")
        if late == "symlink":
            path.symlink_to(m.dir)
            _assert_waiting(e, "is a symlink")
        else:
            shutil.copytree(m.dir, path, symlinks=True)
            os.chown(path, 65534, 65534)
            _assert_waiting(e, "owned by uid 65534")
    finally:
        e.kill()
