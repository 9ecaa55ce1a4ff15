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

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from microstructure.book import AHEAD as _AHEAD
from microstructure.book import EARLIEST as _EARLIEST
from microstructure.transforms import package_dir

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

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


class _FeastPath(str):
    """A data dir's path in the generated feature_store.yaml (see :func:`_feast_yaml`)."""


def _feast_yaml(cfg: dict[str, Any]) -> str:
    """``cfg`` as YAML that Feast reads back exactly as given.

    Feast runs ``os.path.expandvars`` over the file's text before parsing it, so a ``$`` in a data dir's path
    (``/srv/$POLYGON_API_KEY/data``) would pull an environment value, a key, into a path and its error messages.
    Our paths are written as double-quoted scalars (a quote or ``#`` in them is then just text) with each ``$``
    as the escape ``\\x24``, which YAML decodes only after expandvars has looked. Other values are written as
    before (the Redis password placeholder must still expand)."""
    import re

    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    # NUL never occurs in a path: it stands in for "$" and is emitted as the escape \0, rewritten below.
    Dumper.add_representer(_FeastPath, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str",
                                                                       s.replace("$", "\0"), style='"'))
    text = yaml.dump(cfg, Dumper=Dumper, sort_keys=False, width=float("inf"))
    text = re.sub(r"\\(.)", lambda m: r"\x24" if m.group(1) == "0" else m.group(0), text)
    if yaml.safe_load(text) != cfg:  # the rewrite touched nothing else: every value reads back as written
        raise AssertionError("feature_store.yaml would not read back as written")
    return text


def store_yaml(data_dir: Path) -> Path:
    """``<data-dir>/feast/feature_store.yaml``: the repo's file with its online store's relative path made absolute
    for this data dir and the registry in :func:`registry_dir` (one definition; the Feast CLI can use it with
    ``-f``). Written on every open: a planted one never reaches Feast."""
    import yaml

    cfg = yaml.safe_load((FEATURE_REPO / "feature_store.yaml").read_text())
    rel = Path(cfg["online_store"]["path"])
    if not rel.is_absolute():  # ../data/feast/x.db -> <data-dir>/feast/x.db
        cfg["online_store"]["path"] = _FeastPath(data_dir / "feast" / rel.name)
    # Never the data dir's: Feast runs code held in a registry (on-demand views' source), see registry_dir.
    cfg["registry"]["path"] = _FeastPath(registry_dir(data_dir) / "registry.db")
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
    text = _feast_yaml(cfg)
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


CACHE_ENV = "MICROSTRUCTURE_CACHE_DIR"


def cache_dir() -> Path:
    """This user's cache folder for derived state: ``$MICROSTRUCTURE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/microstructure``, else ``~/.cache/microstructure``."""
    own = os.environ.get(CACHE_ENV, "").strip()
    if own:
        return Path(own).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"  # the spec: relative is unset
    return (base / "microstructure").resolve()


def _private_dir(path: Path, chmod: bool) -> None:
    """``path`` exists, is this user's and nobody else may write in it (``chmod``: made 0700), or InputError."""
    from microstructure.output import InputError

    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise InputError(f"cache folder {path} belongs to another user; set {CACHE_ENV} to a folder of yours")
    if chmod and st.st_mode & 0o077:
        path.chmod(0o700)
    elif st.st_mode & 0o022:
        raise InputError(f"cache folder {path} is writable by others; set {CACHE_ENV} to a private folder")


def registry_dir(data_dir: Path) -> Path:
    """Where the Feast registry of ``data_dir`` (and the stamp of what it was applied from) lives: this user's
    ``<cache>/registries/<sha256 of the data dir's resolved path>/``, private (0700), never inside the data dir.

    Feast executes what a registry holds (an on-demand view's UDF source, a dill fallback), and a data dir is
    untrusted data that anyone may hand over; a stamp beside a registry there could be forged as easily. The
    registry is derived state (our definitions applied for this path), so it is kept, and rebuilt, here; a
    ``registry.db`` in the data dir is ignored."""
    import hashlib

    root = cache_dir()
    _private_dir(root, chmod=False)
    _private_dir(root / "registries", chmod=True)
    out = root / "registries" / hashlib.sha256(os.fsencode(data_dir.resolve())).hexdigest()
    _private_dir(out, chmod=True)
    return out


