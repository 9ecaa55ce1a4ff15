"""Feast's DuckDB offline store with a point-in-time join at ASOF speed.

Feast's stock DuckDB store (through ibis) joins every entity row to every feature row of its key inside the TTL
and then ranks them: the join fans out by TTL / cadence (150 rows per entity row at a 2 s cadence and a 5 min
TTL), so 1M entity rows cost ~40 s. DuckDB's ``ASOF LEFT JOIN`` finds the latest feature row at or before each
entity row directly. This store is a subclass of Feast's: only ``get_historical_features`` changes, and it keeps
Feast's semantics:

* the latest row with ``timestamp <= entity time`` wins; ties on the timestamp go to the latest
  ``created_timestamp_column`` (Feast's order), so ties are deduplicated *before* the join;
* the TTL applies after the join (a match older than ``entity time - ttl`` gives nulls, as Feast does);
* field mapping, join-key mapping (``with_join_key_map``), projections (``name_alias``),
  ``full_feature_names`` and on-demand views behave as in Feast; rows come back in the entity frame's order.

What it cannot express exactly (an entity frame given as SQL text, ``filter_by_created_timestamp``,
substrait on-demand views, non-Parquet sources) is handed to the stock store unchanged.
``tests/test_feast_offline.py`` proves the rows equal to the stock store's on adversarial data.

Selected in ``feature_store.yaml``::

    offline_store:
        type: microstructure.feast_offline.AsofDuckDBOfflineStore
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from typing import Any, Literal

import duckdb
import pandas as pd
import pyarrow as pa
from feast import FeatureView, FileSource
from feast.data_format import ParquetFormat
from feast.infra.offline_stores import offline_utils
from feast.infra.offline_stores.duckdb import DuckDBOfflineStore, DuckDBOfflineStoreConfig, _write_data_source
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.registry.base_registry import BaseRegistry
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.repo_config import RepoConfig
from feast.saved_dataset import SavedDatasetStorage


class AsofDuckDBOfflineStoreConfig(DuckDBOfflineStoreConfig):
    type: Literal["microstructure.feast_offline.AsofDuckDBOfflineStore"] = (  # type: ignore[assignment]
        "microstructure.feast_offline.AsofDuckDBOfflineStore")
    # DuckDB threads for the join (None: DuckDB's default, all cores).
    threads: int | None = None


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


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
    # One in-memory connection per thread: a training join may be asked for from several threads.
    con = getattr(_local, "con", None)
    if con is None:
        con = _local.con = duckdb.connect()
        if threads:
            con.execute(f"SET threads = {int(threads)}")
    return con


def asof_query(feature_views: list[FeatureView], feature_refs: list[str], entity: str, entity_columns: list[str],
               ts_col: str, full_feature_names: bool) -> str:
    """The point-in-time join of ``entity`` (a relation with ``__row`` and ``__ts_ns``) to every feature view."""
    ctes, joins, select = [], [], [f"e.{_q(c)}" for c in entity_columns]
    for i, fv in enumerate(feature_views):
        src = fv.batch_source
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
        feats = ", ".join(_q(n) for n in names)
        ctes.append(
            f"f{i} AS (SELECT {key_cols}{', ' if feats else ''}{feats}, epoch_ns({_q(ts)}::TIMESTAMPTZ) AS __ts_ns "
            f"FROM (SELECT {cols} FROM read_parquet({_lit(src.path)})) "
            # Ties on the timestamp: the latest created row wins (Feast's order), decided before the join.
            f"QUALIFY row_number() OVER (PARTITION BY {key_cols}, {_q(ts)} ORDER BY {order}) = 1)")
        on = " AND ".join([f"e.{_q(v)} = f{i}.{_q(k)}" for k, v in keys.items()] + [f"e.__ts_ns >= f{i}.__ts_ns"])
        joins.append(f"ASOF LEFT JOIN f{i} ON {on}")
        ttl = fv.ttl
        ttl_ns = int(ttl / dt.timedelta(microseconds=1)) * 1000 if ttl else 0
        for n in names:
            out = f"{base}__{n}" if full_feature_names else n
            if ttl_ns:  # Feast: a match older than the TTL is no match
                select.append(f"CASE WHEN e.__ts_ns - f{i}.__ts_ns <= {ttl_ns} THEN f{i}.{_q(n)} END AS {_q(out)}")
            else:
                select.append(f"f{i}.{_q(n)} AS {_q(out)}")
    return (f"WITH {', '.join(ctes)} SELECT {', '.join(select)} FROM {entity} e {' '.join(joins)} "
            f"ORDER BY e.__row")


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
        entity = entity_df.copy()
        ts = entity[ts_col].infer_objects()
        if pd.api.types.is_string_dtype(ts) or pd.api.types.is_object_dtype(ts):
            ts = pd.to_datetime(ts, utc=True)
        entity[ts_col] = ts
        columns = list(entity.columns)
        threads = getattr(config.offline_store, "threads", None)

        def run() -> pa.Table:
            table = pa.Table.from_pandas(entity, preserve_index=False)
            # Nanoseconds since the epoch: the comparison is exact whatever the entity frame's precision.
            ts_ns = pa.compute.cast(table[ts_col], pa.timestamp("ns", tz="UTC")).cast(pa.int64())
            table = table.append_column("__row", pa.array(range(len(table)), pa.int64())) \
                         .append_column("__ts_ns", ts_ns)
            name = f"entity_{uuid.uuid4().hex}"
            con = _connection(threads)
            con.register(name, table)
            try:
                sql = asof_query(feature_views, feature_refs, name, columns, ts_col, full_feature_names)
                return con.sql(sql).to_arrow_table()
            finally:
                con.unregister(name)

        lo, hi = ts.min(), ts.max()
        metadata = RetrievalMetadata(features=feature_refs, keys=list(set(columns) - {ts_col}),
                                     min_event_timestamp=lo.to_pydatetime() if pd.notna(lo) else None,
                                     max_event_timestamp=hi.to_pydatetime() if pd.notna(hi) else None)
        return AsofRetrievalJob(run, [o for o in odfvs if o.mode != "substrait"], full_feature_names, metadata,
                                str(config.repo_path))
