"""Inputs that would exhaust memory: bombs, huge lists, huge declared row counts, and training sets larger than RAM.

Each attack runs the real CLI in a subprocess. Peak RSS is measured by the test itself: a fresh wrapper process
runs the command as its only child and reports ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``; the bound is a
baseline run of the same command on a small file (measured the same way) plus the documented cap.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from microstructure.sources.symbol_lists import MAX_SYMBOLS
from microstructure.trading.picks import MAX_PICKS, MAX_PICKS_BYTES

# The CLI in subprocesses, its peak RSS measured; the one in-process test applies two Feast stores and joins.
pytestmark = pytest.mark.integration

MiB = 1 << 20

_WRAPPER = """
import json, resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=900)
print(json.dumps({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr,
                  "peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def cli_peak(*args: object) -> dict:
    """The CLI's exit code, output and peak RSS in bytes (Linux reports ru_maxrss in KiB)."""
    p = subprocess.run([sys.executable, "-c", _WRAPPER, sys.executable, "-m", "microstructure", *map(str, args)],
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def cli(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                       timeout=1200)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr[-2000:]}")
    return p


def one_error_line(r: dict | subprocess.CompletedProcess, *expected: str) -> None:
    rc, err = (r["rc"], r["stderr"]) if isinstance(r, dict) else (r.returncode, r.stderr)
    assert rc == 2, err
    assert err.startswith("error:") and err.count("\n") == 1, err
    for e in expected:
        assert e in err, err
    assert "Traceback" not in err


def gzip_bomb(path: Path, header: bytes, line: bytes, expanded: int) -> None:
    """A gzip file of ``expanded`` bytes once decompressed, written without ever holding them: one compressed
    member of 1 MiB of ``line`` repeated (gzip allows concatenated members), plus the header in front."""
    chunk = line * (MiB // len(line))
    member = gzip.compress(chunk, compresslevel=9)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(header))
        for _ in range(expanded // len(chunk)):
            fh.write(member)


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def forge_row_count(path: Path, rows: int, claimed: int) -> None:
    """Rewrite a Parquet footer so that it declares ``claimed`` rows where ``rows`` were written: the file's, the
    row group's and each column chunk's count and level histogram (Thrift compact i64s, zigzag varints). The data
    pages stay small."""
    data = path.read_bytes()
    n = int.from_bytes(data[-8:-4], "little")
    footer = data[-8 - n: -8]
    old, new = _varint(rows * 2), _varint(claimed * 2)
    ncols = pq.ParquetFile(path).metadata.num_columns
    assert footer.count(old) == 2 + 2 * ncols, "pick another row count: the pattern occurs elsewhere"
    footer = footer.replace(old, new)
    path.write_bytes(data[: -8 - n] + footer + len(footer).to_bytes(4, "little") + b"PAR1")
    assert pq.ParquetFile(path).metadata.num_rows == claimed


# ---- picks ---------------------------------------------------------------------------------------------------
def test_a_gzip_picks_bomb_is_refused_before_it_expands(tmp_path):
    # A few MB on disk, 1.7 GB decompressed (85M rows): read whole, it took gigabytes.
    bomb = tmp_path / "picks.csv.gz"
    gzip_bomb(bomb, b"symbol,side,score,mode\n", b"MEGA01,buy,0.5,SAFE\n", 1700 * MiB)
    assert bomb.stat().st_size < 8 * MiB
    small = tmp_path / "small.csv.gz"
    small.write_bytes(gzip.compress(b"symbol,score\nMEGA01,0.5\n"))  # refused after reading: lacks `side`
    base = cli_peak("picks", "--in", small, "--data-dir", tmp_path / "none")
    one_error_line(base, "lacks column(s) ['side']")
    r = cli_peak("picks", "--in", bomb, "--data-dir", tmp_path / "none")
    one_error_line(r, "larger than 32 MiB decompressed", "the cap for a picks file")
    assert r["peak"] < base["peak"] + MAX_PICKS_BYTES + 64 * MiB, (r["peak"], base["peak"])


def test_a_picks_file_with_more_rows_than_the_cap_is_refused(tmp_path):
    f = tmp_path / "picks.csv"
    f.write_text("symbol,side,score\n" + "MEGA01,buy,0.5\n" * (MAX_PICKS + 1))
    one_error_line(cli("picks", "--in", f, "--data-dir", tmp_path / "none", check=False),
                   f"more than {MAX_PICKS:,} rows")


def test_a_picks_parquet_declaring_a_billion_rows_is_refused_from_its_footer(tmp_path):
    f = tmp_path / "picks.parquet"
    rows = 1234
    pq.write_table(pa.table({"symbol": ["MEGA01"] * rows, "side": ["buy"] * rows, "score": [0.5] * rows}), f,
                   write_statistics=False)
    forge_row_count(f, rows, 10**9)
    one_error_line(cli("picks", "--in", f, "--data-dir", tmp_path / "none", check=False),
                   f"more than {MAX_PICKS:,} rows")


def test_a_picks_symbol_of_a_mebibyte_is_refused_not_echoed(tmp_path):
    f = tmp_path / "picks.csv"
    f.write_text("symbol,side,score\nMEGA01,buy,0.5\n" + "A" * MiB + ",buy,0.5\n")
    p = cli("picks", "--in", f, "--data-dir", tmp_path / "none", check=False)
    one_error_line(p, "row 2: symbol is 1,048,576 characters long; at most 32")
    assert len(p.stderr) < 400


# ---- symbol lists --------------------------------------------------------------------------------------------
def test_a_hundred_thousand_symbols_to_poll_are_refused(tmp_path):
    syms = tmp_path / "symbols.txt"
    syms.write_text("\n".join(f"S{i:05d}" for i in range(100_000)))
    d = tmp_path / "data"
    p = cli("poll", "--data-dir", d, "--symbols-file", syms, "--cycles", 1, "--interval", 0, "--no-online",
            check=False)
    one_error_line(p, f"at most {MAX_SYMBOLS:,}", "polygon-market")
    assert not (d / "lake").exists()  # refused before anything was polled


def test_more_symbols_than_the_cap_on_polls_command_line_are_refused(tmp_path):
    args = [a for i in range(MAX_SYMBOLS + 1) for a in ("--symbol", f"S{i:05d}")]
    d = tmp_path / "data"
    p = cli("poll", "--data-dir", d, *args, "--cycles", 1, "--interval", 0, "--no-online", check=False)
    one_error_line(p, f"{MAX_SYMBOLS + 1:,} symbols", f"at most {MAX_SYMBOLS:,}")
    assert not (d / "lake").exists()


@pytest.mark.parametrize("symbol", ["AAPL,MSFT", "AAPL MSFT", "AAPL\x1b[2J", "A" * 33, "../../etc"])
def test_a_symbol_that_would_change_a_vendor_request_is_refused(tmp_path, symbol):
    d = tmp_path / "data"
    p = cli("poll", "--data-dir", d, "--source", "polygon", "--symbol", "AAPL", "--symbol", symbol, "--cycles", 1,
            "--interval", 0, "--no-online", check=False)
    one_error_line(p, "symbol")
    assert "\x1b" not in p.stderr and not (d / "lake").exists()


def test_a_symbols_file_of_a_gigabyte_is_refused_unread(tmp_path):
    syms = tmp_path / "symbols.txt"
    with open(syms, "wb") as fh:  # sparse: a gigabyte on paper, nothing on disk
        fh.truncate(1 << 30)
    r = cli_peak("poll", "--data-dir", tmp_path / "data", "--source", "polygon", "--symbols-file", syms,
                 "--cycles", 1, "--interval", 0, "--no-online")
    one_error_line(r, "larger than 4 MiB")
    assert r["peak"] < 512 * MiB


def test_online_with_more_symbols_than_the_cap_is_refused(tmp_path):
    p = cli("online", *[f"S{i:05d}" for i in range(MAX_SYMBOLS + 1)], "--data-dir", tmp_path, check=False)
    one_error_line(p, f"at most {MAX_SYMBOLS:,}")


# ---- entity files and training sets ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bounds") / "data"
    cli("run", "--data-dir", d, "--cycles", 60, "--symbols", 10, "--json")
    return d


def _entities(d: Path, n: int, seed: int) -> pd.DataFrame:
    """Entity rows over the lake's span and a minute either side: known and unknown symbols, exact feature
    times (ties on received_ts), and a label of each kind."""
    import duckdb

    feats = duckdb.execute("SELECT symbol, received_ts FROM read_parquet(?)",
                           [str(d / "lake" / "features" / "*" / "*.parquet")]).df()
    rng = np.random.default_rng(seed)
    lo, hi = feats["received_ts"].min(), feats["received_ts"].max()
    span = (hi - lo).total_seconds()
    syms = [*feats["symbol"].unique(), "NOPE"]
    ts = pd.Series(lo + pd.to_timedelta(rng.uniform(-60, span + 60, n), unit="s")).dt.tz_convert("UTC")
    exact = rng.random(n) < 0.1  # a tenth at a feature row's own time
    pick = feats.sample(n, replace=True, random_state=seed).reset_index(drop=True)
    sym = np.where(exact, pick["symbol"], rng.choice(syms, n))
    ts = ts.where(~exact, pick["received_ts"].dt.tz_convert("UTC"))
    return pd.DataFrame({"symbol": sym, "event_timestamp": ts.dt.floor("us"),
                         "label": rng.integers(0, 2, n), "note": rng.choice(["a", "=b", None], n)})


def test_an_entity_parquet_declaring_a_trillion_rows_is_refused_from_its_footer(lake, tmp_path):
    f = tmp_path / "entities.parquet"
    rows = 1234
    pq.write_table(pa.table({"symbol": ["MEGA01"] * rows,
                             "event_timestamp": pa.array([dt.datetime(2026, 1, 1, tzinfo=dt.UTC)] * rows,
                                                         pa.timestamp("us", "UTC"))}), f, write_statistics=False)
    forge_row_count(f, rows, 10**12)
    r = cli_peak("training-set", "--entities", f, "--out", tmp_path / "o.parquet", "--data-dir", lake)
    one_error_line(r, "declares 1,000,000,000,000 rows", "the cap is 100,000,000")
    assert not (tmp_path / "o.parquet").exists()
    assert r["peak"] < 1024 * MiB


def test_an_entity_csv_gzip_with_one_endless_line_is_refused(lake, tmp_path):
    bomb = tmp_path / "entities.csv.gz"
    gzip_bomb(bomb, b"symbol,event_timestamp,label\nMEGA01,2026-01-01T00:00:00Z,", b"x" * 64, 512 * MiB)
    r = cli_peak("training-set", "--entities", bomb, "--out", tmp_path / "o.csv", "--data-dir", lake)
    one_error_line(r, "a line longer than 1,048,576 bytes")
    assert not (tmp_path / "o.csv").exists() and not list(tmp_path.glob(".o.csv.*"))
    assert r["peak"] < 1024 * MiB


def test_a_json_entity_bomb_is_refused_before_it_expands(lake, tmp_path):
    bomb = tmp_path / "entities.json.gz"
    gzip_bomb(bomb, b"[", b" " * 64, 300 * MiB)
    r = cli_peak("training-set", "--entities", bomb, "--out", tmp_path / "o.csv", "--data-dir", lake)
    one_error_line(r, "larger than 256 MiB decompressed")
    assert r["peak"] < 1024 * MiB


def test_an_entity_csv_whose_column_changes_type_after_the_first_block_is_still_joined(lake, tmp_path):
    # Types are inferred from the first 1 MiB block; a later "x" in an integer column must not end the run.
    ents = _entities(lake, 60_000, 4)
    ents["label"] = ents["label"].astype(object)
    ents.loc[59_000, "label"] = "x"
    ents.to_csv(tmp_path / "e.csv", index=False)
    assert (tmp_path / "e.csv").stat().st_size > 2 * MiB
    p = cli("training-set", "--entities", tmp_path / "e.csv", "--out", tmp_path / "o.parquet", "--data-dir", lake)
    assert p.stderr.startswith("60000 rows")
    got = pd.read_parquet(tmp_path / "o.parquet")
    assert got["label"].tolist() == ents["label"].astype(str).tolist()  # read again as text, nothing lost
    assert got["event_ts"].notna().any()


@pytest.mark.parametrize("when", ["9999-01-01T00:00:00Z", "0001-01-01", "2262-04-12"])
def test_an_entity_time_pandas_cannot_hold_is_one_error_line(lake, tmp_path, when):
    f = tmp_path / "e.csv"
    f.write_text(f"symbol,event_timestamp\nMEGA01,2026-01-01T00:00:00Z\nMEGA01,{when}\n")
    p = cli("training-set", "--entities", f, "--out", tmp_path / "o.csv", "--data-dir", lake, check=False)
    one_error_line(p, "row 2")
    assert not (tmp_path / "o.csv").exists()


def test_training_set_memory_follows_the_batch_not_the_file_and_rows_equal_the_unbatched_join(lake, tmp_path):
    from microstructure.store.repo import open_store
    from microstructure.store.training import training_set

    small, big = _entities(lake, 40_000, 1), _entities(lake, 600_000, 2)
    for name, df in (("small", small), ("big", big)):
        df.to_parquet(tmp_path / f"{name}.parquet")
    base = cli_peak("training-set", "--entities", tmp_path / "small.parquet", "--out", tmp_path / "small.out.parquet",
                    "--data-dir", lake, "--batch-rows", 40_000)
    r = cli_peak("training-set", "--entities", tmp_path / "big.parquet", "--out", tmp_path / "big.out.parquet",
                 "--data-dir", lake, "--batch-rows", 40_000)
    assert base["rc"] == 0 and r["rc"] == 0, r["stderr"]
    # 15 times the rows in batches of the same size: memory stays that of one batch. Held whole, 600,000 joined
    # rows (25 columns, Arrow, pandas and the join's copies) take several hundred MB more.
    assert r["peak"] < base["peak"] + 96 * MiB, (r["peak"] / MiB, base["peak"] / MiB)
    got = pd.read_parquet(tmp_path / "big.out.parquet")
    want = training_set(open_store(lake), big)  # one Feast call, the whole frame
    assert len(got) == len(big) and got["label"].tolist() == big["label"].tolist()  # the file's order
    assert 0.5 < got["event_ts"].notna().mean() < 1.0  # joined, and some rows (NOPE, before the data) not
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


def test_batched_training_set_equals_feasts_stock_store_unbatched(lake, tmp_path):
    import yaml
    from feast import FeatureStore

    from microstructure.store.repo import FEATURE_REPO, open_store, store_yaml
    from microstructure.store.training import training_set, write_training_set

    ents = _entities(lake, 3_000, 3)
    ents.to_csv(tmp_path / "e.csv", index=False)
    ours = open_store(lake)
    rows, joined = write_training_set(ours, tmp_path / "e.csv", tmp_path / "o.parquet", batch_rows=700)
    got = pd.read_parquet(tmp_path / "o.parquet")
    cfg = yaml.safe_load(store_yaml(lake).read_text())
    cfg["offline_store"] = {"type": "duckdb"}  # Feast's own DuckDB store (ibis): the reference
    f = tmp_path / "stock.yaml"
    f.write_text(yaml.safe_dump(cfg))
    stock = FeatureStore(repo_path=str(FEATURE_REPO), fs_yaml_file=f)
    want = training_set(stock, ents)
    assert rows == len(ents) and joined == want["event_ts"].notna().sum() > 0
    assert want["event_ts"].isna().any()
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


# ---- the offline store: a quoted path, both join plans ---------------------------------------------------------
def _feast_repo(root: Path, data: Path, offline: str) -> object:
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
    from feast.data_format import ParquetFormat
    from feast.types import Float64, String

    repo = root / f"repo-{len(list(root.glob('repo-*')))}"
    repo.mkdir()
    (repo / "feature_store.yaml").write_text(yaml_dump({
        "project": "quoted", "provider": "local", "registry": str(repo / "registry.db"),
        "online_store": {"type": "sqlite", "path": str(repo / "online.db")}, "offline_store": offline,
        "entity_key_serialization_version": 3}))
    symbol = Entity(name="symbol", join_keys=["symbol"], value_type=ValueType.STRING)
    fa = FeatureView(name="fa", entities=[symbol], ttl=dt.timedelta(seconds=15), online=False,
                     source=FileSource(name="a_src", path=str(data / "a" / "*.parquet"), file_format=ParquetFormat(),
                                       timestamp_field="ts", created_timestamp_column="created",
                                       field_mapping={"sym": "symbol"}),
                     schema=[Field(name="x", dtype=Float64), Field(name="label", dtype=String)])
    fb = FeatureView(name="fb", entities=[symbol], ttl=dt.timedelta(0), online=False,  # no TTL: no lower bound
                     source=FileSource(name="b_src", path=str(data / "b" / "*.parquet"), file_format=ParquetFormat(),
                                       timestamp_field="ts", field_mapping={"sym": "symbol", "x": "y"}),
                     schema=[Field(name="y", dtype=Float64)])
    store = FeatureStore(repo_path=str(repo))
    store.apply([symbol, fa, fb])
    return store


def yaml_dump(obj: dict) -> str:
    import yaml

    return yaml.safe_dump(obj)


def _feature_files(data: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    t0 = pd.Timestamp("2026-03-02 14:30", tz="UTC")
    n = 3_000
    ts = t0 + pd.to_timedelta(rng.integers(0, 120_000_000, n), unit="us")
    a = pd.DataFrame({"sym": rng.choice(["AAA", "BBB", "CCC"], n), "ts": ts, "created": ts,
                      "x": rng.random(n), "label": rng.choice(["p", "q"], n)})
    # Ties on the timestamp: the later created row wins, so these (created earlier, x = -1) never show.
    tie = a.sample(300, random_state=seed).assign(created=lambda f: f["created"] - pd.Timedelta(seconds=1), x=-1.0)
    b = a.drop_duplicates(["sym", "ts"])[["sym", "ts", "x"]]
    for name, df in (("a", pd.concat([a, tie])), ("b", b)):
        (data / name).mkdir(parents=True)
        df.to_parquet(data / name / "part-0.parquet", index=False)


@pytest.mark.parametrize("window_bytes", [None, 0], ids=["narrow join", "one statement"])
def test_a_feature_source_path_with_a_quote_joins_like_feasts_stock_store(tmp_path, window_bytes):
    plain, quoted = tmp_path / "plain", tmp_path / "o'brien \"data\""
    for d in (plain, quoted):
        _feature_files(d, 7)
    ours_cfg: dict = {"type": "microstructure.store.asof_offline.AsofDuckDBOfflineStore"}
    if window_bytes is not None:
        ours_cfg["window_bytes"] = window_bytes
    stock = _feast_repo(tmp_path, plain, {"type": "duckdb"})
    ours = _feast_repo(tmp_path, quoted, ours_cfg)
    rng = np.random.default_rng(8)
    n = 4_000
    ents = pd.DataFrame({"symbol": rng.choice(["AAA", "BBB", "CCC", "ZZZ"], n),
                         "event_timestamp": pd.Timestamp("2026-03-02 14:30", tz="UTC")
                         + pd.to_timedelta(rng.integers(-10_000_000, 140_000_000, n), unit="us"),
                         "rid": np.arange(n)})
    feats = ["fa:x", "fa:label", "fb:y"]
    job = ours.get_historical_features(entity_df=ents, features=feats)
    assert type(job).__name__ == "AsofRetrievalJob"  # our store ran, not the stock fallback
    got = job.to_df()
    want = stock.get_historical_features(entity_df=ents, features=feats).to_df().sort_values("rid")
    assert got["rid"].tolist() == list(range(n))  # the entity frame's order
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True), check_dtype=False)
    assert want["x"].notna().any() and want["x"].isna().any()  # the TTL both served and expired rows
    assert want["y"].notna().mean() > want["x"].notna().mean()  # no TTL on fb: older rows still served
    assert not (want["x"] == -1.0).any()  # the tie rule held