def open_store(data_dir: Path, apply: bool = True) -> FeatureStore:
    """The Feast store for ``data_dir``. The repo is applied when the registry (in :func:`registry_dir`) is new
    or the definitions changed since it was applied (a hash kept beside the registry), so edits never go
    unseen."""
    data_dir = data_dir.resolve()
    if data_dir in _stores:
        return _stores[data_dir]
    os.environ["MICROSTRUCTURE_DATA_DIR"] = str(data_dir)
    (data_dir / "feast").mkdir(parents=True, exist_ok=True)
    from feast import FeatureStore

    from microstructure.lake import atomic_write_bytes

    store = FeatureStore(repo_path=str(FEATURE_REPO), fs_yaml_file=store_yaml(data_dir))
    reg = registry_dir(data_dir)
    stamp = reg / "applied.sha256"
    digest = _definitions_hash(data_dir)
    # A data dir cleared (--fresh, rm -r) keeps its registry here, but its SQLite online store needs the
    # tables an apply creates.
    online = getattr(store.config.online_store, "path", None)
    if apply and (not (reg / "registry.db").exists() or not stamp.exists() or stamp.read_text() != digest
                  or (online is not None and not Path(online).exists())):
        import warnings

        with warnings.catch_warnings():  # Feast warns that on-demand views are "experimental" on every apply
            warnings.simplefilter("ignore")
            store.apply(feast_objects(data_dir))
        atomic_write_bytes(digest.encode(), stamp)
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
    error: str | None = None  # "bad online row: ...": a stored row that cannot be served (found False, stale)

    def as_dict(self) -> dict[str, Any]:
        d = {"symbol": self.symbol, "found": self.found,
             "event_ts": self.event_ts.isoformat() if self.event_ts else None,
             "age_s": None if self.age_s is None else round(self.age_s, 3), "stale": self.stale,
             **{k: v for k, v in self.features.items() if k != "event_ts"}}
        if self.error is not None:
            d["error"] = self.error
        return d


# Any process that can reach the online store can write a row (``feast serve``'s push endpoint, a Redis client):
# a reader judges each row on its own. A row whose values are not of the view's types, whose floats are not
# finite, whose book time is impossible, or that lacks what every served book has, is reported bad for its
# symbol: found False, stale, and an ``error`` saying why. Its values are never served and the other symbols
# are read as usual.
NEEDED = ("spread_bps", "order_imbalance", "depth_dollars", "has_recent_halt")  # never null in a served book


def _finite_number(v: Any) -> str | None:
    t = type(v)
    if t is float:  # the common case first: this runs for every value of every read
        return None if -_INF < v < _INF else "not finite"
    if t is bool or not isinstance(v, int | float | np.integer | np.floating):
        return "not a number"
    return None if -_INF < v < _INF else "not finite"


def _of(*kinds: type) -> Any:
    def check(v: Any) -> str | None:
        return None if isinstance(v, kinds) and (bool in kinds or type(v) is not bool) else "of the wrong type"

    return check


_INF = float("inf")
_CHECKS = {"DOUBLE": _finite_number, "FLOAT": _finite_number, "INT32": _of(int, np.integer),
           "INT64": _of(int, np.integer), "BOOL": _of(bool, np.bool_), "STRING": _of(str),
           "UNIX_TIMESTAMP": _of(dt.datetime)}


def _types(fields: Any, names: Any) -> tuple[tuple[str, ...], tuple[tuple[str, Any], ...]]:
    """How to check ``names``: (the float features, (name, check) of the others) by their Feast types (a type this
    project does not serve is not checked). Floats apart: they are most values, and checked inline."""
    kinds = {f.name: f.dtype.to_value_type().name for f in fields}
    floats = tuple(n for n in names if kinds.get(n) in ("DOUBLE", "FLOAT"))
    others = tuple((n, _CHECKS[kinds[n]]) for n in names if n not in floats and kinds.get(n) in _CHECKS)
    return floats, others


