"""Feast, as the rest of the code sees it: apply the repo, push a cycle online, read online, join offline.

The stores themselves are chosen in ``feature_repo/feature_store.yaml``; nothing here names one.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa

from microstructure.transforms import package_dir

if TYPE_CHECKING:
    from feast import FeatureStore

FEATURE_REPO = package_dir("microstructure.feature_repo")
FEATURE_VIEW = "order_book"
FRESHNESS_S = 10.0  # an online row older than this (by its event_ts) is reported stale

_stores: dict[Path, FeatureStore] = {}


def _definitions(data_dir: Path) -> Any:
    """Import feature_repo/definitions.py afresh: its paths depend on the data dir."""
    spec = importlib.util.spec_from_file_location("microstructure_feature_definitions", FEATURE_REPO / "definitions.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def feast_objects(data_dir: Path) -> list[Any]:
    mod = _definitions(data_dir)
    return [mod.symbol, mod.order_book_source, mod.order_book_push, mod.order_book, mod.scoring, mod.order_book_all,
            mod.freshness, mod.order_book_live]


def store_yaml(data_dir: Path) -> Path:
    """``<data-dir>/feast/feature_store.yaml``: the repo's file with its relative paths made absolute for this
    data dir (one definition; the Feast CLI can use it with ``-f``)."""
    import yaml

    cfg = yaml.safe_load((FEATURE_REPO / "feature_store.yaml").read_text())
    for section in ("registry", "online_store"):
        rel = Path(cfg[section]["path"])
        if not rel.is_absolute():  # ../data/feast/x.db -> <data-dir>/feast/x.db
            cfg[section]["path"] = str(data_dir / "feast" / rel.name)
    online = online_store_config()
    if online is not None:
        cfg["online_store"] = online
    offline = os.environ.get(OFFLINE_STORE_ENV, "").strip().lower()
    if offline == "spark":
        from microstructure.spark import spark_conf

        cfg["offline_store"] = {"type": "spark", "spark_conf": spark_conf()}
    elif offline not in ("", "duckdb"):
        from microstructure.output import InputError

        raise InputError(f"{OFFLINE_STORE_ENV} must be duckdb (default) or spark, not {offline!r}")
    out = data_dir / "feast" / "feature_store.yaml"
    text = yaml.safe_dump(cfg, sort_keys=False)
    if not out.exists() or out.read_text() != text:
        from microstructure.lake import atomic_write_bytes

        atomic_write_bytes(text.encode(), out)
    return out


ONLINE_STORE_ENV = "MICROSTRUCTURE_ONLINE_STORE"
OFFLINE_STORE_ENV = "MICROSTRUCTURE_OFFLINE_STORE"
REDIS_PASSWORD_ENV = "MICROSTRUCTURE_REDIS_PASSWORD"
REDIS_KEY_TTL_S = 24 * 3600  # a symbol no longer polled leaves Redis a day after its last push


def online_store_config() -> dict[str, Any] | None:
    """Feast's online store from ``$MICROSTRUCTURE_ONLINE_STORE`` (``redis://[:password@]host:port/db``,
    ``rediss://`` for TLS, ``?key_ttl_seconds=N``); None (unset) keeps the embedded SQLite store.

    A password never reaches a file: the generated yaml says ``${MICROSTRUCTURE_REDIS_PASSWORD}`` (Feast expands
    it when it reads the file) and this process sets that variable from the URL."""
    from urllib.parse import parse_qs, urlsplit

    from microstructure.output import InputError

    url = os.environ.get(ONLINE_STORE_ENV, "").strip()
    if not url or url in ("sqlite", "default"):
        return None
    u = urlsplit(url)
    if u.scheme not in ("redis", "rediss") or not u.hostname:
        raise InputError(f"{ONLINE_STORE_ENV} must look like redis://host:6379/0 (got scheme {u.scheme!r})")
    try:
        db = int(u.path.strip("/") or 0)
        ttl = int(parse_qs(u.query).get("key_ttl_seconds", [REDIS_KEY_TTL_S])[0])
        port = u.port or 6379
    except ValueError as e:
        raise InputError(f"{ONLINE_STORE_ENV}: {e}") from None
    parts = [f"{u.hostname}:{port}", f"db={db}"]
    if u.scheme == "rediss":
        parts.append("ssl=true")
    if u.password:
        os.environ[REDIS_PASSWORD_ENV] = u.password
        parts.append("password=${" + REDIS_PASSWORD_ENV + "}")
    return {"type": "redis", "connection_string": ",".join(parts), "key_ttl_seconds": ttl}


def _definitions_hash(data_dir: Path) -> str:
    """What the registry was applied from: the definitions and the effective store configuration."""
    import hashlib

    h = hashlib.sha256()
    h.update((FEATURE_REPO / "definitions.py").read_bytes())
    h.update(store_yaml(data_dir).read_bytes())
    return h.hexdigest()


def open_store(data_dir: Path, apply: bool = True) -> FeatureStore:
    """The Feast store for ``data_dir``. The repo is applied when the registry is new or the definitions
    changed since it was applied (a hash kept beside the registry), so edits never go unseen."""
    data_dir = data_dir.resolve()
    if data_dir in _stores:
        return _stores[data_dir]
    os.environ["MICROSTRUCTURE_DATA_DIR"] = str(data_dir)
    (data_dir / "feast").mkdir(parents=True, exist_ok=True)
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(FEATURE_REPO), fs_yaml_file=store_yaml(data_dir))
    stamp = data_dir / "feast" / "applied.sha256"
    digest = _definitions_hash(data_dir)
    if apply and (not (data_dir / "feast" / "registry.db").exists() or not stamp.exists()
                  or stamp.read_text() != digest):
        import warnings

        with warnings.catch_warnings():  # Feast warns that on-demand views are "experimental" on every apply
            warnings.simplefilter("ignore")
            store.apply(feast_objects(data_dir))
        stamp.write_text(digest)
    _stores[data_dir] = store
    return store


def clear_online(project: str = "microstructure") -> int:
    """Remove the project's rows from a configured Redis online store (a fresh market must not sit behind the
    newer rows of the old one: Feast's Redis writes skip rows older than the stored ones). Returns keys removed;
    the SQLite store is a file of the data dir and goes with it."""
    cfg = online_store_config()
    if cfg is None:
        return 0
    from feast.infra.online_stores.redis import RedisOnlineStore

    nodes, kwargs = RedisOnlineStore._parse_connection_string(os.path.expandvars(cfg["connection_string"]))
    import redis

    client = redis.Redis(host=nodes[0]["host"], port=int(nodes[0]["port"]), **kwargs)
    n = 0
    keys = list(client.scan_iter(match=b"*" + project.encode(), count=1000))  # Feast's key: entity key + project
    for i in range(0, len(keys), 1000):
        n += client.delete(*keys[i: i + 1000])
    client.close()
    return n


def forget_store(data_dir: Path) -> None:
    """Drop the cached store of ``data_dir`` (its files were removed; the next open applies afresh)."""
    _stores.pop(data_dir.resolve(), None)


def _to_push_frame(features: pa.Table) -> pd.DataFrame:
    df = features.to_pandas()
    # Feast's online write wants plain numpy-backed columns; keep nullable booleans as objects.
    for c in ("halted", "locked", "has_recent_halt"):
        if c in df:
            df[c] = df[c].astype(object)
    return df


def push_online(store: FeatureStore, features: pa.Table, fast: bool = True) -> int:
    """Write one cycle's feature rows (one per symbol) to the online store; a row older than the stored one
    never replaces it. ``fast``: Feast's bytes encoded a column at a time (``microstructure.online_write``;
    the same stored rows, ~20x less time at 10,000 symbols); else through Feast's own write."""
    if features.num_rows == 0:
        return 0
    from microstructure import online_write

    if fast and online_write.supported(store):
        plan = _read_plan(store, "order_book_all")
        if plan is not None:
            online_write.write(store, plan[0], features)
            return features.num_rows
    # Feast's online write for the push source's view (what ``push(..., to=ONLINE)`` ends in, without its
    # per-call registry scan for precomputed services, which we do not use).
    store.write_to_online_store(FEATURE_VIEW, _to_push_frame(features))
    return features.num_rows


