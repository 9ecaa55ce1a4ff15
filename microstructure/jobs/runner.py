"""Running a poll end to end, as the CLI and the Prefect flows both do: pick the source, the clock, the online
publisher and the market's persistence, then ``poll``. Neither front end owns this logic."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microstructure.jobs.market import MarketConflict, save_simulated, simulated_source
from microstructure.jobs.poll import COMPACT_EVERY, LiveClock, PollStats, cycle_times, poll_cycles
from microstructure.jobs.publisher import OnlinePublisher
from microstructure.lake.paths import LakePaths, with_retry
from microstructure.lake.views import connect

if TYPE_CHECKING:
    from microstructure.jobs.metrics import PollMetrics


class PollError(ValueError):
    """A poll cannot start as asked (bad option, missing key, another market in the data dir): one line."""


def run_poll(data_dir: Path, cycles: int | None, interval: float, step: float | None, symbols: int,
         seed: int | None, fresh: bool, online: bool, ack_log: Path | None = None,
         start: dt.datetime | None = None, source_kind: str = "simulated", symbol_list: list[str] | None = None,
         sources_config: Path | None = None, until: dt.datetime | None = None,
         on_cycle: Callable[[int, PollStats], None] | None = None, metrics_port: int | None = None,
         metrics_host: str | None = None, log_format: str | None = None) -> PollStats:
    """Poll into the lake: live on the wall clock when ``interval > 0``, else a replay on a simulated clock.

    Live: ``cycles`` and/or ``until`` end the poll (the first reached). A replay needs ``cycles``.
    ``metrics_port``: serve the poll's Prometheus metrics on ``http://metrics_host:port/metrics`` from before the
    stores load until the poll ends (``jobs.metrics``; the host defaults to loopback).
    ``log_format``: ``text`` (a summary line a minute) or ``json`` (a line per cycle and per warning) on stderr
    (``jobs.logs``); None: no log lines.
    """
    args = (data_dir, cycles, interval, step, symbols, seed, fresh, online)
    kw: dict[str, Any] = {"ack_log": ack_log, "start": start, "source_kind": source_kind, "symbol_list": symbol_list,
                          "sources_config": sources_config, "until": until, "on_cycle": on_cycle,
                          "log_format": log_format}
    if metrics_port is None:
        return _run_poll(*args, **kw)
    from microstructure.jobs.metrics import DEFAULT_HOST, MetricsError, PollMetrics, serve

    metrics = PollMetrics()
    try:
        # Bound first: a port in use is one error line before anything loads, and a scraper sees the poll start.
        stop = serve(metrics, metrics_port, metrics_host or DEFAULT_HOST)
    except MetricsError as e:
        raise PollError(str(e)) from None
    try:
        return _run_poll(*args, **kw, metrics=metrics)
    finally:
        stop()  # the port is free again when the poll returns (a Prefect retry binds it anew)


def _run_poll(data_dir: Path, cycles: int | None, interval: float, step: float | None, symbols: int,
              seed: int | None, fresh: bool, online: bool, ack_log: Path | None = None,
              start: dt.datetime | None = None, source_kind: str = "simulated", symbol_list: list[str] | None = None,
              sources_config: Path | None = None, until: dt.datetime | None = None,
              on_cycle: Callable[[int, PollStats], None] | None = None, metrics: PollMetrics | None = None,
              log_format: str | None = None) -> PollStats:
    paths = LakePaths(data_dir)
    live = interval > 0
    step_s = interval if live else (step or 2.0)
    if cycles is not None and cycles < 1:
        raise PollError("--cycles must be at least 1")
    if log_format not in (None, "text", "json"):
        raise PollError(f"the log format must be text or json, not {log_format!r}")
    if cycles is None and until is None:
        raise PollError("give --cycles, --until or --session: the poll needs an end")
    if not live and cycles is None:
        raise PollError("a replay (--interval 0) needs --cycles")
    if source_kind == "simulated":
        from microstructure.sources.simulated import universe

        if symbols < 1:
            raise PollError("--symbols must be at least 1")
        syms = symbol_list or universe()[:symbols]
        try:
            source = simulated_source(paths, seed, fresh)
        except MarketConflict as e:
            raise PollError(str(e)) from None
        source.live = live
    else:
        source, syms = vendor_source(source_kind, symbol_list, sources_config, paths.data_dir)
    times: Any
    if live:
        times = LiveClock(step_s, cycles, until)
    else:
        assert cycles is not None
        end_at_now = start is None
        if start is None:
            now = dt.datetime.now(dt.UTC).replace(microsecond=0)
            # A replay ends at about now, so its last cycle is what the online store should hold; a saved
            # market continues from where it stopped, never earlier, and never past now.
            start = now - dt.timedelta(seconds=step_s * (cycles - 1))
            saved_now = getattr(source, "now", None)  # a saved simulated market's clock
            if saved_now is not None:
                start = max(start, dt.datetime.fromtimestamp(saved_now, dt.UTC) + dt.timedelta(seconds=step_s))
                cycles = min(cycles, int((now - start).total_seconds() // step_s) + 1)
        times = cycle_times(start, step_s, max(cycles, 0), 0, end_at_now)
    publisher = None
    if online:
        from microstructure.checks.sql import SqlChecker
        from microstructure.store.repo import open_store

        # The GE suites compiled to one DuckDB query (same verdicts as GE, 3.7 ms a cycle instead of ~0.2 s).
        publisher = OnlinePublisher(paths, open_store(paths.data_dir), SqlChecker())
    # Live: check and push every cycle. Replay: the same per-cycle features, checked and pushed in
    # batches of 30 cycles (one Feast push per batch; see docs/features.md, "The online buffer").
    every = 1 if live else 30
    saver = None
    if source_kind == "simulated":
        # The market's state is saved with every acknowledged cycle: a killed poller resumes this market.
        def saver() -> None:
            save_simulated(paths.data_dir, source)
    polled: Any = source
    if metrics is not None:  # timed polls and a counting on_cycle: the cycle feeds /metrics
        polled = metrics.timed(source)
        on_cycle = metrics.on_cycle(on_cycle, clock=times, publisher=publisher)
    logs = ExitStack()
    if log_format is not None:  # logged first: a line per cycle even if a later callback fails
        from microstructure.jobs.logs import CycleLog, poll_logger

        on_cycle = CycleLog(logs.enter_context(poll_logger(log_format)), log_format, clock=times).wrap(on_cycle)
    try:
        stats = poll_cycles(paths, polled, syms, times, publisher=publisher, publish_every=every,
                              on_cycle=on_cycle, ack_log=ack_log, after_ack=saver,
                              compact_every=COMPACT_EVERY)
    except Exception as e:
        from microstructure.sources.vendor import ConfigError

        if isinstance(e, ConfigError):
            raise PollError(str(e)) from None
        raise
    finally:
        logs.close()
        if hasattr(source, "close"):
            source.close()
    return stats


def vendor_source(kind: str, symbol_list: list[str] | None, sources_config: Path | None,
                   data_dir: Path) -> tuple[Any, list[str]]:
    """A fallback chain from the sources file (``chain``) or one vendor's part of it (polygon, alpaca,
    databento, ccxt)."""
    from microstructure.sources.chain_config import build_chain
    from microstructure.sources.vendor import ConfigError

    if kind == "polygon-market":
        from microstructure.sources.guard import Limits
        from microstructure.sources.polygon import WholeMarketSource

        try:
            # ~10,000 tickers (several MB) in one answer: a longer timeout than a per-group call's.
            return WholeMarketSource(limits=Limits(timeout_s=5.0)), []
        except ConfigError as e:
            raise PollError(str(e)) from None
    if kind not in ("chain", "polygon", "alpaca", "databento", "ccxt"):
        raise PollError(f"--source must be simulated, polygon, alpaca, databento, ccxt, chain or polygon-market, "
                        f"not {kind!r}")
    cfg = sources_config or (data_dir / "sources.toml")
    try:
        chain = build_chain(cfg if cfg.exists() or sources_config else None, symbol_list,
                            only=None if kind == "chain" else kind)
    except ConfigError as e:
        raise PollError(str(e)) from None
    syms = list(dict.fromkeys([*(symbol_list or []), *chain.symbols]))
    if not syms:
        chain.close()
        raise PollError("no symbols: pass --symbol/--symbols-file or list them in the sources file")
    return chain, syms


def online_sample(data_dir: Path, symbols: list[str], k: int = 5) -> dict[str, Any]:
    """What a run's summary shows after the offline steps: features per symbol and a few online rows."""
    from microstructure.store.lookup import read_online
    from microstructure.store.repo import open_store

    paths = LakePaths(data_dir)
    per_symbol = with_retry(lambda: connect(paths).sql(
        "SELECT count(*) / greatest(count(DISTINCT symbol), 1) FROM features").fetchall()[0][0])
    pick = symbols[:: max(1, len(symbols) // k)][:k]
    sample = [r.as_dict() for r in read_online(open_store(data_dir), pick)] if pick else []
    return {"features_per_symbol": round(float(per_symbol or 0), 1), "online_sample": sample,
            "data_docs": str(data_dir / "gx" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html")}