def _problem(feats: dict[str, Any], ev: dt.datetime | None, checks: Any, with_ts: bool, latest: dt.datetime
             ) -> str | None:
    floats, others = checks
    for name in floats:
        v = feats.get(name)
        if v is None or (type(v) is float and -_INF < v < _INF):  # every read runs this: the common case inline
            continue
        why = _finite_number(v)
        if why:
            return f"{name} {repr(v)[:40]} is {why}"
    for name, check in others:
        v = feats.get(name)
        why = None if v is None else check(v)
        if why:
            return f"{name} {repr(v)[:40]} is {why}"
    if with_ts and ev is None:
        return "no event_ts"
    if ev is not None and not _EARLIEST <= ev <= latest:
        return f"event_ts {ev.isoformat()} is impossible"
    if None in feats.values():
        missing = [n for n in NEEDED if n in feats and feats[n] is None]
        return f"{', '.join(missing)} missing" if missing else None
    return None


def _bad(sym: str, names: Any, why: str) -> OnlineRow:
    return OnlineRow(sym, False, {n: None for n in names}, None, None, True, f"bad online row: {why}")


def _row(sym: str, feats: dict[str, Any], ev: Any, now: dt.datetime, freshness_s: float,
         types: Any = None, with_ts: bool = False, latest: dt.datetime | None = None
         ) -> OnlineRow:
    if isinstance(ev, int | float) and not isinstance(ev, bool):
        try:
            ev = dt.datetime.fromtimestamp(ev, dt.UTC)
        except (OverflowError, OSError, ValueError):
            return _bad(sym, feats, f"impossible event_ts {ev!r}")
    if isinstance(ev, pd.Timestamp):
        ev = ev.to_pydatetime()
    if ev is not None and not isinstance(ev, dt.datetime):
        return _bad(sym, feats, f"event_ts {repr(ev)[:40]} is not a time")
    if ev is not None and ev.tzinfo is None:
        ev = ev.replace(tzinfo=dt.UTC)
    found = ev is not None or any(v is not None for k, v in feats.items() if k != "event_ts")
    if found:
        why = _problem(feats, ev, types or ((), ()), with_ts, latest or dt.datetime.now(dt.UTC) + _AHEAD)
        if why:
            return _bad(sym, feats, why)
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


def _read_plan(store: FeatureStore, service: str) -> tuple[Any, list[str], list[str], Any] | None:
    """(feature view, its requested names, names to read, their value types) for a one-view service, else None.
    Kept for the registry's cache TTL: Feast's registry lookups are type-checked call by call (~3 ms of a
    150-symbol read)."""
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
        plan = (fv, names, names if "event_ts" in names else [*names, "event_ts"], _types(fv.features, names))
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
    # The real clock bounds a plausible book time (a day ahead, as the lake's implausible_time), whatever ``now``
    # says: a row stamped in the year 9999 would otherwise be fresh for ever.
    real_now = dt.datetime.now(dt.UTC)
    latest = real_now + _AHEAD
    now = now or real_now
    if plan is not None:
        fv, names, read, types = plan
        rows = []
        for sym, got in zip(symbols, online_read.read(store, fv, symbols, read), strict=True):
            if isinstance(got, online_read.BadRow):
                rows.append(_bad(sym, names, got.reason))
                continue
            got = got or {}
            rows.append(_row(sym, {n: got.get(n) for n in names}, got.get("event_ts"), now, freshness_s, types,
                             with_ts=True, latest=latest))
        return rows
    svc = store.get_feature_service(service)
    fields = [f for p in svc.feature_view_projections for f in p.features]
    types = _types(fields, [f.name for f in fields])
    return _read_through_feast(store, svc, symbols, now, freshness_s, types, latest)


