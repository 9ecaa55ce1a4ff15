"""The online publisher: each cycle's fresh books computed against their trailing window and pushed to Feast.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from microstructure.contract.book import SNAPSHOT_SCHEMA
from microstructure.contract.schemas import FEATURES_SCHEMA, GAP_WINDOW, HALT_WINDOW, to_arrow
from microstructure.features.compute import compute_features
from microstructure.lake.paths import FEATURES_QUARANTINE, LakePaths
from microstructure.lake.writer import PartitionWriter

if TYPE_CHECKING:
    from microstructure.checks.ge import Checker
    from microstructure.checks.sql import SqlChecker
from microstructure.jobs.build import FEATURES_QUARANTINE_SCHEMA


# ---- online path ------------------------------------------------------------------------------
def latest_per_symbol(features: pa.Table, con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """The newest row per symbol: what the online store should hold after a batch."""
    con = con or duckdb.connect()
    con.register("latest_f", features)
    try:
        return to_arrow(con.sql("SELECT * FROM latest_f QUALIFY row_number() OVER (PARTITION BY symbol ORDER BY "
                                "received_ts DESC, event_ts DESC) = 1 ORDER BY symbol")).cast(FEATURES_SCHEMA)
    finally:
        con.unregister("latest_f")


class OnlinePublisher:
    """Computes features for each polled cycle with the pipeline's SQL and pushes them to Feast.

    It keeps a trailing buffer of snapshots so the windowed features (gap over 5 min, halt over 30 min)
    see the same history the offline build sees. Rows that cannot affect a later window are pruned
    (``_prune``): only halted rows matter to the 30-minute halt flag, and only undominated mids to the
    5-minute range.
    Rows that fail a row-level feature check are quarantined and not pushed; the cycle's other rows are. A
    batch-level failure holds the whole cycle.
    """

    MARGIN = dt.timedelta(seconds=60)  # slack for books that reach us a little late

    def __init__(self, paths: LakePaths, store: Any, checker: Checker | SqlChecker | None) -> None:
        self.paths = paths
        self.store = store
        self.checker = checker
        self.con = duckdb.connect()
        self.buffer = SNAPSHOT_SCHEMA.empty_table()
        self.pending: list[pa.Table] = []
        self.quarantine = PartitionWriter(paths, FEATURES_QUARANTINE, ("symbol", "event_ts"),
                                               FEATURES_QUARANTINE_SCHEMA)
        self.pushed = 0
        self.rejected: Counter[str] = Counter()
        self.last_pushed: pa.Table | None = None

    def add_cycle(self, written: pa.Table) -> pa.Table:
        """Add a cycle's acknowledged snapshots; return its feature rows (also queued for the next flush)."""
        if written.num_rows == 0:
            return FEATURES_SCHEMA.empty_table()
        self.buffer = pa.concat_tables([self.buffer, written.cast(SNAPSHOT_SCHEMA)]).combine_chunks()
        feats = compute_features(self.buffer, self.con, only=written)
        self.pending.append(feats)
        self.buffer = self._prune(self.buffer, pc.min(written.column("event_ts")).as_py() - self.MARGIN)
        return feats

    @staticmethod
    def _prune(buffer: pa.Table, settled: dt.datetime) -> pa.Table:
        """Drop the rows no later cycle's features can depend on.

        Later rows arrive no earlier than ``settled`` (the cycle's oldest book less the late margin). Their
        5-minute mid range needs the rows of the last 5 minutes, but only those no settled later row dominates:
        a row with a higher (or equal) mid after it never sets a window's max, one with a lower (or equal) mid
        after it never sets the min, since every trailing window that holds the row holds the later one too.
        Their 30-minute halt flag needs only halted rows. Everything else goes: the buffer stays small (a few
        rows per symbol beyond the margin) and the SQL stays the one definition, run on what matters."""
        ts = buffer.column("event_ts").to_numpy(zero_copy_only=False).astype("datetime64[us]").astype(np.int64)
        settled_us = int(settled.timestamp() * 1_000_000)
        gap_us = int(GAP_WINDOW.total_seconds() * 1_000_000)
        halt_us = int(HALT_WINDOW.total_seconds() * 1_000_000)
        halted = pc.fill_null(buffer.column("halted"), False).to_numpy(zero_copy_only=False)
        mid = pc.divide(pc.add(buffer.column("bid_px_1"), buffer.column("ask_px_1")), 2.0)
        mid = pc.fill_null(mid, np.nan).to_numpy(zero_copy_only=False)
        sym = buffer.column("symbol").to_numpy(zero_copy_only=False)
        keep = ts >= settled_us  # still open to late arrivals: kept whole
        keep |= halted & (ts >= settled_us - halt_us)
        frozen = np.flatnonzero((ts < settled_us) & (ts >= settled_us - gap_us) & ~np.isnan(mid))
        if len(frozen):
            df = pd.DataFrame({"s": sym[frozen], "t": ts[frozen], "m": mid[frozen], "i": frozen})
            df = df.sort_values(["s", "t"], kind="stable").iloc[::-1]  # newest first within each symbol
            g = df.groupby("s", sort=False)["m"]
            later_max = g.cummax().groupby(df["s"], sort=False).shift(1)
            later_min = g.cummin().groupby(df["s"], sort=False).shift(1)
            m = df["m"]
            needed = ~((later_max >= m) & (later_min <= m))  # NaN (no later row) compares False: kept
            keep[df["i"].to_numpy()[needed.to_numpy()]] = True
        return buffer.filter(pa.array(keep))

    def flush(self) -> None:
        if not self.pending:
            return
        batch = pa.concat_tables(self.pending)
        self.pending = []
        if batch.num_rows == 0:
            return
        if self.checker is not None:
            # SqlChecker: row-level failures quarantine their rows only (the cycle's good books are still
            # served), a batch-level failure the whole batch. GE's Checker judges the batch as a whole.
            _, batch, bad = self.checker.split("features", batch)
            if bad.num_rows:
                self.rejected.update(bad.column("reason").to_pylist())
                self.quarantine.write(bad)
            if batch.num_rows == 0:
                return
        latest = latest_per_symbol(batch, self.con)
        if self.store is not None:
            from microstructure.store.repo import push_online

            self.pushed += push_online(self.store, latest)
        self.last_pushed = latest
