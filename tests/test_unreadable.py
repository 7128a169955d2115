"""A bad file costs only itself, and what may not be read is named.

Garbage and cut files are put next to a real master's (as a disk error, a copy gone wrong or a
crash of an earlier version leaves them); permissions are real: a second user through setpriv.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from monitor.contract import directory, metrics
from monitor.sidecar.counts import SPECS
from tests.harness import BIN, CONFIG, NOBODY, ROOT, Exporter, exits, value, wait_for

CLI = str(BIN / "gunicorn-monitor")
GONE = 1_000_000  # a dead master's pid, above any pid_max this runs under
# The families the master's counts files hold: all but exit memory (the sidecar measures it)
# and boot times (the master's watch records them on its own thread, whenever it sees one).
COUNTS = tuple(
    n for n in SPECS if n not in (metrics.WORKER_EXIT_MEMORY.name, metrics.WORKER_BOOT.name)
)


def _counts(samples: dict) -> dict:
    return {k: v for k, v in samples.items() if k[0].startswith(COUNTS)}


def test_a_garbage_or_cut_counts_file_costs_only_itself(make_master, make_exporter):
    m = make_master(workers=2).start()
    victim = m.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    m.wait_workers(2, exclude={victim})
    clean = make_exporter()
    wait_for(lambda: exits(clean.scrape()) == {("killed", "SIGKILL"): 1.0}, 10, "the exit")
    expected = _counts(clean.scrape())
    own = m.dir / "gunicorn-monitor"
    real = m.file("counter").read_bytes()
    (own / f"counter_{GONE}.db").write_bytes(real[: len(real) // 2])  # cut mid-record
    (own / f"histogram_{GONE}.db").write_bytes(b"\x40\x00\x00\x00" + os.urandom(60))  # garbage
    (own / "gauge_max_1000001.db").write_bytes(b"")  # an earlier version's, empty

    e = make_exporter()
    samples = e.scrape()
    # Every family and series the master's files hold is served, with its value: only the
    # bad files are left out (an earlier version left out every counter family: 29 of 49).
    assert _counts(samples) == expected
    assert value(samples, "gunicorn_exporter_files_skipped_total") >= 3
    assert value(samples, "gunicorn_exporter_errors_total", kind="malformed") >= 3
    # A dead master's bad file is never folded half nor removed: it stays, said each time,
    # while another dead master's good one beside it is retired.
    shutil.copyfile(m.file("gauge_max"), own / f"gauge_max_{GONE + 5}.db")
    retired = (own / f"gauge_max_{GONE + 5}.db").exists
    wait_for(lambda: e.scrape() and not retired(), 20, "the good one retired")  # at a scrape
    assert (own / f"counter_{GONE}.db").read_bytes() == real[: len(real) // 2]
    assert _counts(e.scrape()) == expected


def test_a_counts_file_read_good_keeps_its_values_when_it_turns_bad(make_master, make_exporter):
    """The master's own file, cut under it: the sidecar serves what it read last, never a drop
    (Prometheus would read a reset, and increase() would invent as many exits)."""
    m = make_master(workers=1).start()
    e = make_exporter()
    for n in (1, 2):
        victim = m.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        m.wait_workers(1, exclude={victim})
        wait_for(lambda n=n: exits(e.scrape()) == {("killed", "SIGKILL"): float(n)}, 10, "exit")
    before = _counts(e.scrape())
    counter = m.file("counter")
    data = counter.read_bytes()
    with open(counter, "r+b") as f:  # in place: the master sees the same inode and size
        f.write(b"\xff\xff\xff\x7f")  # a header that promises more than the file holds
    (m.dir / "gunicorn-monitor" / "poke").write_text("1")  # the sidecar collects anew
    samples = e.scrape()
    assert _counts(samples) == before
    assert value(samples, "gunicorn_exporter_errors_total", kind="malformed") >= 1
    counter.write_bytes(data)


def _closed_directory() -> tuple[Path, Path]:
    """Gunicorn's directory as root leaves it: the top readable by all, gunicorn-monitor/
    root's and 0700. Returns (the volume, the directory)."""
    volume = Path(tempfile.mkdtemp(prefix="gm-closed-"))
    volume.chmod(0o755)
    shared = volume / "multiproc"
    shared.mkdir(mode=0o755)
    layout = directory.create(str(shared))
    with open(layout.journal, "w") as f:
        f.write('{"event":"spawn","pid":12,"time":1.0}\n')
    return volume, shared


def _one_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0, result
    lines = (result.stdout + result.stderr).strip().splitlines()
    failing = [line for line in lines if all(w in line for w in words)]
    assert failing, lines
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="runs commands as another user")
def test_another_user_is_told_the_permission_the_owner_and_the_mode():
    volume, shared = _closed_directory()
    try:
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        why = ("not readable by uid 65534", "r-x", "owned by uid 0", "mode 0700")
        for command in (["status"], ["events"], ["events", "--last", "5"]):
            result = subprocess.run(
                [*NOBODY, CLI, *command, "--dir", str(shared)],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
            _one_line(result, *why)
            assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        doctor = subprocess.run(
            [*NOBODY, CLI, "doctor", "--dir", str(shared), "--", "gunicorn", "-c", str(CONFIG)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
        )
        _one_line(doctor, "fail  sidecar_reads:", *why)
        assert doctor.returncode == 1
    finally:
        shutil.rmtree(volume)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the sidecar as another user")
def test_ready_names_why_the_directory_may_not_be_read():
    volume, shared = _closed_directory()
    own = shared / "gunicorn-monitor"
    own.chmod(0o755)  # root's, written by no one else: a sidecar of another user may read it
    e = Exporter(shared, prefix=NOBODY).start()
    try:
        own.chmod(0o700)
        status, body = e.get("/-/ready")
        assert status == 503
        reason = body.decode()
        for word in ("not readable by uid 65534", "owned by uid 0", "mode 0700", str(own)):
            assert word in reason, reason
    finally:
        e.kill()
        shutil.rmtree(volume)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the CLI as another user")
def test_a_journal_that_may_not_be_read_is_one_line(nobody_dir):
    layout = directory.Layout(str(nobody_dir))
    os.makedirs(layout.own, mode=0o700)
    os.chown(layout.own, 65534, 65534)
    Path(layout.journal).write_text('{"event":"spawn"}\n')
    os.chown(layout.journal, 0, 0)
    os.chmod(layout.journal, 0o600)  # put there by root: the directory's user cannot read it
    for command in (["events"], ["status"]):
        result = subprocess.run(
            [*NOBODY, CLI, *command, "--dir", str(nobody_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        _one_line(result, f"{layout.journal} is not readable by uid 65534", "mode 0600")
        assert result.returncode == 2


def test_status_watching_a_directory_that_vanishes_says_so_and_exits(tmp_path):
    shared = tmp_path / "multiproc"
    directory.create(str(shared))
    proc = subprocess.Popen(
        [CLI, "status", "--watch", "0.2", "--dir", str(shared)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: proc.stdout.readline().startswith("\x1b"), 10, "a first draw")
        shutil.rmtree(shared)
        assert proc.wait(20) == 2
        err = proc.stderr.read()
        assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