def _read_through_feast(store: FeatureStore, svc: Any, symbols: list[str], now: dt.datetime, freshness_s: float,
                        types: Any, latest: dt.datetime) -> list[OnlineRow]:
    """``get_online_features`` for ``symbols``. Feast decodes every row of the batch in one go, so one row it
    cannot decode fails them all: then each symbol is read alone and only the failing ones are reported bad."""
    import errno

    from google.protobuf.message import DecodeError

    try:
        resp = store.get_online_features(features=svc, entity_rows=[{"symbol": s} for s in symbols]).to_dict()
    except (DecodeError, ValueError, TypeError, OverflowError, KeyError, AttributeError, OSError) as e:
        # (OSError: what fromtimestamp raises on an impossible timestamp; any other OSError is the store's own.)
        if isinstance(e, OSError) and e.errno != errno.EOVERFLOW:
            raise
        if len(symbols) == 1:
            names = [f.name for p in svc.feature_view_projections for f in p.features]
            return [_bad(symbols[0], names, f"{type(e).__name__}: {str(e)[:80]}")]
        return [r for s in symbols for r in _read_through_feast(store, svc, [s], now, freshness_s, types, latest)]
    names = [k for k in resp if k != "symbol"]
    with_ts = "event_ts" in resp
    return [_row(sym, {k: resp[k][i] for k in names}, resp.get("event_ts", [None] * len(symbols))[i], now,
                 freshness_s, types, with_ts=with_ts, latest=latest) for i, sym in enumerate(symbols)]


# --- Training sets -------------------------------------------------------------------------------------------
# An entity file is read as a stream and joined a batch at a time through Feast's API; each batch's rows are
# written before the next is read, so memory follows the batch, not the file (10M rows: see benchmarks/training.py).

ENTITY_BATCH_ROWS = 1_000_000  # entity rows per Feast call when a training set is written to a file
MAX_ENTITY_ROWS = 100_000_000  # an entity file's rows: the output (on disk) grows with them
ENTITY_LINE_BYTES = 1 << 20  # a CSV entity line longer than this is refused (pyarrow's block size)
ENTITY_ROW_GROUP_BYTES = 1 << 30  # a Parquet entity row group, uncompressed (pyarrow writes ~1M rows in one)
ENTITY_JSON_BYTES = 256 << 20  # a JSON entity file is read whole: this much decompressed at most...
ENTITY_JSON_ROWS = 1_000_000  # ...and this many rows (CSV and Parquet stream: use them for more)
_ROW = "__entity_row"  # each entity row's position, sent through Feast and checked on the way back
# Times pandas (Feast's entity frames) can hold: nanoseconds since 1970 in an int64.
_TS_MIN = pd.Timestamp.min.ceil("us").tz_localize("UTC")
_TS_MAX = pd.Timestamp.max.floor("us").tz_localize("UTC")


class _TypeChanged(Exception):
    """A CSV column's type, inferred from the first block, does not fit a later block."""


def normalise_entities(entities: pd.DataFrame) -> pd.DataFrame:
    """Accept ``event_timestamp`` or ``timestamp``; UTC, floored to microseconds (Feast's precision)."""
    df = entities.copy()
    if "event_timestamp" not in df and "timestamp" in df:
        df = df.rename(columns={"timestamp": "event_timestamp"})
    from microstructure.output import InputError

    missing = {"symbol", "event_timestamp"} - set(df.columns)
    if missing:
        raise InputError(f"entity file lacks column(s) {sorted(missing)}; needs symbol and event_timestamp")
    raw = df["event_timestamp"]
    if pd.api.types.is_datetime64_any_dtype(raw):  # already times: no text to parse
        ts = raw.dt.tz_localize("UTC") if raw.dt.tz is None else raw.dt.tz_convert("UTC")
    else:
        ts = pd.to_datetime(raw, utc=True, format="mixed", errors="coerce")
    if ts.isna().any():
        bad = raw[ts.isna()].iloc[0]
        raise InputError(f"{int(ts.isna().sum())} entity row(s) have no readable event_timestamp "
                         f"(first: {_short(bad)})")
    df["event_timestamp"] = ts.dt.floor("us").astype("datetime64[us, UTC]")
    df["symbol"] = df["symbol"].astype(str)
    return df


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _request_columns(store: FeatureStore, svc: Any) -> list[str]:
    """Entity-frame columns the service's on-demand views read (request data); ours read none. Only the
    service's own views are looked up."""
    odfvs = [store.get_on_demand_feature_view(p.name) for p in svc.feature_view_projections
             if _plain_view(store, p.name) is None]
    return sorted({c for o in odfvs for c in o.get_request_data_schema()})


