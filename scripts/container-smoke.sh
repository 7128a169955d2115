#!/usr/bin/env bash
# Builds the image with podman (no Docker engine needed) and runs it as the pod would: the app
# and the sidecar from the same image, sharing the metrics volume and the pid namespace. Then a
# stray `kill -TERM` on a worker must come out as cause="signal" at the sidecar.
#
# Not part of the test suite: it needs root, podman, and a base image. Where Docker Hub is out of
# reach, it builds a stand-in python:3.11-slim with debootstrap from Debian's mirror.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE=localhost/gunicorn-monitor:smoke
APP_PORT=${APP_PORT:-18900}
METRICS_PORT=${METRICS_PORT:-18901}

need() { command -v "$1" >/dev/null || { echo "container-smoke: $1 is missing ($2)" >&2; exit 2; }; }
need podman "apt-get install podman buildah runc"

if ! podman image exists docker.io/library/python:3.11-slim; then
    need debootstrap "apt-get install debootstrap"
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$rootfs" \
        http://deb.debian.org/debian >/dev/null
    rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
    ln -sf python3 "$rootfs/usr/bin/python"
    ln -sf pip3 "$rootfs/usr/bin/pip"
    tar -C "$rootfs" -c . | podman import --change 'CMD ["python3"]' - docker.io/library/python:3.11-slim >/dev/null
    rm -rf "$rootfs"
fi

ca=/etc/ssl/certs/ca-certificates.crt  # the build's pip must trust this machine's proxy
log=$(mktemp)
podman build --pull=never --format docker -v "$ca:$ca:ro" -t "$IMAGE" "$ROOT" >"$log" 2>&1 ||
    { cat "$log" >&2; exit 1; }

cleanup() {
    podman rm -f gm-smoke-sidecar gm-smoke-app >/dev/null 2>&1 || true
    podman volume rm -f gm-smoke >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup
podman volume create gm-smoke >/dev/null
podman run -d --network host --name gm-smoke-app -v gm-smoke:/run/gunicorn-monitor \
    -e GUNICORN_BIND=127.0.0.1:$APP_PORT -e GUNICORN_WORKERS=2 "$IMAGE" >/dev/null
podman run -d --network host --pid container:gm-smoke-app --name gm-smoke-sidecar \
    -v gm-smoke:/run/gunicorn-monitor "$IMAGE" \
    gunicorn-monitor serve --dir /run/gunicorn-monitor --listen 127.0.0.1:$METRICS_PORT >/dev/null

python3 - "$APP_PORT" "$METRICS_PORT" <<'PY'
import subprocess, sys, time, urllib.request

app, metrics = sys.argv[1:]

def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except OSError:
        return 0, ""

def wait(cond, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            sys.exit(f"container-smoke: timed out waiting for {what}")
        time.sleep(0.2)

wait(lambda: get(metrics, "/-/ready")[0] == 200, "the sidecar to be ready")
wait(lambda: get(app, "/")[0] == 200, "the app")
worker = get(app, "/pid")[1].strip()
subprocess.run(["podman", "exec", "gm-smoke-app", "python", "-c",
                f"import os, signal; os.kill({worker}, signal.SIGTERM)"], check=True)
line = 'gunicorn_worker_exits_total{cause="signal",signal="SIGTERM"} 1.0'
wait(lambda: line in get(metrics, "/metrics")[1], "the stray SIGTERM to be counted")
memory = 'gunicorn_worker_memory_bytes{type="rss",worker="0"}'
wait(lambda: memory in get(metrics, "/metrics")[1], "per-worker memory of the replacement")
print(f"container-smoke: ok: {line}; per-worker memory served from the shared pid namespace")
PY
