"""The ASOF offline store returns exactly the rows of Feast's stock DuckDB store (real Feast, real Parquet).

Adversarial data: ties on the timestamp decided by the created column, TTL boundaries ±1 µs, entity rows
before any data, unknown symbols, duplicate entity rows, field and join-key mapping, an aliased projection,
a view without TTL, an on-demand view, full and short feature names.
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feast import Entity, FeatureService, FeatureStore, FeatureView, Field, FileSource, ValueType
from feast.data_format import ParquetFormat
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64, Int64, String

T0 = dt.datetime(2026, 3, 2, 14, 30, tzinfo=dt.UTC)
US = dt.timedelta(microseconds=1)
TS = pa.timestamp("us", tz="UTC")


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
        ("sym", pa.string()), ("ts", TS), ("created", TS), ("x", pa.float64()), ("n", pa.int64()),
        ("label", pa.string())])), path)


def _data(root: Path) -> None:
    a = []
    for s, base in (("AAA", 0), ("BBB", 100)):
        for i in range(6):
            t = T0 + dt.timedelta(seconds=10 * i)
            a.append({"sym": s, "ts": t, "created": t, "x": base + i + 0.25, "n": base + i, "label": f"{s}{i}"})
    # A tie on the timestamp: the later created row must win, in both stores.
    a.append({"sym": "AAA", "ts": T0 + dt.timedelta(seconds=20), "created": T0 + dt.timedelta(seconds=21),
              "x": 99.5, "n": 99, "label": "AAA2-late"})
    a.append({"sym": "AAA", "ts": T0 + dt.timedelta(seconds=20), "created": T0 + dt.timedelta(seconds=19),
              "x": -1.0, "n": -1, "label": "AAA2-early"})
    a.append({"sym": "AAA", "ts": T0 + dt.timedelta(seconds=30), "created": T0, "x": None, "n": None,
              "label": None})
    _write(root / "a" / "date=2026-03-02" / "part-0.parquet", a[: len(a) // 2])
    _write(root / "a" / "date=2026-03-02" / "part-1.parquet", a[len(a) // 2:])
    rng = random.Random(5)
    b = [{"sym": rng.choice(["AAA", "BBB", "CCC"]), "ts": T0 + dt.timedelta(microseconds=rng.randrange(10**8)),
          "created": T0, "x": rng.random(), "n": rng.randrange(100), "label": "b"} for _ in range(300)]
    # No created column on this view: keep its timestamps unique per key (Feast's own tie order is undefined).
    seen, uniq = set(), []
    for r in b:
        if (r["sym"], r["ts"]) not in seen:
            seen.add((r["sym"], r["ts"]))
            uniq.append(r)
    _write(root / "b" / "part-0.parquet", uniq)


def _objects(root: Path) -> tuple[list, dict]:
    symbol = Entity(name="symbol", join_keys=["symbol"], value_type=ValueType.STRING)
    src_a = FileSource(name="a_src", path=str(root / "a" / "*" / "*.parquet"), file_format=ParquetFormat(),
                       timestamp_field="ts", created_timestamp_column="created", field_mapping={"sym": "symbol"})
    src_b = FileSource(name="b_src", path=str(root / "b" / "*.parquet"), file_format=ParquetFormat(),
                       timestamp_field="ts", field_mapping={"sym": "symbol", "x": "bx"})
    fa = FeatureView(name="fa", entities=[symbol], ttl=dt.timedelta(seconds=15), source=src_a, online=False,
                     schema=[Field(name="x", dtype=Float64), Field(name="n", dtype=Int64),
                             Field(name="label", dtype=String)])
    fb = FeatureView(name="fb", entities=[symbol], ttl=dt.timedelta(0), source=src_b, online=False,
                     schema=[Field(name="bx", dtype=Float64), Field(name="n", dtype=Int64)])

    @on_demand_feature_view(sources=[fa[["x"]]], schema=[Field(name="x2", dtype=Float64)], mode="pandas")
    def doubled(inputs):  # type: ignore[no-untyped-def]
        col = next(c for c in inputs.columns if c.endswith("x"))
        return pd.DataFrame({"x2": inputs[col] * 2})

    services = {
        "plain": FeatureService(name="plain", features=[fa, fb[["bx"]]]),
        # fb joined on another entity column and under another name.
        "mapped": FeatureService(name="mapped", features=[
            fa[["x", "label"]], fb.with_name("other").with_join_key_map({"symbol": "other_symbol"}), doubled]),
    }
    return [symbol, fa, fb, doubled, *services.values()], services


def _store(root: Path, name: str, offline_type: str) -> FeatureStore:
    repo = root / name
    repo.mkdir()
    (repo / "feature_store.yaml").write_text(
        f"project: parity\nprovider: local\nregistry: {repo}/registry.db\n"
        f"online_store:\n  type: sqlite\n  path: {repo}/online.db\n"
        f"offline_store:\n  type: {offline_type}\nentity_key_serialization_version: 3\n")
    return FeatureStore(repo_path=str(repo))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    _data(root / "data")
    objs, services = _objects(root / "data")
    stock = _store(root, "stock", "duckdb")
    asof = _store(root, "asof", "microstructure.store.asof_offline.AsofDuckDBOfflineStore")
    for s in (stock, asof):
        s.apply(objs)
    return stock, asof, services


def _entities() -> pd.DataFrame:
    rows = []
    for s in ("AAA", "BBB", "ZZZ"):
        for base in range(0, 80, 5):
            for d in (-US, dt.timedelta(0), US):
                t = T0 + dt.timedelta(seconds=base) + d
                rows.append({"symbol": s, "other_symbol": "CCC" if s == "ZZZ" else s, "event_timestamp": t})
        # TTL boundary of the row at T0+50 s: 15 s later it is still served, 1 µs after that it is not.
        for d in (-US, dt.timedelta(0), US):
            rows.append({"symbol": s, "other_symbol": "AAA", "event_timestamp": T0 + dt.timedelta(seconds=65) + d})
    rows.append({"symbol": "AAA", "other_symbol": "AAA", "event_timestamp": T0 - dt.timedelta(days=1)})
    rows += rows[:7]  # duplicate entity rows
    df = pd.DataFrame(rows)
    df["event_timestamp"] = pd.to_datetime(df["event_timestamp"], utc=True)
    df["rid"] = range(len(df))
    return df.sample(frac=1.0, random_state=3).reset_index(drop=True)  # no order to lean on


def _get(store: FeatureStore, features, full: bool) -> pd.DataFrame:
    ent = _entities()
    out = store.get_historical_features(entity_df=ent, features=features, full_feature_names=full).to_df()
    return out.sort_values("rid").reset_index(drop=True)


# Feature refs only with full names: fa:n and fb:n collide otherwise (Feast refuses that in both stores).
@pytest.mark.parametrize(("which", "full"), [("plain", False), ("plain", True), ("mapped", False), ("mapped", True),
                                             ("refs", True)])
def test_asof_store_equals_feast_stock_store(stores, which, full):
    stock, asof, _ = stores
    if which == "refs":
        features = ["fa:x", "fa:n", "fa:label", "fb:bx", "fb:n", "doubled:x2"]
    else:
        features = stock.get_feature_service(which)
    want = _get(stock, features if which == "refs" else stock.get_feature_service(which), full)
    got = _get(asof, features if which == "refs" else asof.get_feature_service(which), full)
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    # The data really exercised every case.
    xcol = "fa__x" if full else "x"
    assert want[xcol].notna().any() and want[xcol].isna().any()
    assert (want.filter(like="label") == "AAA2-late").any().any()
    assert not (want.filter(like="label") == "AAA2-early").any().any()


def test_rows_come_back_in_the_entity_frames_order(stores):
    _, asof, _ = stores
    ent = _entities()
    job = asof.get_historical_features(entity_df=ent, features=asof.get_feature_service("plain"))
    assert type(job).__name__ == "AsofRetrievalJob"  # the ASOF path, not the stock fallback
    out = job.to_df()
    assert out["rid"].tolist() == ent["rid"].tolist()


def test_ttl_boundary_is_inclusive_to_the_microsecond(stores):
    _, asof, _ = stores
    t = T0 + dt.timedelta(seconds=50)
    ent = pd.DataFrame({"symbol": ["BBB"] * 3, "event_timestamp": pd.to_datetime(
        [t + dt.timedelta(seconds=15) - US, t + dt.timedelta(seconds=15), t + dt.timedelta(seconds=15) + US],
        utc=True)})
    out = asof.get_historical_features(entity_df=ent, features=["fa:n"]).to_df()
    assert out["n"].tolist()[:2] == [105, 105] and pd.isna(out["n"].iloc[2])
