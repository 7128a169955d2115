"""A real Prometheus and Alertmanager on loopback, and a webhook receiver, for end-to-end tests of
the rules, their delivery and the dashboard.

The binaries are Debian's (`source scripts/prometheus.sh` puts them on PATH, extracted into
.tools/); `binary()` finds them there even when PATH was not set up. Each server gets a free
port, storage in a temporary directory, and logs to a file whose tail `tail()` returns for
assertion messages. Each is killed by pid in `stop()`. Prometheus scrapes and evaluates every
second.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

from tests.harness import ROOT, free_port, http_get, kill_all, wait_for

TOOLS_BIN = ROOT / ".tools" / "root" / "usr" / "bin"


def binary(name: str = "prometheus") -> str | None:
    local = TOOLS_BIN / name
    if local.is_file():
        return str(local)
    return shutil.which(name)


def shorten_for(rules_text: str, divide_by: int = 60) -> str:
    """The rules text with every alert's `for:` divided (a minute becomes a second by default).

    Only the `for:` lines change; every other byte, the expressions included, stays as it is.
    """

    def shorter(match: re.Match) -> str:
        seconds = parse_duration(match.group(2)) // divide_by
        return f"{match.group(1)}for: {seconds}s"

    return re.sub(r"(?m)^(\s+)for: *(\S+) *$", shorter, rules_text)


def parse_duration(text: str) -> int:
    """Seconds in a Prometheus duration such as 10m, 1h30m or 0s."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    parts = re.fullmatch(r"(?:\d+[smhdw])+", text) and re.findall(r"(\d+)([smhdw])", text)
    if not parts:
        raise ValueError(f"unsupported duration {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


S = TypeVar("S", bound="Server")


class Server:
    """One Debian server binary on loopback: its config, its log, and its process."""

    name = "server"
    storage_flag = "--storage.path"  # where its data goes, in the workdir
    extra_args: tuple[str, ...] = ()

    def __init__(self, workdir: Path, config: dict) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = self.workdir / f"{self.name}.yml"
        self.log_path = self.workdir / f"{self.name}.log"
        # JSON is YAML: no YAML writer needed for a config this small.
        self.config.write_text(json.dumps(config, indent=2))
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self: S, exe: str) -> S:
        args = [
            f"--config.file={self.config}",
            f"{self.storage_flag}={self.workdir / 'data'}",
            f"--web.listen-address={self.address}",
            "--log.level=info",
            *self.extra_args,
        ]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [exe, *args], stdout=self.log, stderr=self.log, cwd=self.workdir
        )
        wait_for(self._ready, 20, f"{self.name} /-/ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}\n{self.tail()}")
        return http_get(self.url + "/-/ready", timeout=2)[0] == 200

    def stop(self) -> None:
        if self.proc is None:
            return
        kill_all([self.proc.pid])
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no {self.name} log)"
        return f"--- {self.name} log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])


class Prometheus(Server):
    name = "prometheus"
    storage_flag = "--storage.tsdb.path"

    def __init__(
        self,
        workdir: Path,
        targets: list[str],
        rule_files: list[Path],
        job: str,
        alertmanager: str | None = None,
    ) -> None:
        config: dict = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
        }
        if alertmanager:
            config["alerting"] = {
                "alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]
            }
        super().__init__(workdir, config)

    # -- HTTP API ---------------------------------------------------------------------------

    def api(self, path: str, **params: object) -> dict:
        """`data` of a successful API answer; anything else fails with the log's tail."""
        query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        status, body = http_get(url, timeout=10)
        try:
            answer = json.loads(body)
        except ValueError:
            answer = {}
        assert status == 200 and answer.get("status") == "success", (
            f"GET {url} -> {status} {body[:500]!r}\n{self.tail()}"
        )
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params: dict[str, object] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        result = data["result"]
        if data["resultType"] == "scalar":  # [time, "value"]: one value, never empty
            return [{"metric": {}, "value": result}]
        return result

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def rules(self) -> list[dict]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def evaluated_since(self, moment: float, evaluations: int = 2) -> bool:
        """True once every rule group has been evaluated `evaluations` times after `moment`."""
        groups = self.api("rules")["groups"]
        need = moment + evaluations * 1.0
        return bool(groups) and all(_unix(g["lastEvaluation"]) >= need for g in groups)


def _unix(rfc3339: str) -> float:
    """Seconds since the epoch of an RFC 3339 time with nanoseconds, as the API writes them."""
    # fromisoformat takes at most microseconds: cut the fraction to six digits.
    text = re.sub(r"(\.\d{6})\d+", r"\1", rfc3339)
    return datetime.fromisoformat(text).timestamp()


# Where Debian's build of Alertmanager reads its templates (compiled in); put there by
# scripts/prometheus.sh.
ALERTMANAGER_TEMPLATES = [
    Path("/usr/share/prometheus/alertmanager") / name for name in ("default.tmpl", "email.tmpl")
]


class Alertmanager(Server):
    """Every alert its own notification (group_by ...), sent a second after it arrives, with
    its resolution, to one webhook. No cluster: nothing listens beyond loopback."""

    name = "alertmanager"
    extra_args = ("--cluster.listen-address=",)  # no gossip cluster: nothing beyond loopback

    def __init__(self, workdir: Path, webhook_url: str) -> None:
        config = {
            "route": {
                "receiver": "webhook",
                "group_by": ["..."],
                "group_wait": "1s",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
            "receivers": [
                {
                    "name": "webhook",
                    "webhook_configs": [{"url": webhook_url, "send_resolved": True}],
                }
            ],
        }
        super().__init__(workdir, config)


class Webhook:
    """An Alertmanager webhook receiver: every notification's alerts, each with the time it came.

    A stdlib HTTP server on a thread of the test process: the receiver is the test's own ear,
    and needs nothing the standard library lacks.
    """

    def __init__(self) -> None:
        self.received: list[tuple[float, dict]] = []  # (arrival, one alert of a notification)
        self._lock = threading.Lock()
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                arrived = time.time()
                try:
                    alerts = json.loads(body).get("alerts", [])
                except ValueError:
                    alerts = [{"status": "unparseable", "labels": {}, "body": body[:200]}]
                with webhook._lock:
                    webhook.received.extend((arrived, alert) for alert in alerts)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass  # the test asserts on what arrived; no access log

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> Webhook:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def alerts(self, status: str = "firing", **labels: str) -> list[tuple[float, dict]]:
        """(arrival, alert) of every alert received with this status and these labels."""
        with self._lock:
            return [
                (at, a)
                for at, a in self.received
                if a.get("status") == status
                and all(a.get("labels", {}).get(k) == v for k, v in labels.items())
            ]

    def first(self, status: str = "firing", **labels: str) -> float | None:
        """When the first alert with this status and these labels arrived, or None."""
        found = self.alerts(status, **labels)
        return min(at for at, _ in found) if found else None
