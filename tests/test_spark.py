"""Spark for the batch path, in local[2] (Java 17): the same features.sql over the same lake gives the same
features as DuckDB, and Feast's Spark offline store gives the same training rows as our DuckDB ASOF store.
Both through the real CLI, as a user runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration  # Spark in local[2], through the CLI

pytest.importorskip("pyspark", reason="Spark tests need requirements-spark.lock (.ci/run installs it)")


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "microstructure", *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def lake_copy(polled, tmp_path_factory):
    d = tmp_path_factory.mktemp("spark") / "data"
    shutil.copytree(polled["paths"].data_dir, d, ignore=shutil.ignore_patterns("feast", "gx"))
    return d


def test_build_features_on_spark_equals_duckdb(lake_copy):
    (features,) = sorted((lake_copy / "lake" / "features").glob("date=*/features.parquet"))
    duck = pq.read_table(features)
    cli("build-features", "--data-dir", str(lake_copy), "--engine", "spark", "--json")
    spark = pq.read_table(features)
    assert spark.num_rows == duck.num_rows > 1000
    assert spark.equals(duck)  # bit for bit, every column (the windows included)
    assert duck.column("gap_pct").to_numpy().max() > 0


def _entities(features: pd.DataFrame) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    syms = [*sorted(features["symbol"].unique()), "NOPE"]
    lo, hi = features["received_ts"].min(), features["received_ts"].max()
    n = 2000
    ts = lo + pd.to_timedelta(rng.uniform(-60, (hi - lo).total_seconds() + 400, n), unit="s")
    ents = pd.DataFrame({"symbol": rng.choice(syms, n), "event_timestamp": ts.floor("us")})
    # Entity times exactly on a book's receive time (the boundary of "had it in hand").
    exact = features.sample(200, random_state=1)
    ents = pd.concat([ents, pd.DataFrame({"symbol": exact["symbol"].to_numpy(),
                                          "event_timestamp": exact["received_ts"].to_numpy()})])
    ents["label"] = rng.integers(0, 2, len(ents))
    ents["event_timestamp"] = pd.to_datetime(ents["event_timestamp"], utc=True)
    return ents.reset_index(drop=True)


def test_training_set_through_feasts_spark_store_equals_duckdb(lake_copy, tmp_path):
    import duckdb

    feats = duckdb.sql(f"SELECT symbol, received_ts FROM read_parquet('{lake_copy}/lake/features/*/*.parquet')").df()
    ents = _entities(feats)
    ents.to_parquet(tmp_path / "ents.parquet")
    cli("training-set", "--entities", str(tmp_path / "ents.parquet"), "--out", str(tmp_path / "duck.parquet"),
        "--data-dir", str(lake_copy))
    spark_env = {"MICROSTRUCTURE_OFFLINE_STORE": "spark"}
    cli("training-set", "--entities", str(tmp_path / "ents.parquet"), "--out", str(tmp_path / "spark.parquet"),
        "--data-dir", str(lake_copy), env=spark_env)
    assert "type: spark" in (lake_copy / "feast" / "feature_store.yaml").read_text()
    duck = pd.read_parquet(tmp_path / "duck.parquet")
    spark = pd.read_parquet(tmp_path / "spark.parquet")
    assert len(spark) == len(duck) == len(ents)
    assert duck["event_ts"].notna().sum() > 1000 and duck["event_ts"].isna().sum() > 0
    cols = list(duck.columns)
    spark = spark[cols]
    for df in (duck, spark):  # the same instants; Spark's frame carries them in ns, ours in µs
        for c in df.columns:
            if pd.api.types.is_datetime64_any_dtype(df[c]):
                t = df[c] if isinstance(df[c].dtype, pd.DatetimeTZDtype) else df[c].dt.tz_localize("UTC")
                df[c] = t.dt.tz_convert("UTC").astype("datetime64[us, UTC]")
    pd.testing.assert_frame_equal(spark, duck, check_dtype=False)
