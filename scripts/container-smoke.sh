#!/usr/bin/env bash
# Builds the image with podman (no Docker engine needed) and runs it as the pod would: the app
# and the sidecar from the same image, sharing the metrics volume and the pid namespace, in both
# start orders (sidecar first, app first). Each time, on the sidecar's scrape: promtool check
# metrics passes, the monitor's own series stay within the budget at rest with 4 workers, and a
# stray `kill -TERM` on a worker comes out as cause="signal" with per-worker memory served.
#
# Self-sufficient on a Debian machine, as root: it installs what it lacks with apt-get (podman,
# runc, catatonit, debootstrap, python3; promtool through scripts/prometheus.sh), and where
# Docker Hub is out of reach it builds a stand-in python:3.11-slim with debootstrap from the
# Debian mirror this machine's apt already uses (or DEBIAN_MIRROR). Not part of the test suite.
#
# Podman's defaults do not fit every machine, so every podman call here carries its own options:
#   --runtime runc   crun (podman's first choice) fails on hybrid cgroup hosts
#   --ulimit ...     runc sets nofile/nproc to podman's defaults (1048576), above the limits
#                    podman itself runs with, which needs CAP_SYS_RESOURCE ("error setting rlimit
#                    type 7: operation not permitted"); 4096 each needs no privilege.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE=localhost/gunicorn-monitor:smoke
BASE=docker.io/library/python:3.11-slim
APP_PORT=${APP_PORT:-18900}
METRICS_PORT=${METRICS_PORT:-18901}
SERIES_BUDGET=${SERIES_BUDGET:-80}  # the monitor's own series at rest with 4 workers
WORKERS=4

say() { echo "container-smoke: $*"; }
die() { echo "container-smoke: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "needs root (apt-get, podman); run it with sudo"
command -v apt-get >/dev/null || die "needs a Debian-based machine (apt-get)"

# -- tools --------------------------------------------------------------------------------------
missing=()
for tool in podman runc debootstrap python3; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
# The pod's pause process is podman's --init, catatonit (Debian: a Recommends of podman).
[ -x /usr/libexec/podman/catatonit ] || command -v catatonit >/dev/null || missing+=(catatonit)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
source "$ROOT/scripts/prometheus.sh"  # promtool, extracted into .tools/ (no service)

# 4096 is plenty for a pod of a few workers; lower only if this shell's hard limit is lower.
limit() { local v; v=$(ulimit -H "$1"); [ "$v" != unlimited ] && [ "$v" -lt 4096 ] && echo "$v" || echo 4096; }
NOFILE=$(limit -n)
NPROC=$(limit -u)
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs --events-backend file)
ULIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")

