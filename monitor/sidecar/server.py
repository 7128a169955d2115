"""The sidecar's HTTP server: uvicorn, with what each connection may cost bounded.

uvicorn serves HTTP/1.1 on asyncio, so an open connection costs a little memory and no thread,
and the ASGI app (exporter.py) is all the sidecar writes above it. Its httptools protocol
(llhttp, in C) is the one extended: on a kept connection a scrape costs the event loop 0.61 ms
of CPU where h11's took 0.97 ms (16 workers, 5 scrapes a second, per thread's schedstat), and
that difference was a fifth of the sidecar's whole cost (benchmarks/exporter_cost.py). But
uvicorn bounds neither how long a request's head may take to arrive (one trickling in a byte a
second holds its connection for ever: uvicorn's keep-alive timer stops at the first byte), nor
how many connections are open, and it leaves TLS handshakes to asyncio's 60 s default,
uncounted. Those bounds are added here, on uvicorn's own protocol (hand-written because uvicorn
has no setting for them), so that a slow, silent or abusive client costs its own connection's
memory and never another client's scrape:

- A deadline, REQUEST_TIMEOUT after accept and again at the first byte of each later request,
  by which that request's head (its TLS handshake included) must be in: missed, the connection
  is dropped. While a request is answered no deadline runs: the answer is ours, and bounded.
- Between requests a connection is kept KEEP_ALIVE (uvicorn's keep-alive timer closes it
  cleanly then), long enough for Prometheus to reuse it at its next scrape: a new connection
  costs the sidecar some 0.3 ms of CPU more than a kept one's scrape, a quarter more. A deadline
  REQUEST_TIMEOUT later backs that close, and ends a connection whose client does not read its
  response (whose close could never flush).
- TLS is put in front by the protocol itself, with our own SSLContext (the web config's: client
  certificates and TLS versions included) and under the same deadline, so that a connection in
  its handshake is one the server knows of: counted, and droppable. It is asyncio's own TLS
  protocol (`asyncio.sslproto.SSLProtocol`, what `loop.create_server(ssl=...)` runs), set up
  where uvicorn cannot: uvicorn passes no handshake timeout, and its versions before 0.47 take
  no SSLContext of ours.
- At most MAX_CONNECTIONS are open, handshakes included. Past it the longest-idle one (idle:
  not being answered; a slow request or a stalled handshake is idle) is dropped for the new
  one, so that no flood of idle or slow connections locks a scraper out.
- A request head not complete within MAX_HEAD bytes is refused with uvicorn's fixed 400 (llhttp
  sets no limit of its own: the bytes a connection sent since its last complete head are
  counted); nothing a client sends is echoed in any error (exporter.py).

uvicorn's own log lines come out as ours (`_UvicornLines`), its access log is off, and a
client's misbehaviour is a debug line, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from asyncio import sslproto
from collections import OrderedDict
from email.utils import formatdate
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("gunicorn_monitor")

MAX_CONNECTIONS = 512  # open at once, TLS handshakes included; past it the longest-idle goes
REQUEST_TIMEOUT = 10.0  # seconds to a whole request head, from accept or from its first byte
# Seconds a connection is kept between requests (uvicorn then closes it cleanly). Prometheus
# keeps its connection to a target idle for up to 5 minutes and scrapes every 1 min by default
# (15 s to 2 min in common use): past 2 min, with room for its jitter, every scrape reuses its
# connection instead of paying a new one. What this holds is bounded by MAX_CONNECTIONS (an
# idle connection is the first dropped for a new one), a small buffer each (README).
KEEP_ALIVE = 130
MAX_HEAD = 16 * 1024  # bytes of request line and headers (h11's default, kept)
LISTEN_BACKLOG = 128  # a burst of connections waits in the kernel, not in a SYN retry
SHUTDOWN_GRACE = 5  # seconds a SIGTERM waits for responses in flight
TURN = 60.0  # seconds between turns of the server's loop when nothing wakes it (Server)


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `[V6]:PORT`; ValueError with a readable message otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def bind(listen: str) -> socket.socket:
    """A listening socket on `listen` (ValueError for a malformed one, OSError if the bind
    fails: both for the caller to say in one line)."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP said, not left 0: asyncio sets TCP_NODELAY only on sockets that say it, and
    # without it a response's second write waits for the client's delayed ACK (40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def config(
    app: Any,
    context: ssl.SSLContext | None = None,
    timeout: float = REQUEST_TIMEOUT,
    limit: int = MAX_CONNECTIONS,
    keep_alive: int = KEEP_ALIVE,
) -> uvicorn.Config:
    """uvicorn's settings for `app`, with our protocol (TLS, deadline, connection limit)."""
    return uvicorn.Config(
        app,
        http=protocol_class(context, timeout, limit),
        ws="none",
        lifespan="off",
        interface="asgi3",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=keep_alive,
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
        backlog=LISTEN_BACKLOG,
    )