@dataclass(frozen=True)
class OnlineRow:
    symbol: str
    found: bool
    features: dict[str, Any]
    event_ts: dt.datetime | None
    age_s: float | None
    stale: bool

    def as_dict(self) -> dict[str, Any]:
        return {"symbol": self.symbol, "found": self.found,
                "event_ts": self.event_ts.isoformat() if self.event_ts else None,
                "age_s": None if self.age_s is None else round(self.age_s, 3), "stale": self.stale,
                **{k: v for k, v in self.features.items() if k != "event_ts"}}


def _row(sym: str, feats: dict[str, Any], ev: Any, now: dt.datetime, freshness_s: float) -> OnlineRow:
    if isinstance(ev, int | float):
        ev = dt.datetime.fromtimestamp(ev, dt.UTC)
    if isinstance(ev, pd.Timestamp):
        ev = ev.to_pydatetime()
    if ev is not None and ev.tzinfo is None:
        ev = ev.replace(tzinfo=dt.UTC)
    found = ev is not None or any(v is not None for k, v in feats.items() if k != "event_ts")
    age = (now - ev).total_seconds() if ev is not None else None
    return OnlineRow(sym, found, feats, ev, age, stale=age is None or age > freshness_s)


def _plain_view(store: FeatureStore, name: str) -> Any:
    """The (cached) regular feature view ``name``, or None for an on-demand view."""
    from feast.errors import FeatureViewNotFoundException

    try:
        return store.get_feature_view(name)
    except FeatureViewNotFoundException:
        return None


