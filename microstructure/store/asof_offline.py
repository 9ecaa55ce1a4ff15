"""Feast's DuckDB offline store with a point-in-time join at ASOF speed.

Feast's stock DuckDB store (through ibis) joins every entity row to every feature row of its key inside the TTL
and then ranks them: the join fans out by TTL / cadence (150 rows per entity row at a 2 s cadence and a 5 min
TTL), so 1M entity rows cost ~40 s. DuckDB's ``ASOF LEFT JOIN`` finds the latest feature row at or before each
entity row directly. It is run narrow (``_gather_join``): only (key code, time, row number) go through the join,
and the feature columns are gathered by row number afterwards, in the entity frame's order, so nothing wide is
sorted; when a view's rows in the window exceed ``window_bytes`` the join is one SQL statement instead
(``asof_query``), which DuckDB can run out of core.

This store is a subclass of Feast's: only ``get_historical_features`` changes, and it keeps Feast's semantics:

* the latest row with ``timestamp <= entity time`` wins; ties on the timestamp go to the latest
  ``created_timestamp_column`` (Feast's order), so ties are deduplicated *before* the join;
* the TTL applies after the join (a match older than ``entity time - ttl`` gives nulls, as Feast does);
* field mapping, join-key mapping (``with_join_key_map``), projections (``name_alias``),
  ``full_feature_names`` and on-demand views behave as in Feast; rows come back in the entity frame's order;
* feature rows are read only in the entity rows' time window (latest entity time, earliest minus the TTL).

Paths, TTLs and times are bound parameters of the query (a source path may hold a quote); the SQL text names only
the feature repo's own views, fields and keys.

What it cannot express exactly (an entity frame given as SQL text, ``filter_by_created_timestamp``,
substrait on-demand views, non-Parquet sources) is handed to the stock store unchanged.
``tests/test_feast_offline.py`` proves the rows equal to the stock store's on adversarial data (both plans:
``tests/test_hostile_bounds.py``, with a quote in the source path).

Selected in ``feature_store.yaml``::

    offline_store:
        type: microstructure.store.asof_offline.AsofDuckDBOfflineStore
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from feast import FeatureView, FileSource
from feast.data_format import ParquetFormat
from feast.infra.offline_stores import offline_utils
from feast.infra.offline_stores.duckdb import DuckDBOfflineStore, DuckDBOfflineStoreConfig, _write_data_source
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.registry.base_registry import BaseRegistry
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.repo_config import RepoConfig
from feast.saved_dataset import SavedDatasetStorage

# Feature rows of one join held in memory for the narrow join (see _gather_join); beyond, one SQL statement that
# DuckDB can run out of core.
WINDOW_BYTES = 512 * 2**20


class AsofDuckDBOfflineStoreConfig(DuckDBOfflineStoreConfig):
    type: Literal["microstructure.store.asof_offline.AsofDuckDBOfflineStore"] = (
        "microstructure.store.asof_offline.AsofDuckDBOfflineStore")
    # DuckDB threads for the join (None: DuckDB's default, all cores).
    threads: int | None = None
    # Bytes of feature rows the narrow join may hold (WINDOW_BYTES); 0 always runs the one-statement join.
    window_bytes: int = WINDOW_BYTES


def _q(name: str) -> str:
    """A feature view's identifier (a name from the feature repo, never from data) quoted for SQL."""
    return '"' + name.replace('"', '""') + '"'


class AsofRetrievalJob(RetrievalJob):
    """Runs the ASOF query when asked for a frame or a table; Feast applies on-demand views on top."""

    def __init__(self, run: Any, odfvs: list[OnDemandFeatureView], full_feature_names: bool,
                 metadata: RetrievalMetadata, repo_path: str) -> None:
        super().__init__()
        self._run = run
        self._odfvs = odfvs
        self._full = full_feature_names
        self._metadata = metadata
        self._repo_path = repo_path

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        return self._run()

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        # Timestamps as Feast's pandas users get them (datetime64[ns, UTC]).
        return self._run().to_pandas(timestamp_as_object=False)

    @property
    def full_feature_names(self) -> bool:
        return self._full

    @property
    def on_demand_feature_views(self) -> list[OnDemandFeatureView]:
        return self._odfvs

    @property
    def metadata(self) -> RetrievalMetadata | None:
        return self._metadata

    def persist(self, storage: SavedDatasetStorage, allow_overwrite: bool = False,
                timeout: int | None = None) -> None:
        import ibis

        _write_data_source(ibis.memtable(self._run()), storage.to_data_source(), self._repo_path, "overwrite",
                           allow_overwrite)


