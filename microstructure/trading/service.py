"""MicrostructureService: "what does the book look like, and can I trade this?" for callers.

Reads the Feast online store. When a symbol's online row is older than the freshness limit it polls the
configured source once, computes the features with the pipeline's own SQL (against the lake's recent
history, so the windows are right), writes the snapshot to the lake and pushes the features online.
A small thread-safe TTL cache sits in front.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from microstructure.contract.book import SNAPSHOT_SCHEMA
from microstructure.contract.schemas import GAP_WINDOW, HALT_WINDOW
from microstructure.features.compute import compute_features
from microstructure.jobs.ingest import Ingestor
from microstructure.lake.paths import LakePaths, data_dir_default
from microstructure.lake.views import read_snapshots
from microstructure.trading.filters import apply_filters
from microstructure.trading.thresholds import Thresholds, ThresholdSet, load_threshold_set, normalise_mode

if TYPE_CHECKING:
    from feast import FeatureStore

    from microstructure.sources.base import Source


def calculate_imbalance(bids: Sequence[tuple[float, float]], asks: Sequence[tuple[float, float]]) -> float:
    """(Σ bid sizes − Σ ask sizes) / (Σ bid sizes + Σ ask sizes), in [−1, +1].

    Takes ``[(price, size), ...]`` per side. Both sides empty, or all sizes zero, gives 0.0. A negative or
    NaN size raises ValueError naming the level.
    """
    totals = []
    for side, levels in (("bid", bids), ("ask", asks)):
        s = 0.0
        for i, level in enumerate(levels, start=1):
            try:
                _, size = level
                size = float(size)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{side} level {i}: expected (price, size), got {level!r}") from e
            if math.isnan(size) or size < 0 or math.isinf(size):
                raise ValueError(f"{side} level {i}: size must be a finite number >= 0, got {size!r}")
            s += size
        totals.append(s)
    b, a = totals
    return 0.0 if b + a == 0 else (b - a) / (b + a)


class MicrostructureService:
    def __init__(self, data_dir: Path | str | None = None, thresholds: Thresholds | ThresholdSet | None = None,
                 source: Source | None = None, cache_ttl_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic, refresh: bool = True,
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else data_dir_default()
        self.paths = LakePaths(self.data_dir.resolve())
        self.thresholds = thresholds or load_threshold_set(self.data_dir / "microstructure.toml")
        if cache_ttl_s is not None:
            import dataclasses

            t = self.thresholds
            if isinstance(t, ThresholdSet):
                default = dataclasses.replace(t.default, cache_ttl_s=cache_ttl_s)
                self.thresholds = dataclasses.replace(t, default=default)
            else:
                self.thresholds = dataclasses.replace(t, cache_ttl_s=cache_ttl_s)
        self._source = source
        # A symbol with no fresh online book is polled once from the source (written to the lake and pushed
        # online) when ``refresh``; without it the service only reads, as `microstructure picks` does unless asked.
        self.refresh = refresh
        self._clock = clock
        self._now = now
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self._store: FeatureStore | None = None

    # ---- plumbing --------------------------------------------------------------------------
    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            from microstructure.store.repo import open_store

            self._store = open_store(self.paths.data_dir)
        return self._store

    @property
    def source(self) -> Source:
        if self._source is None:
            from microstructure.jobs.market import simulated_source

            self._source = simulated_source(self.paths, None, fresh=False)
        return self._source

    def cache_stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache)}

    # ---- public API ------------------------------------------------------------------------
    def get_order_book_features(self, symbol: str) -> dict[str, Any]:
        """Features for ``symbol`` with ``event_ts``, ``age_s`` and ``stale``; ``found: False`` if none exist."""
        t = self._clock()
        with self._lock:
            hit = self._cache.get(symbol)
            if hit and hit[0] > t:
                self.hits += 1
                return dict(hit[1])
            self.misses += 1
        row = self._read(symbol)
        if self.refresh and (not row["found"] or row["stale"]):
            refreshed = self._refresh(symbol)
            # A bad stored row keeps its own reason unless the refresh brought a good one.
            if refreshed is not None and (refreshed.get("found") or not row.get("error")):
                row = refreshed
        with self._lock:
            self._cache[symbol] = (self._clock() + self.thresholds.cache_ttl_s, row)
        return dict(row)

    calculate_imbalance = staticmethod(calculate_imbalance)

    def is_tradeable(self, symbol: str, mode: str = "SAFE") -> dict[str, Any]:
        """``{'tradeable': bool, 'reason': str, ...}``; data problems never raise, they are reasons."""
        mode = normalise_mode(mode)
        try:
            f = self.get_order_book_features(symbol)
        except Exception as e:  # a data or store problem is an answer, not a crash for the caller
            return {"symbol": symbol, "mode": mode, "tradeable": False, "filter": "error",
                    "reason": f"could not read features: {type(e).__name__}: {e}"}
        base = {"symbol": symbol, "mode": mode, "age_s": f.get("age_s"), "spread_bps": f.get("spread_bps"),
                "depth_dollars": f.get("depth_dollars"), "book_levels": f.get("book_levels")}
        if not f["found"]:
            why = f.get("error") or "no order-book data for this symbol"
            return {**base, "tradeable": False, "filter": "no_data", "reason": why}
        if f["stale"]:
            age = "of unknown age" if f.get("age_s") is None else f"{f['age_s']:.0f} s old"
            return {**base, "tradeable": False, "filter": "stale",
                    "reason": f"order-book data is stale ({age}, limit {self.thresholds.freshness_s:g} s)"}
        v = apply_filters(f, mode, self.thresholds)
        return {**base, "tradeable": v.kept, "filter": v.filter, "reason": v.reason}

    # ---- online read and one-shot refresh --------------------------------------------------
    def _read(self, symbol: str) -> dict[str, Any]:
        from microstructure.store.lookup import read_online

        r = read_online(self.store, [symbol], self.thresholds.freshness_s, now=self._now())[0]
        return r.as_dict()

    def _refresh(self, symbol: str) -> dict[str, Any] | None:
        """Poll the source once for ``symbol``; write, compute with the pipeline SQL, push. None on failure."""
        from microstructure.jobs.market import save_simulated
        from microstructure.lake import datadir
        from microstructure.store.repo import push_online

        with self._refresh_lock, datadir.try_writer(self.paths.data_dir) as mine:
            if not mine:  # a poller or build holds the data dir (one writer): its rows are the fresh ones
                return None
            at = self._now()
            try:
                res = self.source.poll([symbol], at)
            except Exception as e:
                return {"symbol": symbol, "found": False, "stale": True, "error": f"source failed: {e}"}
            got = Ingestor(self.paths).ingest(res.raw, res.rejected)
            clean = got.clean
            if clean.num_rows == 0:
                reasons = got.quarantined.column("reason").to_pylist()
                if "unknown_symbol" in reasons:
                    return {"symbol": symbol, "found": False, "stale": True, "error": f"unknown symbol {symbol!r}"}
                return None if not reasons else {"symbol": symbol, "found": False, "stale": True,
                                                  "error": f"source answer rejected: {', '.join(reasons)}"}
            save_simulated(self.paths.data_dir, self.source)
            history = read_snapshots(self.paths, at - HALT_WINDOW - GAP_WINDOW, at, [symbol])
            # The lake already holds the rows just ingested: take them from there once, not twice.
            fresh = pa.array(clean.column("event_ts").to_pylist(), history.schema.field("event_ts").type)
            history = history.filter(pc.invert(pc.is_in(history.column("event_ts"), value_set=fresh)))
            feats = compute_features(pa.concat_tables([history, clean]).cast(SNAPSHOT_SCHEMA), only=clean)
            push_online(self.store, feats)
        return self._read(symbol)
