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
        # As from a terminal: a suite started in the background by a non-interactive shell
        # (nohup ... &) ignores SIGINT, and a child inherits that, so Python would never
        # raise KeyboardInterrupt in it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
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


REAL = ROOT / "tests" / "real_configs"
APP = "examples.app:app"


def _doctor(
    command: list[str], shared_dir, *args: str, cwd=ROOT, **env: str
) -> subprocess.CompletedProcess:
    """`gunicorn-monitor doctor [ARGS] -- COMMAND`, as a person runs it in `cwd`."""
    environ = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared_dir), **env}
    if "GUNICORN_CMD_ARGS" not in env:  # the caller's own must not change what is checked
        environ.pop("GUNICORN_CMD_ARGS", None)
    return subprocess.run(
        [CLI, "doctor", *args, "--", *command],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
        cwd=cwd,
    )


def _checks(out: subprocess.CompletedProcess) -> dict[str, list[dict]]:
    """{check: [its lines]} from `doctor --json`."""
    found: dict[str, list[dict]] = {}
    for c in json.loads(out.stdout)["checks"]:
        found.setdefault(c["check"], []).append(c)
    return found


def test_doctor_passes_the_drop_in_config_and_says_what_to_watch(shared_dir):
    out = _doctor(["gunicorn", "-c", str(CONFIG), APP], shared_dir, GUNICORN_WORKER_CLASS="gthread")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert all(line.split()[0] in ("ok", "warn") for line in lines), out.stdout
    assert any(line.startswith("ok    hooks:") for line in lines)
    assert any(line.startswith("warn  timeout_scope: gthread:") for line in lines)
    assert any(line.startswith("warn  keepalive:") for line in lines)  # 5 s under 60 s
    assert any(line.startswith("warn  processes:") for line in lines)  # no master ran yet
    assert not any("unknown_name" in line for line in lines)  # its helpers are all read