def serve(sock: socket.socket, settings: uvicorn.Config) -> None:
    """Serve on `sock` until SIGTERM or SIGINT, then finish what is in flight (at most
    SHUTDOWN_GRACE seconds) and return."""
    logging.getLogger("asyncio").setLevel(logging.WARNING)  # its debug lines are not events
    lines = _UvicornLines()
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(lines)
    try:
        asyncio.run(_run(Server(settings), sock))
    finally:
        uvicorn_log.removeFilter(lines)


async def _run(server: Server, sock: socket.socket) -> None:
    asyncio.get_running_loop().set_exception_handler(_loop_error)
    await server.serve(sockets=[sock])


class Server(uvicorn.Server):
    """uvicorn's server, whose loop sleeps until it is told to stop.

    uvicorn wakes every 0.1 s to see whether a signal asked it to stop, and on every tenth turn
    renews its Date header. Those wakeups were the largest part of an idle sidecar's CPU (some
    0.17 % of a core on a shared machine, as much as the stock exporter's whole cost beside 64
    workers: benchmarks/exporter_cost.py). Here a stop (a signal, or `stop()`) wakes the loop at
    once, so SIGTERM is acted on as soon as before; the Date header is renewed by the protocol
    as a request arrives (`_DateHeader`, to the second, as uvicorn's); and the loop turns on its
    own once a TURN only, for a `should_exit` set some other way (a test, say)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._turn: asyncio.Future | None = None

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        while not self.should_exit:
            self._turn = self._loop.create_future()
            timer = self._loop.call_later(TURN, self._wake)
            try:
                await self._turn
            finally:
                timer.cancel()

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self._wake_soon()

    def stop(self) -> None:
        """Stop as SIGTERM would (without its signal), from any thread."""
        self.should_exit = True
        self._wake_soon()

    def _wake_soon(self) -> None:
        # The one call into the loop safe from a signal handler or another thread: it queues
        # the wake and writes to the loop's self-pipe, which ends its wait.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._turn is not None and not self._turn.done():
            self._turn.set_result(None)


def protocol_class(
    context: ssl.SSLContext | None,
    timeout: float = REQUEST_TIMEOUT,
    limit: int = MAX_CONNECTIONS,
) -> type[GuardedProtocol]:
    """The protocol uvicorn runs for one server: its connections, TLS context and deadline."""
    attrs = {
        "table": Connections(limit),
        "context": context,
        "timeout": timeout,
        "dates": _DateHeader(),
    }
    return type("GuardedProtocol", (GuardedProtocol,), attrs)


class Connections:
    """The open connections of a server, the idle ones in the order they became idle."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dropped = 0  # dropped to make room for a new one
        self._idle: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self._busy: set[GuardedProtocol] = set()

    def __len__(self) -> int:
        return len(self._idle) + len(self._busy)

    def admit(self, conn: GuardedProtocol) -> bool:
        """Count `conn` in, dropping the longest-idle one if the limit is reached; False if
        every open connection is being answered (then `conn` is the one to go)."""
        if len(self) >= self.limit:
            if not self._idle:
                return False
            oldest = next(iter(self._idle))
            self.forget(oldest)
            self.dropped += 1
            oldest.drop("connection limit")
        self._idle[conn] = None
        return True

    def busy(self, conn: GuardedProtocol) -> None:
        if conn in self._idle:
            del self._idle[conn]
            self._busy.add(conn)

    def idle(self, conn: GuardedProtocol) -> None:
        if conn in self._busy:
            self._busy.discard(conn)
            self._idle[conn] = None

    def forget(self, conn: GuardedProtocol) -> None:
        self._idle.pop(conn, None)
        self._busy.discard(conn)