def _features_for(store: FeatureStore, svc: Any, keys: pd.DataFrame) -> pa.Table:
    """The service's feature columns for each row of ``keys`` (symbol, event_timestamp and any request columns),
    in ``keys``' order, through Feast's ``get_historical_features``. Only the keys go through Feast: the entity
    file's other columns stay as they were read (types included) and are put beside the result."""
    keys = keys.assign(**{_ROW: np.arange(len(keys), dtype=np.int64)})
    res = store.get_historical_features(entity_df=keys, features=svc).to_arrow()
    if len(res) != len(keys):
        raise RuntimeError(f"the offline store returned {len(res)} rows for {len(keys)} entity rows")
    expected = pa.array(np.arange(len(keys), dtype=np.int64))
    # Our ASOF store keeps the caller's order; another offline store (stock DuckDB, Spark) may not.
    if not pc.all(pc.equal(res[_ROW], expected)).as_py():
        res = res.take(pc.sort_indices(res[_ROW]))
        if not pc.all(pc.equal(res[_ROW], expected)).as_py():
            raise RuntimeError("the offline store did not return each entity row once")
    return res.drop_columns([c for c in keys.columns if c in res.column_names])


def _check_names(entity_columns: list[str], features: pa.Table) -> None:
    from microstructure.output import InputError

    clash = [c for c in features.column_names if c in entity_columns]
    if clash:
        raise InputError(f"entity column(s) {clash} have the names of features; rename them in the entity file")


def training_set(store: FeatureStore, entities: pd.DataFrame, service: str = "order_book_all") -> pd.DataFrame:
    """Point-in-time join through Feast: each row gets the latest features with received_ts <= its time.
    Rows come back in the entity frame's order; the frame's columns first, then the features."""
    df = normalise_entities(entities).reset_index(drop=True)
    svc = store.get_feature_service(service)
    keys = df[["symbol", "event_timestamp", *_request_columns(store, svc)]]
    feats = _features_for(store, svc, keys)
    _check_names(list(df.columns), feats)
    return pd.concat([df, feats.to_pandas()], axis=1, copy=False)


def _arrow_times(col: pa.ChunkedArray, first_row: int) -> pa.ChunkedArray:
    """An entity batch's times as UTC microseconds (a time without a zone is UTC, as in ``normalise_entities``),
    or InputError naming the first unreadable one and its row in the file."""
    from microstructure.output import InputError

    t = col.type
    out = None
    if pa.types.is_timestamp(t):
        out = col if t.tz is not None else col.cast(pa.timestamp(t.unit, "UTC"))
        if t.unit == "ns":
            out = pc.floor_temporal(out, unit="microsecond")
        out = out.cast(pa.timestamp("us", "UTC"), safe=False)
    elif pa.types.is_date(t):
        out = col.cast(pa.timestamp("us")).cast(pa.timestamp("us", "UTC"))
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        # ISO 8601 (what pandas and Arrow write) in Arrow's parser; anything else as pandas reads it.
        for target in (pa.timestamp("us", "UTC"), pa.timestamp("us")):
            try:
                out = col.cast(target).cast(pa.timestamp("us", "UTC"))
                break
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
    if out is None or out.null_count > col.null_count:
        parsed = pd.to_datetime(col.to_pandas(), utc=True, format="mixed", errors="coerce")
        out = pa.chunked_array([pa.array(parsed.dt.floor("us").astype("datetime64[us, UTC]"))])
    bad = pc.is_null(out)
    if out.null_count:
        i = int(pc.index(bad, True).as_py())
        raise InputError(f"{out.null_count:,} entity row(s) have no readable event_timestamp "
                         f"(first: {_short(col[i].as_py())}) from row {first_row + i + 1:,} of the file")
    lo, hi = pc.min_max(out).values()
    if lo.as_py() < _TS_MIN or hi.as_py() > _TS_MAX:
        i = int(pc.index(pc.or_(pc.less(out, pa.scalar(_TS_MIN, out.type)),
                                pc.greater(out, pa.scalar(_TS_MAX, out.type))), True).as_py())
        raise InputError(f"entity row {first_row + i + 1:,} has event_timestamp {_short(col[i].as_py())}, outside "
                         f"{_TS_MIN.year}-{_TS_MAX.year} (the times Feast's entity frames can hold)")
    return out