def test_doctor_resolves_settings_as_gunicorn_does(shared_dir, tmp_path):
    """defaults < config file < GUNICORN_CMD_ARGS < command line: the values doctor judges are
    the ones Gunicorn itself prints for the same command line (`--print-config`)."""
    conf = tmp_path / "site.conf.py"
    conf.write_text("timeout = 30\nworkers = 3\nkeepalive = 7\nworker_class = 'sync'\n")
    env = {"GUNICORN_CMD_ARGS": "--timeout 20 --workers 5", "PYTHONPATH": str(ROOT)}
    command = ["gunicorn", "-c", str(conf), "--timeout", "10", "-k", "gthread", APP]
    out = _doctor(command, shared_dir, "--json", **env)
    checks = _checks(out)
    assert checks["timeout"][0]["why"] == "timeout 10s"  # the command line beats the env
    worker = checks["worker_class"][0]["why"]
    assert worker.startswith("gunicorn.workers.gthread.ThreadWorker (gthread): 5 worker(s)")
    assert checks["keepalive"][0]["why"].startswith("keepalive 7s")  # the file beats defaults

    printed = subprocess.run(
        [str(BIN / "gunicorn"), "--print-config", *command[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **env},
    )
    values = dict(
        (k.strip(), v.strip())
        for k, _, v in (line.partition("=") for line in printed.stdout.splitlines())
    )
    assert (values["timeout"], values["workers"], values["keepalive"]) == ("10", "5", "7")
    assert values["worker_class"] == "gthread"

    # No -c on the command line: GUNICORN_CMD_ARGS's config file is the one Gunicorn reads.
    env["GUNICORN_CMD_ARGS"] = f"-c {conf}"
    checks = _checks(_doctor(["gunicorn", APP], shared_dir, "--json", **env))
    assert checks["config"][0]["why"] == f"{conf} loads as Gunicorn loads it"
    assert checks["timeout"][0]["why"] == "timeout 30s"


def test_doctor_takes_a_python_module_config_and_judges_a_subclass(shared_dir):
    """mozilla/ichnaea's own `-c python:ichnaea.webapp.gunicorn_settings`: a GeventWorker
    subclass in its package, and keepalive 0 (nothing to race: no keepalive line)."""
    command = ["gunicorn", "-c", "python:ichnaea.webapp.gunicorn_settings", APP]
    out = _doctor(command, shared_dir, "--json", cwd=REAL / "ichnaea", PYTHONPATH=".")
    checks = _checks(out)
    assert checks["config"][0]["why"] == (
        "python:ichnaea.webapp.gunicorn_settings loads as Gunicorn loads it"
    )
    assert checks["worker_class"][0]["level"] == "ok"
    assert checks["worker_class"][0]["why"].startswith(
        "ichnaea.webapp.worker.LocationGeventWorker (a subclass of gevent): "
    ), checks["worker_class"]
    assert "keepalive" not in checks
    assert checks["timeout_scope"][0]["why"].startswith("gevent: ")
    assert "unknown_name" not in checks  # `del multiprocessing`, hooks, settings: nothing odd


def test_doctor_judges_the_worker_class_by_its_hierarchy(shared_dir, tmp_path):
    # A user module's UvicornWorker subclass (Azure-Samples' own): keepalive matters, 2 < 60.
    azure = REAL / "azure_search_openai_demo"
    checks = _checks(_doctor(["gunicorn", APP], shared_dir, "--json", cwd=azure))
    assert checks["worker_class"][0]["why"].startswith(
        "custom_uvicorn_worker.CustomUvicornWorker (a subclass of uvicorn): "
    )
    assert checks["keepalive"][0]["level"] == "warn"
    # sync closes every connection after one response: no keepalive line at all.
    checks = _checks(_doctor(["gunicorn", "-k", "sync", APP], shared_dir, "--json"))
    assert "keepalive" not in checks and "timeout_scope" not in checks
    # A class the monitor does not know, nor its bases: said, not guessed.
    (tmp_path / "own_worker.py").write_text(
        "from gunicorn.workers.base import Worker\nclass Plain(Worker):\n    pass\n"
    )
    command = ["gunicorn", "-k", "own_worker.Plain", APP]
    checks = _checks(_doctor(command, shared_dir, "--json", cwd=tmp_path))
    assert checks["worker_class"][0]["level"] == "warn"
    assert checks["worker_class"][0]["why"].startswith("own_worker.Plain is none of the classes")


def test_doctor_names_settings_gunicorn_ignores_but_not_a_configs_helpers(shared_dir, tmp_path):
    conf = tmp_path / "prod.conf.py"
    conf.write_text(
        "import multiprocessing\n"
        "cores = multiprocessing.cpu_count()\n"  # a helper, read below
        "workers = cores * 2\n"
        "keep_alive = 75\n"  # the command line's spelling: ignored
        "log_level = 'warning'\n"
        "access_logfile = '-'\n"
        "grateful_timeout = 120\n"  # a typo: ignored
        "TIMEOUT = 30\n"  # Gunicorn reads lowercase names only
        "_private = 1\n"
        "use_loglevel = 'info'\n"  # close to `loglevel`, but read: a helper
        "loglevel = use_loglevel\n"
        "def post_froks(server, worker):\n    pass\n"  # a hook Gunicorn never calls
        "def helper(x):\n    return x\n"  # a function named like no hook
        "threads: 4\n"  # an annotation: sets nothing
    )
    checks = _checks(_doctor(["gunicorn", "-c", str(conf), APP], shared_dir, "--json"))
    said = {
        c["why"].split("`")[1].split(" ")[0].rstrip(":"): c["why"] for c in checks["unknown_name"]
    }
    assert set(said) == {
        "keep_alive",
        "log_level",
        "access_logfile",
        "grateful_timeout",
        "TIMEOUT",
        "def",
        "threads",
    }, said
    assert said["keep_alive"].endswith("the setting is `keepalive`")
    assert said["access_logfile"].endswith(
        "`--access-logfile` is the command line's flag; in a config the setting is `accesslog`"
    )
    assert said["grateful_timeout"].endswith("did you mean `graceful_timeout`?")
    assert said["def"].startswith("`def post_froks` is no server hook")
    assert all(c["level"] == "warn" for c in checks["unknown_name"])


def test_doctor_fails_what_cannot_work(shared_dir, tmp_path):
    # Hooks lost: the user's own child_exit replaces the monitor's after wire().
    own = tmp_path / "own.conf.py"
    own.write_text(
        "from monitor.hooks import wire\nwire(globals())\n"
        "def child_exit(server, worker):\n    pass\n"
        "max_requests = 1000\ngraceful_timeout = 40\n"
    )
    command = ["gunicorn", "-c", str(own), APP]
    out = _doctor(command, shared_dir, "--termination-grace", "30", "--json")
    assert out.returncode == 1
    checks = {c["check"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["hooks"]["level"] == "fail" and "child_exit" in checks["hooks"]["why"]
    assert checks["graceful_timeout"]["level"] == "fail"
    assert checks["max_requests"]["level"] == "warn"
    assert json.loads(out.stdout)["ok"] is False


def test_every_bad_input_is_one_line_and_a_failure(shared_dir, tmp_path):
    (tmp_path / "raises.py").write_text("import os\nworkers = 1 / 0\n")
    (tmp_path / "broken.py").write_text("workers = (\n")
    (tmp_path / "badvalue.py").write_text("timeout = 'soon'\n")
    cases = {
        ("gunicorn", "-c", "absent.py", APP): "config: 'absent.py' doesn't exist",
        ("gunicorn", "-c", "raises.py", APP): "config: raises.py raised ZeroDivisionError: ",
        ("gunicorn", "-c", "broken.py", APP): "config: broken.py raised SyntaxError: ",
        ("gunicorn", "-c", "badvalue.py", APP): "config: invalid value for timeout: soon",
        ("gunicorn", "-c", "python:no_such.module", APP): (
            "config: python:no_such.module: ModuleNotFoundError: No module named 'no_such'"
        ),
        ("gunicorn", "-c", str(CONFIG), "-k", "no_such.Worker", APP): (
            "worker_class: worker class 'no_such.Worker' cannot be loaded: "
            "ModuleNotFoundError: No module named 'no_such'"
        ),
        ("gunicorn", "-c", str(CONFIG), "-k", "gunicorn.workers.sync.NoSuchWorker", APP): (
            "worker_class: worker class 'gunicorn.workers.sync.NoSuchWorker' cannot be loaded: "
            "module 'gunicorn.workers.sync' has no attribute 'NoSuchWorker'"
        ),
        ("gunicorn", "--no-such-flag", APP): (
            "config: gunicorn: error: unrecognized arguments: --no-such-flag"
        ),
        ("gunicorn", "--timeout", "soon", APP): "config: gunicorn: error: argument -t/--timeout",
        ("gunicorn", "-c", str(CONFIG)): "command_line: no application module",
        ("uwsgi", "--http", ":8000"): "config: not a gunicorn command line: 'uwsgi --http :8000'",
        ("gunicorn", "--version"): "config: the command line only prints Gunicorn's help",
    }
    for command, said in cases.items():
        out = _doctor(list(command), shared_dir, cwd=tmp_path)
        assert out.returncode == 1, (command, out.stdout)
        assert "Traceback" not in out.stdout + out.stderr, (command, out.stdout + out.stderr)
        failed = [line for line in out.stdout.splitlines() if line.startswith("fail")]
        assert len(failed) == 1 and failed[0].startswith(f"fail  {said}"), (command, failed)


def test_doctor_sees_a_running_master_and_its_smaps(make_master):
    m = make_master(workers=1).start()
    out = _doctor(["gunicorn", "-c", str(CONFIG), APP], m.dir)
    assert f"ok    processes: master(s) {m.pid} visible" in out.stdout, out.stdout
    assert "ok    smaps:" in out.stdout


def test_status_shows_no_worker_a_state_file_merely_names(tmp_path):
    """A forged state file: a live process as master, an unrelated live pid as its worker.
    Neither is shown: that process is not a master the kernel vouches for (it holds no
    heartbeat lock of the directory; state.Genuine), and the pid is not its child."""
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
        assert snap["masters"] == []
    finally:
        master.kill()
        master.wait()
