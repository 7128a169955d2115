"""A real Prometheus server on loopback, for end-to-end tests of the rules and the dashboard.

The binary is Debian's (`source scripts/prometheus.sh` puts it on PATH, extracted into .tools/);
`binary()` finds it there even when PATH was not set up. The server gets a free port, storage in
a temporary directory, a 1 s scrape and evaluation interval, and logs to a file whose tail
`Prometheus.tail()` returns for assertion messages. It is killed by pid in `stop()`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
from datetime import datetime
from pathlib import Path

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


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path], job: str) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = self.workdir / "prometheus.yml"
        self.log_path = self.workdir / "prometheus.log"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
        }
        # JSON is YAML: no YAML writer needed for a config this small.
        self.config.write_text(json.dumps(config, indent=2))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, exe: str) -> Prometheus:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                exe,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=info",
            ],
            stdout=self.log,
            stderr=self.log,
            cwd=self.workdir,
        )
        wait_for(self._ready, 20, "prometheus /-/ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}\n{self.tail()}")
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
            return "(no prometheus log)"
        return "--- prometheus log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

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