def _supported(feature_views: list[FeatureView], entity_df: Any, filter_by_created_timestamp: bool,
               odfvs: list[OnDemandFeatureView]) -> bool:
    if not isinstance(entity_df, pd.DataFrame) or filter_by_created_timestamp:
        return False
    if any(o.mode == "substrait" for o in odfvs):
        return False
    for fv in feature_views:
        src = fv.batch_source
        if type(src) is not FileSource or not isinstance(src.file_format, ParquetFormat | None):
            return False
        if src.path.startswith(("s3://", "gs://", "az://", "abfs://")):
            return False
    return True


_local = threading.local()


def _connection(threads: int | None) -> duckdb.DuckDBPyConnection:
    # One in-memory connection per thread: a training join may be asked for from several threads. The thread
    # count is a connection setting, not SQL text.
    con = getattr(_local, "con", None)
    if con is None:
        con = _local.con = duckdb.connect(config={"threads": int(threads)} if threads else {})
    return con


# Our columns on the entity relation: the row's position in the entity frame and its time in ns since the epoch.
ROW, TS_NS = "__asof_row", "__asof_ts_ns"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _instant(us: int) -> dt.datetime | None:
    """Microseconds since the epoch as an aware datetime (a bound parameter); None beyond datetime's range."""
    try:
        return _EPOCH + dt.timedelta(microseconds=us)
    except OverflowError:
        return None


@dataclass
class _ViewPart:
    """One feature view's side of the join."""

    query: str  # its rows in the window, ties decided: the join keys, the features read and ``__ts_ns``
    params: dict[str, Any]  # the query's bound values (source path, window)
    keys: dict[str, str]  # join key as the source names it (after field mapping) -> entity column
    names: list[str]  # features read
    outs: list[str]  # their output column names
    ttl_ns: int  # 0: no TTL


