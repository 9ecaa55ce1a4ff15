"""Prometheus metrics of a running poll, served on ``/metrics`` (``poll --metrics-port``, the poll flow's
``metrics_port``, ``$MICROSTRUCTURE_METRICS_PORT``).

Every number comes from what a cycle already knows: its :class:`~microstructure.jobs.poll.PollStats` (running
totals, turned into increments here), the cycle's outcomes (who served each symbol, which calls failed), the
clock's skipped slots and the rows the online publisher last pushed. Nothing is read back from the lake.

The metrics live in a registry of their own, not prometheus_client's global one: Prefect registers its own
metrics there, and a poll under Prefect must serve only the poll's. docs/operations.md lists the families and
ships a Grafana dashboard built on them (docs/grafana/microstructure.json).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import prometheus_client
import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client import values as prometheus_values

# The depth classes and their thresholds are `microstructure coverage`'s: one definition for both.
from microstructure.lake.coverage import BUCKETS, _bucket, cycle_coverage
from microstructure.sources import guard

_IN_MEMORY = threading.Lock()


def _in_process(base: type) -> type:
    """``base`` with its values kept in this process's memory. Importing Feast sets ``PROMETHEUS_MULTIPROC_DIR``,
    which switches prometheus_client to values shared through files by metric name: two PollMetrics in one process
    (successive flow runs in one worker, or tests) would then share counts. Our metrics are one process's own."""

    class InProcess(base):
        def _metric_init(self) -> None:
            with _IN_MEMORY:
                chosen = prometheus_values.ValueClass
                prometheus_values.ValueClass = prometheus_values.MutexValue
                try:
                    super()._metric_init()
                finally:
                    prometheus_values.ValueClass = chosen

    InProcess.__name__ = base.__name__
    return InProcess


Counter = _in_process(prometheus_client.Counter)
Gauge = _in_process(prometheus_client.Gauge)
Histogram = _in_process(prometheus_client.Histogram)


if TYPE_CHECKING:
    import datetime as dt

    from microstructure.jobs.poll import PollStats
    from microstructure.sources.base import PollResult, Source

DEFAULT_HOST = "127.0.0.1"  # loopback unless asked: the endpoint has no authentication
PORT_ENV = "MICROSTRUCTURE_METRICS_PORT"
HOST_ENV = "MICROSTRUCTURE_METRICS_HOST"
# From a few simulated symbols (ms) to a whole-market vendor call (seconds); the live budget is the interval (2 s).
CYCLE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# The result a failed call leaves in an outcome's ``detail`` ("polygon: timeout; alpaca: ok").
ERROR_CLASSES = frozenset({*guard.WHOLE_SOURCE, *guard.SPLITTABLE, guard.UNKNOWN_SYMBOL, guard.NOT_CONFIGURED,
                           guard.INVALID_BOOK})
NO_SOURCE = "none"  # the source label of a symbol no source was even tried for (no group, empty chain)


class MetricsError(ValueError):
    """The endpoint cannot be served as asked (bad port, address in use): one line."""


