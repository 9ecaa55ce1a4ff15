"""What stands between a poll cycle and a vendor: a token bucket, a per-call deadline and a circuit breaker.

Vendor SDKs retry and sleep on their own (alpaca-py sleeps a fixed 3 s on a 429 and sets no request timeout;
polygon's urllib3 retries honour ``Retry-After``). So every call runs on a worker thread and the cycle stops
waiting for it at the deadline; a call left running finishes (or times out) in the background and its
answer is discarded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# Error classes recorded per symbol and cycle (the ``error_class`` column of lake/outcomes).
AUTH = "auth"  # 401/403: the key is missing or rejected
RATE_LIMITED = "rate_limited"  # the vendor said 429
THROTTLED = "throttled"  # our own token bucket had no token: the call was not made
SERVER_ERROR = "server_error"  # 5xx, or the client gave up retrying them
CLIENT_ERROR = "client_error"  # another 4xx
TIMEOUT = "timeout"  # no answer within the per-call timeout or the cycle deadline
CONNECTION = "connection"  # refused, reset, DNS
MALFORMED = "malformed"  # the body was not the documented JSON
UNAVAILABLE = "unavailable"  # a valid but empty answer (e.g. Polygon's deprecated crypto book)
UNKNOWN_SYMBOL = "unknown_symbol"  # the vendor answered but not for this symbol
BREAKER_OPEN = "breaker_open"  # the source failed too often lately: not called
DEADLINE = "deadline"  # the cycle's deadline passed before this source was tried
NOT_CONFIGURED = "not_configured"  # no source in the symbol's chain
INVALID_BOOK = "invalid_book"  # the answer was shaped but failed validation (quarantined with its reason)

# Failures that say the *source* is unwell (they count towards opening the breaker).
SOURCE_FAILURES = frozenset({AUTH, RATE_LIMITED, SERVER_ERROR, TIMEOUT, CONNECTION, MALFORMED, UNAVAILABLE,
                             CLIENT_ERROR})


class SourceError(Exception):
    """A call to a source failed; ``error_class`` is one of the constants above."""

    def __init__(self, error_class: str, detail: str = "") -> None:
        super().__init__(f"{error_class}: {detail}" if detail else error_class)
        self.error_class = error_class
        self.detail = detail


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up. ``take`` never blocks."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = burst
        self.t = clock()
        self._lock = threading.Lock()

    def take(self, n: float = 1.0) -> bool:
        with self._lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now
            if self.tokens >= n:
                self.tokens -= n
                return True
            return False


class CircuitBreaker:
    """Closed until ``failures`` consecutive failures; then open for ``cooldown_s``; then half-open: one trial
    call is let through, and its result closes or re-opens the breaker."""

    def __init__(self, failures: int = 3, cooldown_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self.trial_out = False
        self.opened_count = 0
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self.opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        with self._lock:
            st = self.state
            if st == "closed":
                return True
            if st == "half_open" and not self.trial_out:
                self.trial_out = True
                return True
            return False

    def record(self, ok: bool) -> None:
        with self._lock:
            self.trial_out = False
            if ok:
                self.consecutive = 0
                self.opened_at = None
                return
            self.consecutive += 1
            if self.opened_at is not None or self.consecutive >= self.failures:
                if self.opened_at is None:
                    self.opened_count += 1
                self.opened_at = self.clock()


@dataclass
class Limits:
    rate_per_s: float = 5.0
    burst: float = 10.0
    timeout_s: float = 2.0
    breaker_failures: int = 3
    breaker_cooldown_s: float = 30.0


class Guard:
    """Runs a source's calls under its bucket, breaker and a deadline."""

    def __init__(self, name: str, limits: Limits, classify: Callable[[BaseException], SourceError],
                 clock: Callable[[], float] = time.monotonic, workers: int = 8) -> None:
        self.name = name
        self.limits = limits
        self.classify = classify
        self.clock = clock
        self.bucket = TokenBucket(limits.rate_per_s, limits.burst, clock)
        self.breaker = CircuitBreaker(limits.breaker_failures, limits.breaker_cooldown_s, clock)
        # Threads stuck on a hanging vendor stay busy until their socket gives up; a bounded pool keeps a
        # stalled vendor from piling up threads without limit (a full pool shows up as timeouts).
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"src-{name}")

    def call(self, fn: Callable[..., T], *args: Any, deadline: float | None = None) -> T:
        """``fn(*args)`` or SourceError. ``deadline`` is an absolute ``time.monotonic()`` value."""
        if not self.breaker.allow():
            raise SourceError(BREAKER_OPEN, f"{self.name} failed {self.breaker.consecutive} times in a row")
        if not self.bucket.take():
            self.breaker.trial_out = False  # a throttled trial is not a trial
            raise SourceError(THROTTLED, f"{self.name} rate limit {self.limits.rate_per_s:g}/s")
        wait = self.limits.timeout_s
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
        if wait <= 0:
            self.breaker.trial_out = False
            raise SourceError(DEADLINE, "the cycle deadline passed")
        fut = self._pool.submit(fn, *args)
        try:
            out = fut.result(timeout=wait)
        except FutureTimeout:
            fut.cancel()
            self.breaker.record(False)
            raise SourceError(TIMEOUT, f"no answer from {self.name} within {wait:.2f} s") from None
        except SourceError as e:
            self.breaker.record(e.error_class not in SOURCE_FAILURES)
            raise
        except Exception as e:
            err = self.classify(e)
            self.breaker.record(err.error_class not in SOURCE_FAILURES)
            raise err from e
        self.breaker.record(True)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
