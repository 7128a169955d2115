"""HTTP basic auth against the web config's bcrypt hashes, for a server that must stay
responsive while someone guesses passwords.

bcrypt is slow on purpose: a check at cost 10 is some 60 ms of a core. Checked on every
request, 1,000 wrong passwords cost a minute of CPU and slowed every good scrape behind them.
So a check is one of three things, cheapest first:

- credentials verified before pass at once: the Authorization header is remembered by its
  sha256 (at most CACHE_SIZE, the least recently used dropped), so a scraper pays bcrypt once,
  and keeps scraping at full speed whatever else is going on;
- a header that is not `Basic` with a `user:password` in base64 fails at once;
- anything else costs a bcrypt check (an unknown user too, against a dummy hash as dear as the
  dearest real one, so that the time taken does not tell which names exist). Those checks run
  one at a time on a thread of their own, never on the event loop nor on the threads that render
  scrapes, and they are throttled by a token bucket (RATE a second, BURST at once): past it the
  answer is THROTTLED (the exporter's 429) at once, without bcrypt. A storm of guesses thus
  costs at most RATE checks a second, and queues at most BURST of them.

The price: while a storm lasts, credentials that were never verified (a new scraper, or any
after a restart of the sidecar) may be throttled too, until the storm ends. Hand-written
because no library at hand throttles bcrypt; the token bucket is a dozen lines.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hashlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import bcrypt

log = logging.getLogger("gunicorn_monitor")

CACHE_SIZE = 256  # verified Authorization headers remembered (as sha256)
RATE = 2.0  # bcrypt checks of credentials not verified before, per second, sustained
BURST = 8  # ... and at once (the most that ever wait for the bcrypt thread)
REPORT_EVERY = 10.0  # seconds between two log lines about throttled checks


class Verdict(enum.Enum):
    OK = "ok"
    DENIED = "denied"  # 401
    THROTTLED = "throttled"  # 429: too many checks of unknown credentials just now


class BasicAuth:
    """Checks Authorization headers against `users` (name -> bcrypt hash)."""

    def __init__(
        self,
        users: dict[str, bytes],
        rate: float = RATE,
        burst: int = BURST,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.users = users
        self.cache_size = cache_size
        self.bucket = TokenBucket(rate, burst)
        self.checks = 0  # bcrypt checks made
        self.throttled = 0  # checks refused by the bucket
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        cost = max(int(h[4:6]) for h in users.values())
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(cost))
        self._bcrypt = ThreadPoolExecutor(1, thread_name_prefix="bcrypt")
        self._reported = (0.0, 0)  # (when, self.throttled then)

    async def check(self, header: str | None) -> Verdict:
        """The verdict on a request's Authorization header; bcrypt, if needed, off the loop."""
        if self.cached(header):
            return Verdict.OK
        credentials = _parse(header)
        if credentials is None:
            return Verdict.DENIED
        if not self.bucket.take():
            self.throttled += 1
            self._report()
            return Verdict.THROTTLED
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._bcrypt, self._verify, header, *credentials)
        return Verdict.OK if ok else Verdict.DENIED

    def cached(self, header: str | None) -> bool:
        """Whether `header` was verified before (a sha256 and a dictionary look-up)."""
        if not header:
            return False
        digest = _digest(header)
        with self._lock:
            if digest in self._ok:
                self._ok.move_to_end(digest)
                return True
        return False

    def verify(self, header: str | None) -> bool:
        """The whole check, blocking, unthrottled: for callers off the event loop."""
        if self.cached(header):
            return True
        credentials = _parse(header)
        return credentials is not None and self._verify(header or "", *credentials)

    def close(self) -> None:
        self._bcrypt.shutdown(wait=False, cancel_futures=True)

    def _verify(self, header: str, user: str, password: bytes) -> bool:
        self.checks += 1
        hashed = self.users.get(user)
        ok = _checkpw(password, hashed if hashed is not None else self._dummy)
        if not ok or hashed is None:
            log.debug("event=auth_failed user_known=%s", hashed is not None)
            return False
        with self._lock:
            self._ok[_digest(header)] = None
            while len(self._ok) > self.cache_size:
                self._ok.popitem(last=False)
        return True

    def _report(self) -> None:
        """One line per REPORT_EVERY seconds while checks are throttled, with their count."""
        now = time.monotonic()
        when, count = self._reported
        if now - when >= REPORT_EVERY:
            log.warning(
                "event=auth_throttled refused=%d rate=%g/s burst=%d",
                self.throttled - count,
                self.bucket.rate,
                self.bucket.burst,
            )
            self._reported = (now, self.throttled)


class TokenBucket:
    """`burst` tokens, refilled at `rate` a second; take() spends one if there is one."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


def _digest(header: str) -> bytes:
    return hashlib.sha256(header.encode("utf-8", "surrogateescape")).digest()


def _parse(header: str | None) -> tuple[str, bytes] | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


def _checkpw(password: bytes, hashed: bytes) -> bool:
    # Past 72 bytes some bcrypt releases truncate and others raise: refuse, in the same time.
    try:
        return bcrypt.checkpw(password[:72], hashed) and len(password) <= 72
    except ValueError:
        return False
