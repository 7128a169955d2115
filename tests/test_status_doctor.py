"""`gunicorn-monitor status` and `doctor`: what a person runs in a terminal, against real masters.

status reads only the shared directory (no exporter runs in these tests); doctor loads real
config files the way the gunicorn command does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

from tests.harness import BIN, CONFIG, ROOT, http_get, wait_for

CLI = str(BIN / "gunicorn-monitor")


def _run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def test_status_shows_each_slot_its_request_in_flight_and_the_last_hour(make_master):
    m = make_master(worker="gthread", workers=2).start()
    for _ in range(4):
        assert http_get(m.url + "/")[0] == 200
    threading.Thread(target=http_get, args=(m.url + "/sleep?s=5&q=x", 30), daemon=True).start()
    pids = m.worker_pids()

    def busy():
        snap = json.loads(_run("status", "--json", "--dir", str(m.dir)).stdout)
        [master] = snap["masters"]
        rows = [w for w in master["workers"] if w["phase"] == "request"]
        return (snap, master, rows) if rows else None

    snap, master, [row] = wait_for(busy, 10, "a worker in a request")
    assert master["pid"] == m.pid and master["worker_class"] == "gthread"
    assert master["version"] and master["uptime_seconds"] >= 0 and master["last_deploy"]
    assert {w["pid"] for w in master["workers"]} == set(pids)
    assert row["in_flight"][0]["path"] == "/sleep" and row["in_flight"][0]["method"] == "GET"
    assert sum(w["requests_served"] for w in master["workers"]) >= 4
    assert all(w["rss_bytes"] > 0 for w in master["workers"])
    assert snap["exits_last_hour"] == {} and snap["last_deploy"] is not None

    os.kill(pids[0], signal.SIGKILL)
    m.wait_workers(2, exclude={pids[0]})
    out = _run("status", "--dir", str(m.dir))
    assert out.returncode == 0, out.stderr
    assert f"master {m.pid}" in out.stdout and "gthread" in out.stdout
    assert "exits in the last hour: killed 1" in out.stdout


def test_status_watch_redraws_until_interrupted(make_master):
    m = make_master(workers=1).start()
    proc = subprocess.Popen(
        [CLI, "status", "--watch", "0.2", "--dir", str(m.dir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stdout.read(1), "")))
    reader.start()
    try:
        wait_for(lambda: "".join(seen).count("\x1b[2J") >= 2, 10, "two redraws")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        reader.join(10)
        assert f"master {m.pid}" in "".join(seen)
    finally:
        proc.kill()
        proc.wait(10)


def test_status_of_a_directory_without_gunicorn_says_so(tmp_path):
    out = _run("status", "--dir", str(tmp_path))
    assert out.returncode == 0 and "no live Gunicorn master recorded here" in out.stdout
    out = _run("status", "--dir", str(tmp_path / "missing"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    out = _run("events", "--stacks", "--dir", str(tmp_path))
    assert out.returncode == 0 and out.stdout == "no captures\n"


def _doctor(config, shared_dir, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared_dir), **env}
    return _run("doctor", "--config", str(config), *args, env=environ)


def test_doctor_passes_the_drop_in_config_and_says_what_to_watch(shared_dir):
    out = _doctor(CONFIG, shared_dir, GUNICORN_WORKER_CLASS="gthread")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert all(line.split()[0] in ("ok", "warn") for line in lines), out.stdout
    assert any(line.startswith("ok    hooks:") for line in lines)
    assert any(line.startswith("warn  gthread_timeout:") for line in lines)
    assert any(line.startswith("warn  keepalive:") for line in lines)  # 5 s under 60 s
    assert any(line.startswith("warn  processes:") for line in lines)  # no master ran yet


def test_doctor_fails_what_cannot_work(shared_dir, tmp_path):
    # Hooks lost: the user's own child_exit replaces the monitor's after wire().
    own = tmp_path / "own.conf.py"
    own.write_text(
        "from monitor.hooks import wire\nwire(globals())\n"
        "def child_exit(server, worker):\n    pass\n"
        "max_requests = 1000\ngraceful_timeout = 40\n"
    )
    out = _doctor(own, shared_dir, "--termination-grace", "30", "--json")
    assert out.returncode == 1
    checks = {c["check"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["hooks"]["level"] == "fail" and "child_exit" in checks["hooks"]["why"]
    assert checks["graceful_timeout"]["level"] == "fail"
    assert checks["max_requests"]["level"] == "warn"
    assert json.loads(out.stdout)["ok"] is False

    broken = tmp_path / "broken.conf.py"
    broken.write_text("workers = (\n")
    out = _doctor(broken, shared_dir)
    assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr
    assert out.stdout.splitlines()[0].startswith("fail  config:")

    out = _doctor(tmp_path / "absent.conf.py", shared_dir)
    assert out.returncode == 1 and "no such file" in out.stdout


def test_doctor_sees_a_running_master_and_its_smaps(make_master):
    m = make_master(workers=1).start()
    out = _doctor(CONFIG, m.dir)
    assert f"ok    processes: master(s) {m.pid} visible" in out.stdout, out.stdout
    assert "ok    smaps:" in out.stdout


def test_status_shows_no_worker_a_state_file_merely_names(tmp_path):
    """A forged state file: a live process as master, an unrelated live pid as its worker."""
    import psutil

    from monitor.contract import directory, state

    layout = directory.create(str(tmp_path / "mp"))
    master = subprocess.Popen(["sleep", "30"])
    try:
        state.write(
            layout,
            master.pid,
            {
                "pid": master.pid,
                "start_time": psutil.Process(master.pid).create_time(),
                "version": "27.0.1",
                "worker_class": "sync",
                "workers_desired": 1,
                "workers": {str(os.getpid()): {"slot": 0, "spawned": 1.0}},
            },
        )
        snap = json.loads(_run("status", "--json", "--dir", layout.root).stdout)
        [shown] = snap["masters"]
        assert shown["pid"] == master.pid and shown["workers"] == []
    finally:
        master.kill()
        master.wait()