def _view_part(i: int, fv: FeatureView, feature_refs: list[str], full_feature_names: bool, lo_ns: int | None,
               hi: dt.datetime | None) -> _ViewPart:
    src = fv.batch_source
    assert isinstance(src, FileSource)  # _supported let only Parquet file sources through
    prefix = fv.projection.name_to_use()
    names = [r.split(":", 1)[1] for r in feature_refs if r.startswith(f"{prefix}:")]
    base = fv.projection.name_alias or fv.name
    keys = fv.projection.join_key_map or {e.name: e.name for e in fv.entity_columns}
    mapping = src.field_mapping or {}
    # The source's columns under Feast's names (field mapping: source name -> feature name).
    renamed = ", ".join(f"{_q(old)} AS {_q(new)}" for old, new in mapping.items())
    cols = f"* RENAME ({renamed})" if renamed else "*"
    ts, created = src.timestamp_field, src.created_timestamp_column
    order = f"{_q(created)} DESC" if created else "1"
    key_cols = ", ".join(_q(k) for k in keys)
    feats = "".join(f", {_q(n)}" for n in names)
    ttl = fv.ttl
    ttl_ns = int(ttl / dt.timedelta(microseconds=1)) * 1000 if ttl else 0
    params: dict[str, Any] = {f"src{i}": src.path}
    window = []
    if hi is not None:
        params["hi"] = hi
        window.append(f"{_q(ts)}::TIMESTAMPTZ <= $hi")
    lo = _instant(lo_ns // 1000 - ttl_ns // 1000) if ttl_ns and lo_ns is not None else None
    if lo is not None:
        params[f"lo{i}"] = lo
        window.append(f"{_q(ts)}::TIMESTAMPTZ >= $lo{i}")
    where = f"WHERE {' AND '.join(window)} " if window else ""
    query = (f"SELECT {key_cols}{feats}, epoch_ns({_q(ts)}::TIMESTAMPTZ) AS __ts_ns "
             f"FROM (SELECT {cols} FROM read_parquet($src{i})) {where}"
             # Ties on the timestamp: the latest created row wins (Feast's order), decided before the join.
             f"QUALIFY row_number() OVER (PARTITION BY {key_cols}, {_q(ts)} ORDER BY {order}) = 1")
    outs = [f"{base}__{n}" if full_feature_names else n for n in names]
    return _ViewPart(query, params, dict(keys), names, outs, ttl_ns)


def _parts(feature_views: list[FeatureView], feature_refs: list[str], full_feature_names: bool,
           lo_ns: int | None, hi_ns: int | None) -> list[_ViewPart]:
    """Every view's part. ``lo_ns``/``hi_ns`` (the entity rows' earliest and latest time) bound the feature rows
    read: none later than the latest entity row can match, and for a view with a TTL none older than the earliest
    row minus the TTL (Feast's stock store reads the same window). None: no entity row has a time, no window."""
    # Ceiling to the microsecond: never cuts off a row the join could use.
    hi = _instant(-(-hi_ns // 1000)) if hi_ns is not None else None
    return [_view_part(i, fv, feature_refs, full_feature_names, lo_ns, hi) for i, fv in enumerate(feature_views)]


def asof_query(feature_views: list[FeatureView], feature_refs: list[str], entity: str, full_feature_names: bool,
               lo_ns: int | None, hi_ns: int | None) -> tuple[str, dict[str, Any]]:
    """The point-in-time join of relation ``entity`` (the entity frame with ``ROW`` and ``TS_NS``) to every
    feature view in one statement, and its parameters: paths, TTLs and time bounds are bound, never spelled into
    the text; the only names in it are the feature repo's (views, fields, join keys) and ours. Rows come back in
    no particular order, with ``ROW``. DuckDB runs it out of core when the feature rows do not fit in memory."""
    params: dict[str, Any] = {}
    ctes, joins, select = [], [], [f"e.* EXCLUDE ({TS_NS})"]
    for i, part in enumerate(_parts(feature_views, feature_refs, full_feature_names, lo_ns, hi_ns)):
        params.update(part.params)
        ctes.append(f"f{i} AS ({part.query})")
        on = " AND ".join([f"e.{_q(v)} = f{i}.{_q(k)}" for k, v in part.keys.items()]
                          + [f"e.{TS_NS} >= f{i}.__ts_ns"])
        joins.append(f"ASOF LEFT JOIN f{i} ON {on}")
        if part.ttl_ns:
            params[f"ttl{i}"] = part.ttl_ns
        for n, out in zip(part.names, part.outs, strict=True):
            if part.ttl_ns:  # Feast: a match older than the TTL is no match
                select.append(f"CASE WHEN e.{TS_NS} - f{i}.__ts_ns <= $ttl{i} THEN f{i}.{_q(n)} END AS {_q(out)}")
            else:
                select.append(f"f{i}.{_q(n)} AS {_q(out)}")
    return f"WITH {', '.join(ctes)} SELECT {', '.join(select)} FROM {entity} e {' '.join(joins)}", params


def _sql_join(con: duckdb.DuckDBPyConnection, feature_views: list[FeatureView], feature_refs: list[str],
              entity: pa.Table, full_feature_names: bool, lo_ns: int | None, hi_ns: int | None) -> pa.Table:
    name = f"entity_{uuid.uuid4().hex}"
    con.register(name, entity)
    try:
        sql, params = asof_query(feature_views, feature_refs, name, full_feature_names, lo_ns, hi_ns)
        return con.sql(f"{sql} ORDER BY e.{ROW}", params=params).to_arrow_table().drop_columns([ROW])
    finally:
        con.unregister(name)


def _read_bounded(con: duckdb.DuckDBPyConnection, query: str, params: dict[str, Any],
                  max_bytes: int) -> pa.Table | None:
    """The query's rows as one Arrow table, or None once they pass ``max_bytes``."""
    reader = con.sql(query, params=params).to_arrow_reader(256 * 1024)
    batches, size = [], 0
    try:
        for batch in reader:
            size += batch.nbytes
            if size > max_bytes:
                return None
            batches.append(batch)
        return pa.Table.from_batches(batches, reader.schema)
    finally:
        reader.close()


def _gather_join(con: duckdb.DuckDBPyConnection, feature_views: list[FeatureView], feature_refs: list[str],
                 entity: pa.Table, ts_ns: pa.ChunkedArray, full_feature_names: bool, lo_ns: int | None,
                 hi_ns: int | None, max_bytes: int) -> pa.Table | None:
    """The same join, narrow: each view's rows in the window are read once into Arrow and numbered; the ASOF join
    pairs each entity row (key as a small integer, time) with the number of its feature row; the feature columns
    are then gathered by those numbers in the entity's order. The wide rows are never sorted, and the entity
    columns never enter DuckDB. None when a view has several join keys, its key types differ from the entity's,
    or its rows in the window pass ``max_bytes`` (then :func:`_sql_join`)."""
    out = entity
    budget = max_bytes
    for part in _parts(feature_views, feature_refs, full_feature_names, lo_ns, hi_ns):
        if len(part.keys) != 1:
            return None
        (key, column), = part.keys.items()
        rows = _read_bounded(con, part.query, part.params, budget)
        if rows is None:
            return None
        budget -= rows.nbytes
        values = pc.drop_null(pc.unique(rows[key]))  # a null key matches nothing, as in SQL
        try:
            entity_key = entity[column].cast(rows[key].type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return None
        # Keys as positions in one list of the view's keys: the join compares integers, not strings.
        left = pa.table({"k": pc.index_in(entity_key, value_set=values, skip_nulls=True), "t": ts_ns,
                         "r": pa.array(np.arange(entity.num_rows, dtype=np.int64))})
        right = pa.table({"k": pc.index_in(rows[key], value_set=values, skip_nulls=True), "t": rows["__ts_ns"],
                          "i": pa.array(np.arange(rows.num_rows, dtype=np.int64))})
        ln, rn = f"l_{uuid.uuid4().hex}", f"r_{uuid.uuid4().hex}"
        con.register(ln, left)
        con.register(rn, right)
        try:
            # Feast: a match older than the TTL is no match.
            match = "CASE WHEN l.t - r.t <= $ttl THEN r.i END" if part.ttl_ns else "r.i"
            pairs = con.sql(f"SELECT l.r, {match} AS i FROM {ln} l ASOF LEFT JOIN {rn} r "
                            "ON l.k = r.k AND l.t >= r.t",
                            params={"ttl": part.ttl_ns} if part.ttl_ns else None).to_arrow_table()
        finally:
            con.unregister(ln)
            con.unregister(rn)
        order = np.empty(pairs.num_rows, dtype=np.int64)
        order[pairs["r"].to_numpy()] = np.arange(pairs.num_rows, dtype=np.int64)
        index = pairs["i"].take(order)
        for n, o in zip(part.names, part.outs, strict=True):
            out = out.append_column(o, rows[n].take(index))
    return out


class AsofDuckDBOfflineStore(DuckDBOfflineStore):
    @staticmethod
    def get_historical_features(config: RepoConfig, feature_views: list[FeatureView], feature_refs: list[str],
                                entity_df: pd.DataFrame | str, registry: BaseRegistry, project: str,
                                full_feature_names: bool = False,
                                filter_by_created_timestamp: bool = False) -> RetrievalJob:
        odfvs = OnDemandFeatureView.get_requested_odfvs(feature_refs, project, registry)
        if not _supported(feature_views, entity_df, filter_by_created_timestamp, odfvs):
            return DuckDBOfflineStore.get_historical_features(
                config, feature_views, feature_refs, entity_df, registry, project, full_feature_names,
                filter_by_created_timestamp)
        assert isinstance(entity_df, pd.DataFrame)
        ts_col = offline_utils.infer_event_timestamp_from_entity_df(dict(zip(entity_df.columns, entity_df.dtypes,
                                                                             strict=True)))
        if ROW in entity_df.columns or TS_NS in entity_df.columns:
            raise ValueError(f"entity columns {ROW!r} and {TS_NS!r} are reserved by {__name__}")
        ts = entity_df[ts_col].infer_objects()
        converted = not pd.api.types.is_datetime64_any_dtype(ts)
        if converted:  # times as text: parsed once, here, as the stock store does
            ts = pd.to_datetime(ts, utc=True)
        columns = list(entity_df.columns)
        threads = getattr(config.offline_store, "threads", None)
        window_bytes = getattr(config.offline_store, "window_bytes", WINDOW_BYTES)

        def run() -> pa.Table:
            # The caller's frame is only read: no copy of it (Feast has made one already).
            table = pa.Table.from_pandas(entity_df, preserve_index=False)
            if converted:
                table = table.set_column(columns.index(ts_col), ts_col, pa.array(ts))
            # Nanoseconds since the epoch: the comparison is exact whatever the entity frame's precision.
            ts_ns = pc.cast(table[ts_col], pa.timestamp("ns", tz="UTC")).cast(pa.int64())
            bounds = pc.min_max(ts_ns)
            lo_ns, hi_ns = bounds["min"].as_py(), bounds["max"].as_py()  # None: no rows with a time
            con = _connection(threads)
            out = _gather_join(con, feature_views, feature_refs, table, ts_ns, full_feature_names, lo_ns, hi_ns,
                               window_bytes)
            if out is None:
                table = table.append_column(ROW, pa.array(np.arange(len(table), dtype=np.int64))) \
                             .append_column(TS_NS, ts_ns)
                out = _sql_join(con, feature_views, feature_refs, table, full_feature_names, lo_ns, hi_ns)
            return out

        lo, hi = ts.min(), ts.max()
        metadata = RetrievalMetadata(features=feature_refs, keys=list(set(columns) - {ts_col}),
                                     min_event_timestamp=lo.to_pydatetime() if pd.notna(lo) else None,
                                     max_event_timestamp=hi.to_pydatetime() if pd.notna(hi) else None)
        return AsofRetrievalJob(run, [o for o in odfvs if o.mode != "substrait"], full_feature_names, metadata,
                                str(config.repo_path))