class PollMetrics:
    """The poll's metric families, in a private registry, and how a cycle updates them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.cycle_seconds = Histogram(
            "microstructure_cycle_seconds", "Wall time of a poll cycle: poll, validate, write, publish online.",
            buckets=CYCLE_BUCKETS, registry=r)
        self.written = Counter("microstructure_snapshots_written_total",
                               "Snapshots acknowledged into the lake (new rows; duplicates not counted).", registry=r)
        self.quarantined = Counter("microstructure_quarantined_total", "Rows quarantined, by reason.", ["reason"],
                                   registry=r)
        self.source_errors = Counter(
            "microstructure_source_errors_total",
            "Failed source answers per symbol and cycle, by source and error class (a fallback that then served "
            "the symbol still counts the failure).", ["source", "error_class"], registry=r)
        self.skipped = Counter("microstructure_skipped_slots_total",
                               "Live cycle slots skipped because an earlier cycle overran.", registry=r)
        self.online_age = Gauge(
            "microstructure_online_age_seconds",
            "Age (now - event time) of the books served online, at the end of the latest cycle: youngest, "
            "median and oldest over the symbols pushed this session.", ["stat"], registry=r)
        self.coverage = Gauge("microstructure_coverage_symbols",
                              "Symbols in the latest cycle by served depth (l2, shallow, l1_only, none; as "
                              "`microstructure coverage`).", ["depth"], registry=r)
        for b in BUCKETS:
            self.coverage.labels(b)  # present (at 0) from the first scrape, so a dashboard has all four lines
        self.coverage_by_source = Gauge(
            "microstructure_coverage_symbols_by_source",
            "Symbols in the latest cycle by the source that served them and its depth (l2, shallow, l1_only); "
            "symbols no source served: source none, depth none.", ["source", "depth"], registry=r)
        self._sources: set[str] = set()  # sources seen this poll: zeroed in a cycle they serve nothing
        # PollStats keeps running totals; these are what was already counted.
        self._written = 0
        self._quarantined: Tally[str] = Tally()
        self._skipped = 0
        self._online_us: dict[str, int] = {}  # symbol -> event time (epoch µs) of the book it serves online
        self._pushed: pa.Table | None = None
        self._cycle_t0: float | None = None

    # ---- one cycle ----------------------------------------------------------------------------
    def observe(self, stats: PollStats, seconds: float | None, skipped_slots: int = 0,
                online: pa.Table | None = None, now: float | None = None) -> None:
        """Count one finished cycle. ``stats``: the poll's running totals (its ``last_outcomes`` this cycle's);
        ``skipped_slots``: the clock's running total; ``online``: the latest rows pushed online (symbol,
        event_ts), or None; ``now``: epoch seconds (default the wall clock)."""
        if seconds is not None:
            self.cycle_seconds.observe(seconds)
        self.written.inc(stats.written - self._written)
        self._written = stats.written
        for reason, n in (stats.quarantined - self._quarantined).items():
            self.quarantined.labels(reason).inc(n)
        self._quarantined = Tally(stats.quarantined)
        self.skipped.inc(max(skipped_slots - self._skipped, 0))
        self._skipped = max(skipped_slots, self._skipped)
        if stats.last_outcomes is not None:
            levels = stats.last_outcomes.column("book_levels").to_pylist()
            depth = Tally(_bucket(int(lv or 0)) for lv in levels)
            for b in BUCKETS:
                self.coverage.labels(b).set(depth[b])
            by_source = cycle_coverage(stats.last_outcomes)
            self._sources |= set(by_source)
            for src in self._sources:
                for b in BUCKETS:
                    self.coverage_by_source.labels(src, b).set(by_source.get(src, {}).get(b, 0))
            for (src, cls), n in failed_calls(stats.last_outcomes).items():
                self.source_errors.labels(src, cls).inc(n)
        if online is not None and online is not self._pushed and online.num_rows:
            self._pushed = online
            # The book's exact time as served (event_ts_us; event_ts for a table from before it existed).
            us = (online.column("event_ts_us").to_pylist() if "event_ts_us" in online.column_names else
                  pc.cast(online.column("event_ts").cast(pa.timestamp("us", tz="UTC")), pa.int64()).to_pylist())
            self._online_us.update((s, t) for s, t in zip(online.column("symbol").to_pylist(), us, strict=True)
                                   if t is not None)
        if self._online_us:
            now_us = int((time.time() if now is None else now) * 1_000_000)
            ages = sorted((now_us - t) / 1e6 for t in self._online_us.values())
            self.online_age.labels("min").set(ages[0])
            self.online_age.labels("median").set(ages[len(ages) // 2])
            self.online_age.labels("max").set(ages[-1])

    # ---- wiring into a poll -------------------------------------------------------------------
    def cycle_started(self) -> None:
        self._cycle_t0 = time.perf_counter()

    def timed(self, source: Source) -> Source:
        """``source`` with its ``poll`` timed: a cycle starts when the poller asks the source, and ends when the
        poller hands the cycle to ``on_cycle`` (so the clock's sleep between cycles is not counted)."""
        return _TimedSource(source, self)

    def on_cycle(self, then: Callable[[int, PollStats], None] | None, clock: Any = None,
                 publisher: Any = None) -> Callable[[int, PollStats], None]:
        """An ``on_cycle`` callback that counts the cycle, then calls ``then``. ``clock``: the poll's times (a
        LiveClock counts skipped slots); ``publisher``: the OnlinePublisher, or None."""

        def hook(i: int, stats: PollStats) -> None:
            t0, self._cycle_t0 = self._cycle_t0, None
            self.observe(stats, None if t0 is None else time.perf_counter() - t0,
                         skipped_slots=getattr(clock, "skipped", 0),
                         online=None if publisher is None else publisher.last_pushed)
            if then is not None:
                then(i, stats)

        return hook


class _TimedSource:
    """A source that notes when each poll starts (the start of a cycle) for :class:`PollMetrics`."""

    def __init__(self, source: Source, metrics: PollMetrics) -> None:
        self.name = source.name
        self._source = source
        self._metrics = metrics

    def poll(self, symbols: Sequence[str], at: dt.datetime) -> PollResult:
        self._metrics.cycle_started()
        return self._source.poll(symbols, at)


def failed_calls(outcomes: pa.Table) -> Tally[tuple[str, str]]:
    """(source, error class) -> failed answers in one cycle's outcomes.

    An outcome's ``detail`` lists every source tried for the symbol, in order ("polygon: timeout; alpaca: ok |
    why"): each one that did not answer ok counts, also when a later source served the symbol. A result that is
    not an error class (the simulated source writes the quarantine reason there) counts as the outcome's own
    ``error_class``; a failed symbol no source was tried for counts under source ``none``."""
    out: Tally[tuple[str, str]] = Tally()
    for detail, err in zip(outcomes.column("detail").to_pylist(), outcomes.column("error_class").to_pylist(),
                           strict=True):
        counted = False
        for part in (detail or "").split(" | ", 1)[0].split("; "):
            name, sep, result = part.partition(": ")
            cls = result.split(" ", 1)[0]
            if not sep or not name or cls == "ok":
                continue
            out[(name, cls if cls in ERROR_CLASSES else (err or "other"))] += 1
            counted = True
        if err is not None and not counted:
            out[(NO_SOURCE, err)] += 1
    return out


# ---- the endpoint -----------------------------------------------------------------------------
def serve(metrics: PollMetrics, port: int, host: str = DEFAULT_HOST) -> Callable[[], None]:
    """Serve ``metrics`` on ``http://host:port/metrics`` in a daemon thread; returns the function that stops it."""
    if not 0 < port < 65536:
        raise MetricsError(f"--metrics-port must be 1-65535, not {port}")
    try:
        server, thread = start_http_server(port, host, registry=metrics.registry)
    except OSError as e:
        raise MetricsError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


def endpoint_from_env() -> tuple[int | None, str]:
    """(port, host) from ``$MICROSTRUCTURE_METRICS_PORT`` / ``$MICROSTRUCTURE_METRICS_HOST``; no port: no endpoint."""
    raw = os.environ.get(PORT_ENV, "").strip()
    host = os.environ.get(HOST_ENV, "").strip() or DEFAULT_HOST
    if not raw:
        return None, host
    try:
        return int(raw), host
    except ValueError:
        raise MetricsError(f"{PORT_ENV} must be a port number, not {raw!r}") from None