class _DateHeader:
    """uvicorn's default headers (its Date header, to the second), renewed when a request
    arrives in a second they are not of: what uvicorn's tick does, without a wakeup a second
    when no request comes (Server)."""

    def __init__(self) -> None:
        self.second: int | None = None

    def renew(self, state: Any, config: uvicorn.Config) -> None:
        now = time.time()
        if int(now) != self.second:
            self.second = int(now)
            date = [(b"date", formatdate(now, usegmt=True).encode())]
            state.default_headers = (date if config.date_header else []) + config.encoded_headers


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head deadline and size limit, TLS started
    under that deadline, and a place in the server's bounded `table` of connections (see the
    module docstring)."""

    table: Connections
    context: ssl.SSLContext | None
    timeout: float
    dates: _DateHeader

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._raw: asyncio.Transport | None = None  # the TCP transport, under TLS if any
        self._peer = "-"
        self._deadline: asyncio.TimerHandle | None = None
        self._made = False  # uvicorn's connection_made ran (after the handshake, with TLS)
        self._kept = False  # between requests: the next byte starts a request's deadline
        self._unheard = 0  # bytes received since the last request head was complete

    # The TCP connection, and TLS in front of it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        if self._raw is not None:  # the second call: the handshake is done, here is TLS
            self._made = True
            super().connection_made(transport)  # type: ignore[arg-type]
            return
        self._raw = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else "-"
        if not self.table.admit(self):
            log.debug("event=connection_refused client=%s reason=all_busy", self._peer)
            transport.abort()  # type: ignore[attr-defined]
            return
        self._arm(self.timeout)
        if self.context is None:
            self._made = True
            super().connection_made(transport)  # type: ignore[arg-type]
            return
        # TLS in front of this protocol, as loop.create_server(ssl=...) would put it, but here,
        # where the connection is already counted and can be dropped. Done in this call, before
        # any byte is read (loop.start_tls would be done later, in a task, and on Python 3.10
        # the ClientHello can be read, and lost, in between).
        handshake = self.loop.create_future()
        handshake.add_done_callback(self._handshake_done)
        tls = sslproto.SSLProtocol(
            self.loop,
            self,
            self.context,
            handshake,
            server_side=True,
            ssl_handshake_timeout=self.timeout,
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)

    def _handshake_done(self, handshake: asyncio.Future) -> None:
        error = None if handshake.cancelled() else handshake.exception()
        if not self._made:  # failed, timed out, or the client went: nothing was served
            why = type(error).__name__ if error is not None else "closed"
            log.debug("event=tls_failed client=%s error=%s", self._peer, why)
            self.drop("tls handshake failed")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.table.forget(self)
        if self._made:
            super().connection_lost(exc)

    def drop(self, why: str) -> None:
        """End the connection now, whatever it was doing."""
        log.debug("event=connection_dropped client=%s reason=%s", self._peer, why.replace(" ", "_"))
        self._disarm()
        self.table.forget(self)
        if self._raw is not None:
            self._raw.abort()

    # Requests (uvicorn's hooks, extended)

    def data_received(self, data: bytes) -> None:
        if self._kept:  # a kept connection's next request begins: its head has a deadline
            self._kept = False
            self._arm(self.timeout)
        self._unheard += len(data)
        super().data_received(data)
        # llhttp sets no limit on a head: past MAX_HEAD bytes without one complete, the
        # request is refused (a fixed 400) or, while an answer is being written, dropped.
        if self._unheard > MAX_HEAD and not self.transport.is_closing():
            if self.cycle is None or self.cycle.response_complete:
                self.send_400_response("Invalid HTTP request received.")
            else:
                self.drop("request head too large")

    def on_headers_complete(self) -> None:
        self.dates.renew(self.server_state, self.config)  # before the request's cycle takes them
        self._unheard = 0
        cycle = self.cycle
        super().on_headers_complete()
        if self.cycle is not cycle:  # a request's head is in: the app answers it now
            self._disarm()
            self.table.busy(self)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        if self.cycle is None or self.cycle.response_complete:
            self.table.idle(self)
            self._kept = True
            self._arm(self.timeout_keep_alive + self.timeout)

    def send_400_response(self, msg: str) -> None:
        log.debug("event=bad_request client=%s", self._peer)
        super().send_400_response(msg)  # a fixed text, never what the client sent

    # The deadline

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self.drop, "request timeout")

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


class _UvicornLines(logging.Filter):
    """uvicorn's log lines, as ours: its start and stop chatter (below WARNING) goes, since the
    sidecar says those itself; what a client did wrong is the protocol's debug line; anything
    else keeps its level, as one structured line."""

    CLIENT_FAULTS = ("Invalid HTTP request", "Unsupported upgrade", "No supported WebSocket")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        text = record.getMessage()
        if text.startswith(self.CLIENT_FAULTS):
            return False
        error = record.exc_info[1] if record.exc_info else None
        record.msg = "event=server_message message=%r error=%r"
        record.args = (text.splitlines()[0], f"{type(error).__name__}: {error}" if error else "")
        record.exc_info = record.exc_text = None
        return True


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """asyncio's errors (out of file descriptors at accept, a transport's failure): one line
    each, without the traceback asyncio's default handler prints."""
    error = context.get("exception")
    log.warning(
        "event=loop_error message=%r error=%r",
        context.get("message", ""),
        f"{type(error).__name__}: {error}" if error is not None else "",
    )
