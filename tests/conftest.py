import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.harness import Exporter, Master, promtool_path


@pytest.fixture
def shared_dir(tmp_path):
    d = tmp_path / "multiproc"
    d.mkdir()
    return d


@pytest.fixture
def make_master(shared_dir):
    started = []

    def make(**kwargs) -> Master:
        kwargs.setdefault("shared_dir", shared_dir)
        m = Master(**kwargs)
        started.append(m)
        return m

    yield make
    for m in started:
        m.kill()


@pytest.fixture
def make_exporter(shared_dir):
    started = []

    def make(**kwargs) -> Exporter:
        kwargs.setdefault("shared_dir", shared_dir)
        e = Exporter(**kwargs).start()
        started.append(e)
        return e

    yield make
    for e in started:
        e.kill()


@pytest.fixture(scope="session")
def promtool() -> str:
    """Debian's promtool: on PATH, or where scripts/prometheus.sh extracts it."""
    found = promtool_path()
    if not found:
        pytest.fail("promtool not found: run `source scripts/prometheus.sh` first", pytrace=False)
    return found


@pytest.fixture
def mount():
    """mount(path, options): a tmpfs there for the test, lazily unmounted at its end."""
    mounted: list[Path] = []

    def do(path: Path, options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield do
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def nobody_dir():
    """A shared directory owned by the unprivileged user both Gunicorn and the sidecar run as
    (tests.harness.NOBODY): as root, no permission would ever stop the sidecar from reading."""
    # Under /tmp itself: pytest's own temporary tree is closed to other users.
    d = Path(tempfile.mkdtemp(prefix="gm-nobody-"))
    shared = d / "multiproc"
    shared.mkdir(mode=0o700)
    for p in (d, shared):
        os.chown(p, 65534, 65534)
    d.chmod(0o755)
    yield shared
    shutil.rmtree(d, ignore_errors=True)
