"""What stands between a poll cycle and a vendor: a token bucket, a per-call deadline and a circuit breaker.

Vendor SDKs retry and sleep on their own and set no socket timeout (alpaca-py sleeps a fixed 3 s on a 429;
polygon-api-client builds a read timeout but never passes it to urllib3). The sources give both clients a
socket timeout and turn a 429 into :class:`RateLimited` with its ``Retry-After``, which backs the whole
source off. Every call also runs on a daemon thread and the cycle stops waiting for it at the deadline; a
call left running ends at its socket timeout in the background and its answer is discarded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

from microstructure.sources.secrets import scrub

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

# Failures of a call that say nothing about which symbol caused them and would hit any call to this source:
# a batch failing this way is not split, its symbols all get the error.
WHOLE_SOURCE = frozenset({AUTH, RATE_LIMITED, THROTTLED, CONNECTION, BREAKER_OPEN, DEADLINE})
# Failures one symbol in a batch can cause (a hang, a 500, an undecodable row): a batch failing this way is
# split until the culprits stand alone.
SPLITTABLE = frozenset({TIMEOUT, SERVER_ERROR, MALFORMED, CLIENT_ERROR, UNAVAILABLE})


class SourceError(Exception):
    """A call to a source failed; ``error_class`` is one of the constants above."""

    def __init__(self, error_class: str, detail: str = "") -> None:
        # The detail often quotes a vendor's answer, which may echo our request headers: scrubbed here, once,
        # so no stored outcome or printed message built from it can carry a key.
        detail = scrub(detail) if detail else detail
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
    # Per call, and the socket timeout of every vendor request. Below the cycle deadline so a batch that
    # hangs still leaves time to split it and serve its healthy symbols in the same cycle.
    timeout_s: float = 0.8
    breaker_failures: int = 3
    breaker_cooldown_s: float = 30.0
    max_retry_after_s: float = 300.0  # a vendor's Retry-After is honoured up to this long


class RateLimited(SourceError):
    """The vendor said 429; ``retry_after_s`` is its ``Retry-After`` (None when it gave none)."""

    def __init__(self, retry_after_s: float | None, detail: str = "") -> None:
        super().__init__(RATE_LIMITED, detail or "HTTP 429")
        self.retry_after_s = retry_after_s


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def run_with_timeout(fn: Callable[..., T], args: tuple[Any, ...], wait: float, name: str) -> T:
    """``fn(*args)`` on a daemon thread, waited for at most ``wait`` seconds.

    A daemon thread, not a pool's: the interpreter joins pool threads at exit, so one call stuck in a
    vendor's socket would keep ``poll`` (or a Prefect task) alive after its last cycle. The socket
    timeouts we set on both clients end such threads soon after anyway.
    """
    fut: Future[T] = Future()

    def target() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # handed to the caller through the future
            fut.set_exception(e)

    threading.Thread(target=target, name=f"src-{name}", daemon=True).start()
    return fut.result(timeout=wait)


class Guard:
    """Runs a source's calls under its token bucket, the vendor's Retry-After and a deadline.

    The source-level circuit breaker lives here but is fed by the chain once per cycle (a source is
    unwell only when none of its calls worked), so one bad symbol cannot open it for everybody.
    """

    def __init__(self, name: str, limits: Limits, classify: Callable[[BaseException], SourceError],
                 clock: Callable[[], float] = time.monotonic, workers: int = 16) -> None:
        self.name = name
        self.limits = limits
        self.classify = classify
        self.clock = clock
        self.bucket = TokenBucket(limits.rate_per_s, limits.burst, clock)
        self.breaker = CircuitBreaker(limits.breaker_failures, limits.breaker_cooldown_s, clock)
        self.backoff_until = 0.0  # monotonic time before which the vendor asked us not to call
        # Calls stuck on a hanging vendor hold a slot until their socket times out; a bounded number of
        # slots keeps a stalled vendor from piling up threads (a full house shows up as timeouts).
        self._slots = threading.BoundedSemaphore(workers)

    def call(self, fn: Callable[..., T], *args: Any, deadline: float | None = None) -> T:
        """``fn(*args)`` or SourceError. ``deadline`` is an absolute ``time.monotonic()`` value."""
        now = self.clock()
        if now < self.backoff_until:
            raise SourceError(RATE_LIMITED, f"{self.name} asked us to wait (Retry-After): "
                                            f"{self.backoff_until - now:.1f} s left")
        wait = self.limits.timeout_s
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
        if wait <= 0:
            raise SourceError(DEADLINE, "the cycle deadline passed")
        if not self.bucket.take():
            raise SourceError(THROTTLED, f"{self.name} rate limit {self.limits.rate_per_s:g}/s")
        if not self._slots.acquire(blocking=False):
            raise SourceError(TIMEOUT, f"{self.name}: every call slot is held by a stalled call")

        def slot_held(*a: Any) -> T:
            try:
                return fn(*a)
            finally:
                self._slots.release()

        try:
            return run_with_timeout(slot_held, args, wait, self.name)
        except FutureTimeout:
            raise SourceError(TIMEOUT, f"no answer from {self.name} within {wait:.2f} s") from None
        except RateLimited as e:
            self._back_off(e.retry_after_s)
            raise
        except SourceError:
            raise
        except Exception as e:
            err = self.classify(e)
            if isinstance(err, RateLimited):
                self._back_off(err.retry_after_s)
            raise err from e

    def _back_off(self, seconds: float | None) -> None:
        if seconds:
            self.backoff_until = max(self.backoff_until, self.clock() + min(seconds, self.limits.max_retry_after_s))

    def close(self) -> None:
        """Nothing to join: calls run on daemon threads that end with their socket timeout."""
