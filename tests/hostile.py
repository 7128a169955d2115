"""Hostile clients of an HTTP server on loopback, for the tests and benchmarks/http_load.py:
slowloris connections, silent ones (a stalled TLS handshake, to a TLS port), and a password
storm. Each is bounded in count and time, and stops by itself.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

# A request that never ends: a head that goes on header after header.
SLOW_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: y\r\n" * 100_000


class Slowloris:
    """`count` connections to `port`, each sending `request` one byte every `interval`
    seconds (with b"", nothing: to a TLS port, a handshake never started); one thread drives
    them all. A connection the server drops is replaced by a new one (so `count` stay open, as
    an attacker would keep them), and counted in `dropped`."""

    def __init__(
        self, port: int, count: int, interval: float = 1.0, request: bytes = SLOW_REQUEST
    ) -> None:
        self.port, self.count, self.interval, self.request = port, count, interval, request
        self.dropped = 0
        self.refused = 0  # connections that could not be opened (a full backlog)
        self._socks: dict[socket.socket, int] = {}  # -> bytes sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Slowloris:
        for _ in range(self.count):
            self._open()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self._socks:
            s.close()

    def _open(self) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError:
            self.refused += 1
            return
        s.setblocking(False)
        self._socks[s] = 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for s, sent in list(self._socks.items()):
                try:
                    if s.recv(1, socket.MSG_PEEK) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:
                    self._replace(s)
                    continue
                if sent >= len(self.request):
                    continue
                try:
                    s.send(self.request[sent : sent + 1])
                    self._socks[s] = sent + 1
                except BlockingIOError:
                    pass
                except OSError:
                    self._replace(s)

    def _replace(self, s: socket.socket) -> None:
        s.close()
        del self._socks[s]
        self.dropped += 1
        if not self._stop.is_set():
            self._open()


def silent(port: int, count: int) -> list[socket.socket]:
    """`count` TCP connections that send nothing: to a TLS port, handshakes never started."""
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def password_storm(
    port: int,
    user: str,
    total: int,
    clients: int,
    context: ssl.SSLContext | None = None,
    path: str = "/metrics",
) -> Counter:
    """`total` requests with distinct wrong passwords for `user`, from `clients` threads, each
    on a new connection; the answers' statuses counted (0: no answer)."""

    def guess(i: int) -> int:
        if context is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", port, timeout=30, context=context
            )
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", path, headers={"Authorization": basic(user, f"guess-{i}")})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        except (OSError, http.client.HTTPException):
            return 0
        finally:
            conn.close()

    with ThreadPoolExecutor(clients) as pool:
        return Counter(pool.map(guess, range(total)))