# -- base image ---------------------------------------------------------------------------------
# The first plain Debian archive (not -security/-updates/-backports, not disabled) in the apt
# sources under $1 (/etc/apt): deb822 *.sources, or one-line sources.list and *.list.
debian_mirror() {
    {
        cat "$1"/sources.list.d/*.sources 2>/dev/null || true
        echo
        # one-line format: deb [options] URI suite components
        sed -nE 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+)[[:space:]]+([^[:space:]]+).*/Types: deb\nURIs: \2\nSuites: \3\n/p' \
            "$1"/sources.list "$1"/sources.list.d/*.list 2>/dev/null || true
    } | awk '
        function flush() {
            if (!found && types ~ /(^| )deb( |$)/ && enabled != "no" && uri ~ /^https?:\/\//)
                for (i = 1; i <= n; i++) if (s[i] !~ /-/) { print uri; found = 1; exit }
            types = ""; uri = ""; enabled = ""; n = 0
        }
        /^[[:space:]]*$/ { flush(); next }
        /^Types:/   { sub(/^Types:[[:space:]]*/, ""); types = $0 }
        /^Enabled:/ { enabled = tolower($2) }
        /^URIs:/    { uri = $2 }
        /^Suites:/  { n = split(substr($0, 8), s, " ") }
        END { flush() }'
}

if ! podman image exists "$BASE" && ! timeout 30 podman pull -q "$BASE" >/dev/null 2>&1; then
    mirror=${DEBIAN_MIRROR:-}
    if [ -z "$mirror" ] && grep -qx 'ID=debian' /etc/os-release; then
        mirror=$(debian_mirror /etc/apt)
    fi
    [ -n "$mirror" ] || die "no Debian archive in this machine's apt sources; set DEBIAN_MIRROR=URL"
    say "Docker Hub unreachable: building a stand-in $BASE with debootstrap from $mirror"
    rootfs=$(mktemp -d)
    log=$(mktemp)
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm \
        "$rootfs" "$mirror" >"$log" 2>&1 || { tail -20 "$log" >&2; exit 1; }
    rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
    ln -sf python3 "$rootfs/usr/bin/python"
    ln -sf pip3 "$rootfs/usr/bin/pip"
    tar -C "$rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE" >/dev/null
    rm -rf "$rootfs" "$log"
fi

# -- image --------------------------------------------------------------------------------------
ca=/etc/ssl/certs/ca-certificates.crt  # the build's pip must trust this machine's TLS proxy, if any
mounts=()
[ -f "$ca" ] && mounts=(-v "$ca:$ca:ro")
log=$(mktemp)
started=$SECONDS
"${PODMAN[@]}" build --pull=never --format docker "${ULIMITS[@]}" "${mounts[@]}" -t "$IMAGE" \
    "$ROOT" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
rm -f "$log"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
say "built $IMAGE: $((size / 1000000)) MB in $((SECONDS - started)) s"

# -- the pod, in both start orders --------------------------------------------------------------
cleanup() {
    local c
    for c in gm-smoke-sidecar gm-smoke-app gm-smoke-pod; do  # the pod's holder last
        podman rm -f -t 0 "$c" >/dev/null 2>&1 || true
    done
    podman volume rm -f gm-smoke >/dev/null 2>&1 || true
}
trap cleanup EXIT

# What a Kubernetes pod with shareProcessNamespace is: a pause container (here catatonit, podman's
# --init, as pid 1, reaping orphans) holds the pid namespace, and both containers join it, so
# either may start first. (`podman pod create` can't take --ulimit for its infra container.)
# Host network keeps every port on loopback.
POD=(--pid container:gm-smoke-pod --network host "${ULIMITS[@]}" -v gm-smoke:/run/gunicorn-monitor)
run() {  # podman run -d; its stderr only on failure (without systemd, podman says it can't
         # schedule the image's HEALTHCHECK; check() runs it by hand instead)
    local err
    err=$(mktemp)
    "${PODMAN[@]}" run -d "$@" >/dev/null 2>"$err" || { cat "$err" >&2; rm -f "$err"; return 1; }
    rm -f "$err"
}
start_pod() {
    podman volume create gm-smoke >/dev/null
    run --name gm-smoke-pod --init --network host "${ULIMITS[@]}" "$IMAGE" sleep infinity
}
start_app() {
    run --name gm-smoke-app "${POD[@]}" -e GUNICORN_BIND="127.0.0.1:$APP_PORT" \
        -e GUNICORN_WORKERS="$WORKERS" -e HEALTHCHECK_URL="http://127.0.0.1:$APP_PORT/" "$IMAGE"
}
start_sidecar() {
    run --name gm-smoke-sidecar "${POD[@]}" \
        -e HEALTHCHECK_URL="http://127.0.0.1:$METRICS_PORT/-/healthy" "$IMAGE" \
        gunicorn-monitor serve --dir /run/gunicorn-monitor --listen "127.0.0.1:$METRICS_PORT"
}
check() {  # the order's name; the phase: "alone" (the sidecar without the app) or "pod"
    PODMAN_CMD="${PODMAN[*]}" python3 - "$1" "$2" "$APP_PORT" "$METRICS_PORT" "$WORKERS" \
        "$SERIES_BUDGET" <<'PY'
import os, shlex, subprocess, sys, time, urllib.request
from collections import Counter

order, phase, app, metrics = sys.argv[1:5]
workers, budget = int(sys.argv[5]), int(sys.argv[6])
APP_PREFIX = "demo_"  # examples/app.py's own metrics, served beside the monitor's
PODMAN = shlex.split(os.environ["PODMAN_CMD"])
failed = []  # checks that failed but let the others run


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


def wait(cond, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not (result := cond()):
        if time.monotonic() > deadline:
            sys.exit(f"container-smoke: {order}: timed out waiting for {what}")
        time.sleep(0.2)
    return result


def samples(text):
    """{name{labels}: value} of every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            out[key] = float(val)
    return out


def promtool(text, what):
    done = subprocess.run(["promtool", "check", "metrics"], input=text, text=True, capture_output=True)
    if done.returncode != 0:
        sys.exit(f"container-smoke: {order}: promtool check metrics ({what}) failed:\n{done.stdout}{done.stderr}")


def healthcheck(container):
    """The image's own HEALTHCHECK command, run by hand (podman schedules it with systemd)."""
    done = subprocess.run([*PODMAN, "healthcheck", "run", container], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"container-smoke: {order}: HEALTHCHECK of {container} failed: {done.stdout}{done.stderr}")


def scrape():
    status, text = get(metrics, "/metrics")
    return text if status == 200 else None


if phase == "alone":
    wait(lambda: get(metrics, "/-/healthy")[0] == 200, "the sidecar, alone, to be healthy")
    if get(metrics, "/-/ready")[0] != 503:
        sys.exit(f"container-smoke: {order}: ready without a Gunicorn master")
    text = wait(scrape, "a scrape with no app")
    if samples(text).get("gunicorn_up") != 0:
        sys.exit(f"container-smoke: {order}: gunicorn_up is not 0 before the app started")
    promtool(text, "no app yet")
    healthcheck("gm-smoke-sidecar")
    print(f"container-smoke: {order}: the sidecar alone: healthy (HEALTHCHECK too), not ready, "
          "gunicorn_up 0; promtool check metrics: ok")
    sys.exit(0)

wait(lambda: get(metrics, "/-/ready")[0] == 200, "the sidecar to be ready")
wait(lambda: get(app, "/")[0] == 200, "the app")


def at_rest():
    text = scrape()
    if text is None:
        return None
    s = samples(text)
    slots = {k for k in s if k.startswith('gunicorn_worker_memory_bytes{type="rss"')}
    return text if s.get("gunicorn_workers") == workers and len(slots) == workers else None


text = wait(at_rest, f"{workers} workers sampled at rest")
promtool(text, "at rest")
mine = [k for k in samples(text) if not k.startswith(APP_PREFIX)]
families = Counter(k.split("{")[0] for k in mine)
top = ", ".join(f"{n} {c}" for n, c in families.most_common(4))
print(f"container-smoke: {order}: at rest with {workers} workers: {len(mine)} monitor series "
      f"(budget {budget}; most: {top}); promtool check metrics: ok")
if len(mine) > budget:
    failed.append(f"{len(mine)} monitor series at rest, over the budget of {budget}")
healthcheck("gm-smoke-app")
healthcheck("gm-smoke-sidecar")

worker = get(app, "/pid")[1].strip()
subprocess.run([*PODMAN, "exec", "gm-smoke-app", "python", "-c",
                f"import os, signal; os.kill({worker}, signal.SIGTERM)"], check=True)
line = 'gunicorn_worker_exits_total{cause="signal",signal="SIGTERM"}'
wait(lambda: samples(scrape() or "").get(line) == 1, "the stray SIGTERM to be counted")
text = wait(at_rest, "per-worker memory of the replacement")
promtool(text, "after the stray SIGTERM")
print(f"container-smoke: {order}: stray kill -TERM counted as {line} 1; "
      "per-worker memory served from the shared pid namespace; HEALTHCHECKs pass")
for failure in failed:
    print(f"container-smoke: {order}: FAILED: {failure}", file=sys.stderr)
sys.exit(1 if failed else 0)
PY
}

failures=()
for order in sidecar-first app-first; do
    cleanup
    start_pod
    if [ "$order" = sidecar-first ]; then
        start_sidecar
        check "$order" alone || failures+=("$order")
        start_app
    else
        start_app
        start_sidecar
    fi
    check "$order" pod || failures+=("$order")
    [ ${#failures[@]} -eq 0 ] || podman logs --tail 20 gm-smoke-sidecar >&2 || true
done
[ ${#failures[@]} -eq 0 ] || { echo "container-smoke: FAILED: ${failures[*]}" >&2; exit 1; }
say "ok: image $((size / 1000000)) MB; both start orders pass"
