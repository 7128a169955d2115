"""What each Gunicorn worker class does, known in one place and resolved through the hierarchy.

Worker classes differ in ways the monitor must know: whether they call `pre_request` and
`post_request` around each request, whether they count their own requests in `worker.nr`
(uvicorn counts them itself), whether they keep connections alive between requests, whether
they handle SIGTERM and SIGABRT in Python (Gunicorn's own classes) or die by the signal itself
(uvicorn's, which reset the handlers to SIG_DFL), what they log when they decide to leave after
`max_requests`, and how many requests one worker serves at once. The hooks, the captures and
`gunicorn-monitor doctor` ask this table; none of them matches class or module names itself.

A class is resolved through its method resolution order: a subclass in the user's own module
(as uvicorn-gunicorn-docker and many apps ship) behaves as the nearest base listed here, and a
new worker class is one entry. Entries name classes by their qualified name, so this module
imports no worker class (and needs neither gevent nor uvicorn installed).
"""

from __future__ import annotations

from dataclasses import dataclass

# How many requests a worker serves at once, i.e. how many in-flight slots it needs.
ONE = "one"  # one request at a time (sync; tornado's WSGIContainer runs a WSGI app on its loop)
THREADS = "threads"  # one per thread (`threads`)
CONNECTIONS = "connections"  # one per connection, up to `worker_connections` (greenlets)
ASGI = "asgi"  # one per request task of an asyncio server, up to `worker_connections`

# What `worker.wsgi` is once the app is loaded: the capture wraps it for classes that call no
# request hooks.
WSGI_APP = "wsgi"
ASGI_APP = "asgi"

# What Gunicorn's own classes log (through the worker's Gunicorn logger, `worker.log.info`) at
# the moment they decide to leave after max_requests, before they serve the request that
# reached the limit: sync, gthread and the async workers as they count it, tornado as a
# connection closes. Unchanged from 22.0 to 27.0.1.
GUNICORN_MAX_REQUESTS_LOG = "Autorestarting worker after current request."
# What uvicorn's server logs (through `logging.getLogger("uvicorn.error")`) on the loop tick
# where it finds the limit reached and leaves its main loop: a warning in 0.32, info since
# (the text after the prefix has changed; the prefix has not).
UVICORN_MAX_REQUESTS_LOG = "Maximum request limit"
UVICORN_LOGGER = "uvicorn.error"


@dataclass(frozen=True)
class WorkerClass:
    name: str  # what the README, doctor and status call it
    bases: tuple[str, ...]  # `module.QualName` of the classes this entry stands for
    request_hooks: bool  # calls pre_request/post_request around every request
    counts_requests: bool  # keeps worker.nr (uvicorn's stays 0: it counts in its own server)
    keepalive: bool  # holds a connection open between requests (`keepalive` then matters)
    python_signals: bool  # SIGTERM/SIGABRT run Python handlers (False: it dies by the signal)
    # The log message that says it decided to leave after max_requests; None: it never does
    # (GeventPyWSGIWorker's pywsgi server neither counts requests nor honours max_requests).
    max_requests_log: str | None
    # The `logging` logger that message goes through; None: the worker's own Gunicorn logger.
    max_requests_logger: str | None
    concurrency: str  # ONE, THREADS, CONNECTIONS or ASGI
    app: str  # WSGI_APP or ASGI_APP

    def capacity(self, cfg: object) -> int:
        """In-flight slots one worker of this class needs under `cfg` (Gunicorn's Config)."""
        if self.concurrency == ONE:
            return 1
        if self.concurrency == THREADS:
            return max(1, int(getattr(cfg, "threads", 1) or 1))
        return max(1, int(getattr(cfg, "worker_connections", 1000) or 1000))


_GUNICORN = dict(
    python_signals=True,
    max_requests_logger=None,
    app=WSGI_APP,
)
_COUNTS = dict(counts_requests=True, max_requests_log=GUNICORN_MAX_REQUESTS_LOG)
_UVICORN = dict(
    request_hooks=False,
    counts_requests=False,
    keepalive=True,
    python_signals=False,
    max_requests_log=UVICORN_MAX_REQUESTS_LOG,
    max_requests_logger=UVICORN_LOGGER,
    concurrency=ASGI,
    app=ASGI_APP,
)

# Checked against the released code of Gunicorn 22.0.0 to 27.0.1, uvicorn-worker 0.3.0 and
# 0.4.0 (both `uvicorn_worker._workers`), uvicorn 0.32.0 to 0.54.0 (`uvicorn.workers`). The
# eventlet worker is in Gunicorn 22.0 to 25.x only (26.0 removed it). Gunicorn's own ASGI
# worker (`gasgi.ASGIWorker`, 24.0+) has no entry: a class resolved to None is served
# without request tracking, and its exits that only the worker could explain are `unknown`.
#
# resolve() walks the MRO from the class itself up and takes the first class listed here, so
# an entry for a subclass (GeventPyWSGIWorker) wins over its base's (GeventWorker).
CLASSES = (
    WorkerClass(
        "sync",
        ("gunicorn.workers.sync.SyncWorker",),
        request_hooks=True,
        keepalive=False,
        concurrency=ONE,
        **_COUNTS,
        **_GUNICORN,
    ),
    WorkerClass(
        "gthread",
        ("gunicorn.workers.gthread.ThreadWorker",),
        request_hooks=True,
        keepalive=True,
        concurrency=THREADS,
        **_COUNTS,
        **_GUNICORN,
    ),
    WorkerClass(
        # gevent's own pywsgi server: no Gunicorn request loop, so no hooks and no max_requests.
        "gevent_pywsgi",
        ("gunicorn.workers.ggevent.GeventPyWSGIWorker",),
        request_hooks=False,
        counts_requests=False,
        keepalive=True,
        max_requests_log=None,
        concurrency=CONNECTIONS,
        **_GUNICORN,
    ),
    WorkerClass(
        "gevent",
        ("gunicorn.workers.ggevent.GeventWorker",),
        request_hooks=True,
        keepalive=True,
        concurrency=CONNECTIONS,
        **_COUNTS,
        **_GUNICORN,
    ),
    WorkerClass(
        "eventlet",
        ("gunicorn.workers.geventlet.EventletWorker",),
        request_hooks=True,
        keepalive=True,
        concurrency=CONNECTIONS,
        **_COUNTS,
        **_GUNICORN,
    ),
    WorkerClass(
        # Counts connections, not requests: handle_request runs as a connection closes.
        "tornado",
        ("gunicorn.workers.gtornado.TornadoWorker",),
        request_hooks=False,
        keepalive=True,
        concurrency=ONE,
        **_COUNTS,
        **_GUNICORN,
    ),
    WorkerClass(
        "uvicorn",
        ("uvicorn_worker._workers.UvicornWorker", "uvicorn.workers.UvicornWorker"),
        **_UVICORN,
    ),
)
_BY_BASE = {base: entry for entry in CLASSES for base in entry.bases}


def qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve(cls: type) -> WorkerClass | None:
    """The entry for a worker class or its nearest listed base; None for a class unknown here."""
    for klass in getattr(cls, "__mro__", ()):
        entry = _BY_BASE.get(qualified(klass))
        if entry is not None:
            return entry
    return None


def of(worker: object) -> WorkerClass | None:
    """The entry for a worker instance (the hooks' question)."""
    return resolve(type(worker))