def _normalise_batch(table: pa.Table, first_row: int) -> pa.Table:
    """``normalise_entities`` for an Arrow batch of the entity file: ``timestamp`` accepted for
    ``event_timestamp``, times in UTC microseconds, symbols as text; every other column as read."""
    from microstructure.output import InputError

    names = table.column_names
    if "event_timestamp" not in names and "timestamp" in names:
        table = table.rename_columns(["event_timestamp" if n == "timestamp" else n for n in names])
        names = table.column_names
    missing = sorted({"symbol", "event_timestamp"} - set(names))
    if missing:
        raise InputError(f"entity file lacks column(s) {missing}; needs symbol and event_timestamp")
    table = table.set_column(names.index("event_timestamp"), "event_timestamp",
                             _arrow_times(table["event_timestamp"], first_row))
    sym = table["symbol"]
    if not pa.types.is_string(sym.type):
        try:
            sym = sym.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InputError(f"entity file's symbol column ({sym.type}) is not text: {str(e).splitlines()[0]}") \
                from None
        table = table.set_column(names.index("symbol"), "symbol", sym)
    return table


def _csv_batches(path: Path, text: bool) -> Iterator[pa.RecordBatch]:
    import pyarrow.csv as pacsv

    # Keys are text whatever they look like (a ticker may be all digits); times are parsed by _arrow_times.
    types = {n: pa.string() for n in ("symbol", "event_timestamp", "timestamp")}
    if text:
        head = pacsv.open_csv(pa.input_stream(str(path), compression="detect"),
                              read_options=pacsv.ReadOptions(block_size=ENTITY_LINE_BYTES))
        types = {n: pa.string() for n in head.schema.names}
        head.close()
    stream = pa.input_stream(str(path), compression="detect")
    reader = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=ENTITY_LINE_BYTES),
                            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True))
    try:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowInvalid as e:
                if "conversion error" in str(e) and not text:
                    raise _TypeChanged(str(e)) from None
                raise
            yield batch
    finally:
        reader.close()


def _frame_table(df: pd.DataFrame) -> pa.Table:
    try:
        return pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column of mixed values: as text, as CSV would give it
        return pa.Table.from_pandas(df.astype({c: str for c in df.columns if df[c].dtype == object}),
                                    preserve_index=False)


