# One image for both containers of a pod: the Gunicorn app (default CMD) and the
# gunicorn-monitor sidecar (`gunicorn-monitor serve ...`). Both must run as the same UID so the
# sidecar may read the workers' /proc entries and the shared directory.
#
#   docker build -t gunicorn-monitor .
#   docker run -p 8000:8000 gunicorn-monitor                       # demo app (WSGI), binds
#                                                                  # GUNICORN_BIND=0.0.0.0:8000
#   docker run gunicorn-monitor gunicorn -c gunicorn.conf.py \
#       -k uvicorn_worker.UvicornWorker examples.app:asgi_app      # demo app (ASGI)
#   docker run gunicorn-monitor gunicorn-monitor serve \
#       --dir /run/gunicorn-monitor --listen 0.0.0.0:9971          # sidecar
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PROMETHEUS_MULTIPROC_DIR=/run/gunicorn-monitor \
    XDG_RUNTIME_DIR=/run/gunicorn \
    HEALTHCHECK_URL=tcp://127.0.0.1:8000

WORKDIR /srv/app

# Dependencies and the package first: this layer only changes with the package itself. Versions
# come from the project's own pins (pyproject.toml); the uvicorn extra serves the ASGI demo.
COPY pyproject.toml README.md ./
COPY monitor/ monitor/
RUN pip install --no-cache-dir "./[uvicorn]" \
    && rm -rf build ./*.egg-info

COPY gunicorn.conf.py ./
COPY examples/ examples/

# Numeric UID/GID 10001, the same in Kubernetes' runAsUser. The shared directory is created
# owned by that user, so a fresh Docker named volume mounted there inherits the ownership.
# /run/gunicorn holds Gunicorn's control socket (gunicornc), which otherwise goes to $HOME,
# and the user has no home.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin app \
    && install -d -o 10001 -g 10001 -m 0750 /run/gunicorn-monitor \
    && install -d -o 10001 -g 10001 -m 0700 /run/gunicorn
USER 10001:10001

EXPOSE 8000 9971

# The app's health is its master: a connection to the port the master listens on, which the
# kernel accepts into the backlog even while every worker is busy (a timeout storm must not
# make the app "unhealthy" for an orchestrator to restart). Set HEALTHCHECK_URL with
# GUNICORN_BIND. The sidecar sets an http:// URL, its /-/healthy. (curl is not in slim images.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, socket, urllib.parse, urllib.request; u = urllib.parse.urlsplit(os.environ['HEALTHCHECK_URL']); socket.create_connection((u.hostname, u.port), 3).close() if u.scheme == 'tcp' else urllib.request.urlopen(u.geturl(), timeout=3)"]

CMD ["gunicorn", "-c", "gunicorn.conf.py", "examples.app:app"]
