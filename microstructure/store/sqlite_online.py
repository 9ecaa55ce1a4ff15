"""Feast's SQLite online store, made safe for a poller that pushes while others read and materialize.

Selected in ``feature_repo/feature_store.yaml`` through Feast's documented extension point
(``online_store: type: microstructure.store.sqlite_online.MonotonicSqliteOnlineStore``). Two changes, nothing else:

* **Never back in time.** Feast's SQLite write is an unconditional upsert, so ``feast materialize`` (which
  writes the newest *offline* row, minutes older than what the poller pushed) rolled the online store back.
  Here a row is written only if its timestamp is not older than the one stored for that entity.
* **Concurrent readers and writers.** Feast opens SQLite without WAL or a busy timeout ("database is
  locked" under a pushing poller); this store turns on WAL and a 5 s busy timeout.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable
from typing import Any, Literal

from feast import FeatureView, RepoConfig
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.sqlite import SqliteOnlineStore, SqliteOnlineStoreConfig, _table_id
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto


class MonotonicSqliteOnlineStoreConfig(SqliteOnlineStoreConfig):
    # Feast picks a custom store by this field's class path, so the subclass narrows the parent's Literal.
    type: Literal["microstructure.store.sqlite_online.MonotonicSqliteOnlineStore"] = (
        "microstructure.store.sqlite_online.MonotonicSqliteOnlineStore")  # type: ignore[assignment]


def _naive_utc(t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.UTC).replace(tzinfo=None) if t.tzinfo else t


def _as_datetime(v: Any) -> dt.datetime:
    """Feast's SQLite ``event_ts`` column as a naive UTC datetime (stored as text or epoch seconds)."""
    if isinstance(v, dt.datetime):
        return _naive_utc(v)
    if isinstance(v, int | float) or str(v).lstrip("-").replace(".", "", 1).isdigit():
        return dt.datetime.fromtimestamp(float(v), dt.UTC).replace(tzinfo=None)
    return _naive_utc(dt.datetime.fromisoformat(str(v)))


def stored_timestamps(conn: sqlite3.Connection, name: str, keys: list[bytes]) -> dict[bytes, dt.datetime]:
    """The row timestamp Feast stored for each of ``keys`` (naive UTC); keys never written are absent."""
    stored: dict[bytes, dt.datetime] = {}
    try:
        for i in range(0, len(keys), 900):  # SQLite's bound-parameter limit is 999
            chunk = keys[i: i + 900]
            q = (f'SELECT entity_key, max(event_ts) FROM "{name}" WHERE entity_key IN '
                 f'({", ".join("?" * len(chunk))}) GROUP BY entity_key')
            for k, ts in conn.execute(q, chunk):
                stored[k] = _as_datetime(ts)
    except sqlite3.OperationalError:  # the table does not exist yet: nothing stored to protect
        return {}
    return stored


def upsert(conn: sqlite3.Connection, name: str, params: list[tuple[Any, ...]]) -> None:
    """Feast's upsert of (entity_key, feature_name, value, value_text, event_ts, created_ts) rows, as one
    ``executemany`` in one transaction (Feast issues one statement per value)."""
    sql = (f'INSERT INTO "{name}" (entity_key, feature_name, value, value_text, event_ts, created_ts) '
           "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
           "value = excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, "
           "created_ts = excluded.created_ts")
    with conn:
        conn.executemany(sql, params)


class MonotonicSqliteOnlineStore(SqliteOnlineStore):
    def _get_conn(self, config: RepoConfig) -> sqlite3.Connection:
        fresh = not self._conn
        conn = super()._get_conn(config)
        if fresh:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def online_write_batch(
        self,
        config: RepoConfig,
        table: FeatureView,
        data: list[tuple[EntityKeyProto, dict[str, ValueProto], dt.datetime, dt.datetime | None]],
        progress: Callable[[int], Any] | None,
    ) -> None:
        if data:
            conn = self._get_conn(config)
            name = _table_id(config.project, table, config.registry.enable_online_feature_view_versioning)
            keys = [serialize_entity_key(k, entity_key_serialization_version=config.entity_key_serialization_version)
                    for k, _, _, _ in data]
            stored = stored_timestamps(conn, name, keys)
            kept = [(row, k) for row, k in zip(data, keys, strict=True)
                    if k not in stored or _naive_utc(row[2]) >= _naive_utc(stored[k])]
            if not (config.online_store.vector_enabled
                    or getattr(config.online_store, "enable_openai_compatible_store", False)):
                self._upsert(conn, name, kept)
                if progress:
                    progress(len(data))
                return
            data = [row for row, _ in kept]
        super().online_write_batch(config, table, data, progress)

    @staticmethod
    def _upsert(conn: sqlite3.Connection, name: str,
                rows: list[tuple[tuple[EntityKeyProto, dict[str, ValueProto], dt.datetime, dt.datetime | None],
                                 bytes]]) -> None:
        """Feast's upsert (same table, same columns, same values), as one ``executemany`` in one transaction:
        Feast issues one statement per value, 3,300 per 150-symbol cycle, most of a push's time."""
        from feast.infra.online_stores.sqlite import extract_text_and_num

        params = []
        for (_, values, ts, created), key in rows:
            ts = _naive_utc(ts)
            created = _naive_utc(created) if created is not None else None
            for feature, val in values.items():
                text, _ = extract_text_and_num(val, False)
                params.append((key, feature, val.SerializeToString(), text, ts, created))
        upsert(conn, name, params)