def iter_entity_batches(path: Path, batch_rows: int = ENTITY_BATCH_ROWS, text: bool = False,
                        max_rows: int = MAX_ENTITY_ROWS) -> Iterator[pa.Table]:
    """The entity file as tables of about ``batch_rows`` rows, read as a stream: Parquet batch by batch (its
    declared row count checked first), CSV (optionally gzipped) block by block, JSON whole within its caps.
    ``text``: every CSV column as text (when a column's type changes after the first block). InputError for a
    file that cannot be read or passes ``max_rows``."""
    import pyarrow.parquet as pq

    from microstructure.output import InputError, read_frame

    if not path.is_file():
        raise InputError(f"no such entity file: {path}")
    name = path.name.lower()
    total = 0
    pending: list[pa.RecordBatch] = []
    size = 0
    try:
        if name.endswith((".parquet", ".pq")):
            pf = pq.ParquetFile(path)
            meta = pf.metadata
            declared = meta.num_rows
            groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
            if declared > max_rows or sum(g.num_rows for g in groups) != declared:
                raise InputError(f"entity file {path} declares {declared:,} rows; the cap is {max_rows:,}")
            # A row group is decoded a column chunk at a time: its declared size bounds what one read holds.
            big = max((g.total_byte_size for g in groups), default=0)
            if big > ENTITY_ROW_GROUP_BYTES:
                raise InputError(f"entity file {path} has a row group of {big >> 20:,} MiB uncompressed; at most "
                                 f"{ENTITY_ROW_GROUP_BYTES >> 20:,} MiB (write it with smaller row groups)")
            batches: Iterable[pa.RecordBatch] = pf.iter_batches(batch_size=min(batch_rows, 65_536))
        elif name.endswith((".json", ".json.gz")):
            df = read_frame(path, "entity", max_rows=min(max_rows, ENTITY_JSON_ROWS), max_bytes=ENTITY_JSON_BYTES)
            batches = _frame_table(df).to_batches(max_chunksize=batch_rows)
        else:
            batches = _csv_batches(path, text)
        for batch in batches:
            total += batch.num_rows
            if total > max_rows:
                raise InputError(f"entity file {path} has more than {max_rows:,} rows (the cap)")
            pending.append(batch)
            size += batch.num_rows
            if size >= batch_rows:
                yield pa.Table.from_batches(pending)
                pending, size = [], 0
        if pending:
            yield pa.Table.from_batches(pending)
    except (InputError, _TypeChanged):
        raise
    except pa.ArrowInvalid as e:
        msg = str(e).splitlines()[0]
        if "straddling" in msg:
            raise InputError(f"entity file {path} has a line longer than {ENTITY_LINE_BYTES:,} bytes") from None
        raise InputError(f"entity file {path} cannot be read: {msg}") from None
    except (OSError, EOFError, pa.ArrowException) as e:
        raise InputError(f"entity file {path} is truncated or not what its name says "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def write_training_set(store: FeatureStore, entities: Path, out: Path, service: str = "order_book_all",
                       batch_rows: int = ENTITY_BATCH_ROWS) -> tuple[int, int]:
    """The training set of an entity file (CSV, optionally gzipped, Parquet or JSON) written to ``out`` (Parquet
    for ``.parquet``/``.pq``, else CSV) in batches of ``batch_rows`` entity rows, each joined through Feast.
    Rows are written in the entity file's order; the file appears whole or not at all. Returns (rows, rows with
    features)."""
    import uuid

    from microstructure.output import InputError

    svc = store.get_feature_service(service)
    request = _request_columns(store, svc)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    try:
        try:
            counts = _write_batches(store, svc, request, entities, tmp, out, batch_rows, text=False)
        except _TypeChanged:  # a column's type changes after the first block: read every column as text
            counts = _write_batches(store, svc, request, entities, tmp, out, batch_rows, text=True)
        os.replace(tmp, out)
        return counts
    except pa.ArrowInvalid as e:  # a later batch whose values do not fit the first one's types
        raise InputError(f"entity file {entities} cannot be written out: {str(e).splitlines()[0]}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_batches(store: FeatureStore, svc: Any, request: list[str], entities: Path, tmp: Path, out: Path,
                   batch_rows: int, text: bool) -> tuple[int, int]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from microstructure.output import csv_table

    as_parquet = out.suffix.lower() in (".parquet", ".pq")
    writer: Any = None
    rows = joined = 0
    try:
        for batch in iter_entity_batches(entities, batch_rows, text=text):
            table = _normalise_batch(batch, rows)
            keys = table.select(["symbol", "event_timestamp", *request]).to_pandas()
            feats = _features_for(store, svc, keys)
            if writer is None:
                _check_names(table.column_names, feats)
            for name in feats.column_names:
                table = table.append_column(name, feats[name])
            if "event_ts" in feats.column_names:
                joined += feats.num_rows - feats["event_ts"].null_count
            rows += table.num_rows
            if not as_parquet:
                table = csv_table(table)
            if writer is None:
                schema = table.schema  # every batch is written with the first one's types
                writer = (pq.ParquetWriter(tmp, schema, compression="zstd") if as_parquet
                          else pacsv.CSVWriter(tmp, schema))
            writer.write_table(table if table.schema == schema else table.cast(schema))
        if writer is None:
            from microstructure.output import InputError

            raise InputError(f"entity file {entities} has no rows")
    finally:
        if writer is not None:
            writer.close()
    return rows, joined