_plans: dict[tuple[int, str], tuple[float, Any]] = {}


def _read_plan(store: FeatureStore, service: str) -> tuple[Any, list[str], list[str]] | None:
    """(feature view, its requested names, names to read) for a one-view service, else None. Kept for the
    registry's cache TTL: Feast's registry lookups are type-checked call by call (~3 ms of a 150-symbol read)."""
    import time

    key = (id(store), service)
    hit = _plans.get(key)
    if hit and time.monotonic() - hit[0] < store.config.registry.cache_ttl_seconds:
        return hit[1]
    projections = store.get_feature_service(service).feature_view_projections
    fv = _plain_view(store, projections[0].name) if len(projections) == 1 else None
    plan = None
    if fv is not None:
        names = [f.name for f in projections[0].features]
        plan = (fv, names, names if "event_ts" in names else [*names, "event_ts"])
    _plans[key] = (time.monotonic(), plan)
    return plan


def read_online(store: FeatureStore, symbols: list[str], freshness_s: float = FRESHNESS_S,
                now: dt.datetime | None = None, service: str = "order_book_all",
                fast: bool = True) -> list[OnlineRow]:
    """Online features per symbol with their age and stale flag (Feast ignores TTL online, so staleness is
    judged here, on every row, whatever the service: the book's ``event_ts`` is always read).

    ``fast`` reads Feast's stored rows directly (``microstructure.online_read``; same values as
    ``get_online_features``, ~10x less time); services with on-demand views go through Feast."""
    from microstructure import online_read

    plan = _read_plan(store, service) if fast and online_read.supported(store) else None
    if plan is not None:
        fv, names, read = plan
        stored = online_read.read(store, fv, symbols, read)
        now = now or dt.datetime.now(dt.UTC)
        rows = []
        for sym, got in zip(symbols, stored, strict=True):
            got = got or {}
            rows.append(_row(sym, {n: got.get(n) for n in names}, got.get("event_ts"), now, freshness_s))
        return rows
    svc = store.get_feature_service(service)
    resp = store.get_online_features(features=svc, entity_rows=[{"symbol": s} for s in symbols]).to_dict()
    now = now or dt.datetime.now(dt.UTC)
    names = [k for k in resp if k != "symbol"]
    return [_row(sym, {k: resp[k][i] for k in names}, resp.get("event_ts", [None] * len(symbols))[i], now,
                 freshness_s) for i, sym in enumerate(symbols)]


def normalise_entities(entities: pd.DataFrame) -> pd.DataFrame:
    """Accept ``event_timestamp`` or ``timestamp``; UTC, floored to microseconds (Feast's precision)."""
    df = entities.copy()
    if "event_timestamp" not in df and "timestamp" in df:
        df = df.rename(columns={"timestamp": "event_timestamp"})
    from microstructure.output import InputError

    missing = {"symbol", "event_timestamp"} - set(df.columns)
    if missing:
        raise InputError(f"entity file lacks column(s) {sorted(missing)}; needs symbol and event_timestamp")
    ts = pd.to_datetime(df["event_timestamp"], utc=True, format="mixed", errors="coerce")
    if ts.isna().any():
        bad = df["event_timestamp"][ts.isna()].iloc[0]
        raise InputError(f"{int(ts.isna().sum())} entity row(s) have no readable event_timestamp (first: {bad!r})")
    df["event_timestamp"] = ts.dt.floor("us").astype("datetime64[us, UTC]")
    df["symbol"] = df["symbol"].astype(str)
    return df


def training_set(store: FeatureStore, entities: pd.DataFrame, service: str = "order_book_all") -> pd.DataFrame:
    """Point-in-time join through Feast: each row gets the latest features with received_ts <= its time."""
    df = normalise_entities(entities)
    df["_row"] = range(len(df))
    out = store.get_historical_features(entity_df=df, features=store.get_feature_service(service)).to_df()
    # Our ASOF store keeps the caller's order; another offline store (stock DuckDB, Spark) may not.
    if not out["_row"].is_monotonic_increasing:
        out = out.sort_values("_row")
    return out.drop(columns="_row").reset_index(drop=True)
