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
PUSH_SOURCE = "order_book_push"
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
    out = data_dir / "feast" / "feature_store.yaml"
    text = yaml.safe_dump(cfg, sort_keys=False)
    if not out.exists() or out.read_text() != text:
        from microstructure.lake import atomic_write_bytes

        atomic_write_bytes(text.encode(), out)
    return out


def _definitions_hash() -> str:
    import hashlib

    h = hashlib.sha256()
    for f in ("definitions.py", "feature_store.yaml"):
        h.update((FEATURE_REPO / f).read_bytes())
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
    digest = _definitions_hash()
    if apply and (not (data_dir / "feast" / "registry.db").exists() or not stamp.exists()
                  or stamp.read_text() != digest):
        import warnings

        with warnings.catch_warnings():  # Feast warns that on-demand views are "experimental" on every apply
            warnings.simplefilter("ignore")
            store.apply(feast_objects(data_dir))
        stamp.write_text(digest)
    _stores[data_dir] = store
    return store


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


def push_online(store: FeatureStore, features: pa.Table) -> int:
    """Write one cycle's feature rows to the online store (latest row per symbol wins)."""
    if features.num_rows == 0:
        return 0
    from feast.data_source import PushMode

    store.push(PUSH_SOURCE, _to_push_frame(features), to=PushMode.ONLINE)
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


def read_online(store: FeatureStore, symbols: list[str], freshness_s: float = FRESHNESS_S,
                now: dt.datetime | None = None, service: str = "order_book_all") -> list[OnlineRow]:
    """Online features per symbol with their age; Feast ignores TTL online, so staleness is judged here."""
    now = now or dt.datetime.now(dt.UTC)
    resp = store.get_online_features(features=store.get_feature_service(service),
                                     entity_rows=[{"symbol": s} for s in symbols]).to_dict()
    names = [k for k in resp if k != "symbol"]
    rows = []
    for i, sym in enumerate(symbols):
        feats = {k: resp[k][i] for k in names}
        ev = feats.get("event_ts")
        if isinstance(ev, (int, float)):
            ev = dt.datetime.fromtimestamp(ev, dt.UTC)
        if isinstance(ev, pd.Timestamp):
            ev = ev.to_pydatetime()
        if ev is not None and ev.tzinfo is None:
            ev = ev.replace(tzinfo=dt.UTC)
        found = any(v is not None for k, v in feats.items() if k != "event_ts") or ev is not None
        age = (now - ev).total_seconds() if ev is not None else None
        rows.append(OnlineRow(sym, found, feats, ev, age, stale=age is None or age > freshness_s))
    return rows


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
