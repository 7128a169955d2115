"""gunicorn.conf.py: settings from the environment, validated; flags still win; hooks chain."""

from __future__ import annotations

import os
import signal
import subprocess

from tests.harness import BIN, CONFIG, NO_CONTROL_SOCKET, ROOT, exits, wait_for


def _run_config(env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "gunicorn"), "-c", str(CONFIG), *NO_CONTROL_SOCKET, "examples.app:app"],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_bad_setting_is_one_line_and_exit_2(shared_dir):
    result = _run_config({"GUNICORN_TIMEOUT": "abc", "PROMETHEUS_MULTIPROC_DIR": str(shared_dir)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "GUNICORN_TIMEOUT='abc'" in lines[0]
    assert "Traceback" not in result.stderr


def test_every_bad_setting_is_named_in_that_line(shared_dir):
    env = {
        "GUNICORN_WORKERS": "0",
        "GUNICORN_PRELOAD_APP": "maybe",
        "PROMETHEUS_MULTIPROC_DIR": str(shared_dir),
    }
    result = _run_config(env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "GUNICORN_WORKERS='0'" in line and "GUNICORN_PRELOAD_APP='maybe'" in line


def test_an_unusable_shared_directory_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = _run_config({"PROMETHEUS_MULTIPROC_DIR": str(blocker / "sub")})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "PROMETHEUS_MULTIPROC_DIR" in line
    assert "Traceback" not in result.stderr


def test_the_shared_directory_is_created_private(tmp_path, make_master):
    target = tmp_path / "fresh" / "multiproc"
    m = make_master(shared_dir=target, workers=1, log_path=tmp_path / "g.log").start()
    assert (target.stat().st_mode & 0o777) == 0o700
    assert m.state()["workers_desired"] == 1


def test_environment_sets_workers_and_a_flag_overrides_it(make_master):
    from_env = make_master(workers=3).start()
    assert len(from_env.worker_pids()) == 3
    from_env.kill()
    flagged = make_master(workers=3, args=("--workers", "1")).start(wait=False)
    flagged.wait_workers(1)
    assert flagged.state()["workers_desired"] == 1


def test_your_own_hooks_still_run_beside_the_monitor(tmp_path, make_master, make_exporter):
    marker = tmp_path / "user-hooks.log"
    user_hooks = f"""
def post_fork(server, worker):
    with open({str(marker)!r}, "a") as f:
        f.write("post_fork\\n")


def child_exit(server, worker):
    with open({str(marker)!r}, "a") as f:
        f.write("child_exit %s\\n" % worker.pid)

"""
    m = make_master(workers=1, user_hooks=user_hooks).start()
    e = make_exporter()
    victim = m.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: exits(e.scrape()) == {("killed", "SIGKILL"): 1.0}, 20, "our count")
    wait_for(lambda: f"child_exit {victim}" in marker.read_text(), 10, "their child_exit")
    assert marker.read_text().count("post_fork") >= 1
