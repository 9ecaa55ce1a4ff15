"""The scoring read: what Feast wrote to its online store, read without Feast's per-value machinery.

``FeatureStore.get_online_features`` spends most of a 150-symbol read converting each value through several
layers (response protos, ``feast_value_type_to_python_type``) and allocates enough to wake the garbage collector:
p50 11 ms / p99 ~170 ms for the five scoring features on SQLite on this machine. This module reads the same rows
from the same store Feast wrote them to (Feast's SQLite table or Redis hashes, Feast's key encoding), with one
query or one pipeline per read, and decodes Feast's ``Value`` protos directly (a float64, the common case, is
unpacked from its 9 bytes; anything else goes through the proto). ``tests/test_online_read.py`` checks it value
for value against ``get_online_features`` on both stores. Any process that reaches the store can write a row; a
value that is not a readable Feast ``Value`` makes that symbol's answer a ``BadRow``, never the read fail
(``store.lookup.read_online`` then checks types, finiteness and the book time of every row it serves).

Hand-written because Feast has no batch decoder and no public read that skips its response building.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from google.protobuf.message import DecodeError

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView
    from redis import Redis
    from redis.cluster import RedisCluster


_DOUBLE = struct.Struct("<d")
_local = threading.local()


class BadValue(ValueError):
    """A stored value that is not a Feast ``Value`` we can read (another process wrote it: ``feast serve``'s push,
    a hand-made row). It makes its symbol's row bad, never the read."""


@dataclass(frozen=True)
class BadRow:
    """What ``read`` gives for a symbol whose stored row cannot be decoded: why, for the caller to report."""

    reason: str


def decode(blob: bytes | None) -> Any:
    """One stored Feast ``Value`` as the Python value ``get_online_features`` gives; BadValue if it is none."""
    if isinstance(blob, bytes | bytearray | memoryview) and len(blob) == 9 and blob[0] == 0x29:
        return _DOUBLE.unpack_from(blob, 1)[0]  # field 5 (double_val), wire type 1: 8 little-endian bytes
    if blob is None or blob == b"":
        return None
    if not isinstance(blob, bytes | bytearray | memoryview):  # e.g. TEXT or INTEGER written into SQLite's BLOB
        raise BadValue(f"stored value is {type(blob).__name__}, not a Feast Value")
    v = Value()
    try:
        v.ParseFromString(bytes(blob))
    except DecodeError:
        raise BadValue(f"undecodable Feast Value ({len(blob)} bytes)") from None
    kind = v.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    x = getattr(v, kind)
    if kind == "unix_timestamp_val":
        try:
            return dt.datetime.fromtimestamp(x, dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise BadValue(f"impossible timestamp {x} s") from None
    if kind.endswith("_list_val"):
        return list(x.val)
    return x


def _decode_row(names: Sequence[str], blobs: Sequence[Any]) -> dict[str, Any] | BadRow:
    out: dict[str, Any] = {}
    for n, b in zip(names, blobs, strict=True):
        try:
            out[n] = decode(b)
        except BadValue as e:
            return BadRow(f"{n}: {e}")
    return out


_keys: dict[tuple[int, str], bytes] = {}


def _entity_keys(store: FeatureStore, symbols: Sequence[str]) -> list[bytes]:
    """Feast's serialized entity key per symbol (memoised: the universe is small and fixed per session)."""
    version = store.config.entity_key_serialization_version
    out = []
    for s in symbols:
        k = _keys.get((version, s))
        if k is None:
            if len(_keys) > 200_000:
                _keys.clear()
            k = _keys[(version, s)] = serialize_entity_key(
                EntityKey(join_keys=["symbol"], entity_values=[Value(string_val=s)]),
                entity_key_serialization_version=version)
        out.append(k)
    return out


def _sqlite(store: FeatureStore) -> sqlite3.Connection:
    path = str(store.config.online_store.path)
    cons = getattr(_local, "sqlite", None)
    if cons is None:
        cons = _local.sqlite = {}
    con = cons.get(path)
    if con is None:
        # Read-only: a reader never takes the writer's lock (the store runs in WAL mode).
        con = cons[path] = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        con.execute("PRAGMA busy_timeout=5000")
    return con


def _read_sqlite(store: FeatureStore, fv: FeatureView, keys: list[bytes], names: list[str]
                 ) -> list[dict[str, Any] | BadRow | None]:
    from feast.infra.online_stores.sqlite import _table_id

    table = _table_id(store.config.project, fv, store.config.registry.enable_online_feature_view_versioning)
    sql = (f'SELECT entity_key, feature_name, value FROM "{table}" WHERE entity_key IN '
           f'({",".join("?" * len(keys))}) AND feature_name IN ({",".join("?" * len(names))})')
    try:
        rows = _sqlite(store).execute(sql, [*keys, *names]).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e) or "unable to open" in str(e):
            return [None] * len(keys)  # nothing pushed yet
        raise
    stored: dict[bytes, tuple[list[str], list[Any]]] = {}
    for k, name, blob in rows:
        got = stored.setdefault(k, ([], []))
        got[0].append(name)
        got[1].append(blob)
    return [None if k not in stored else _decode_row(*stored[k]) for k in keys]


def _redis(store: FeatureStore) -> Redis | RedisCluster:
    # Feast's own client for its own configuration (host, db, password, cluster or sentinel): both read the
    # same server; the client is a connection pool, safe to share.
    from feast.infra.online_stores.redis import RedisOnlineStore

    online = store._get_provider().online_store
    assert isinstance(online, RedisOnlineStore)  # callers read or write only a store configured as "redis"
    client: Redis | RedisCluster = online._get_client(store.config.online_store)  # Feast leaves it unannotated
    return client


def _read_redis(store: FeatureStore, fv: FeatureView, keys: list[bytes], names: list[str]
                ) -> list[dict[str, Any] | BadRow | None]:
    from feast.infra.online_stores.helpers import _mmh3

    project = store.config.project.encode("utf-8")
    fields = [_mmh3(f"{fv.name}:{n}") for n in names]
    ts_field = f"_ts:{fv.name}"
    with _redis(store).pipeline(transaction=False) as pipe:
        for k in keys:
            # Feast's key bin: the serialized entity key, then the project (feast.infra.online_stores.helpers).
            pipe.hmget(k + project, [ts_field, *fields])
        replies = pipe.execute()
    return [None if reply[0] is None else _decode_row(names, reply[1:]) for reply in replies]


def read(store: FeatureStore, fv: FeatureView, symbols: Sequence[str], names: list[str]
         ) -> list[dict[str, Any] | BadRow | None]:
    """``names`` of ``fv`` for each symbol (None: nothing stored; BadRow: a stored value that cannot be decoded,
    for that symbol alone), in the order of ``symbols``."""
    keys = _entity_keys(store, symbols)
    kind = store.config.online_store.type
    if kind == "redis":
        return _read_redis(store, fv, keys, names)
    if kind.endswith(("SqliteOnlineStore", "sqlite")):
        return _read_sqlite(store, fv, keys, names)
    raise NotImplementedError(f"no direct reader for online store {kind!r}")


def supported(store: FeatureStore) -> bool:
    kind = store.config.online_store.type
    return kind == "redis" or kind.endswith(("SqliteOnlineStore", "sqlite"))
