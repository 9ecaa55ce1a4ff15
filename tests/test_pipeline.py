"""The spine end to end on real DuckDB, Parquet, Great Expectations and Feast."""

from __future__ import annotations

import datetime as dt

import duckdb
import pandas as pd
import pyarrow as pa
import pytest

from microstructure.checks.ge import Checker
from microstructure.contract.book import KEY, SNAPSHOT_SCHEMA, table_from_quotes, validate
from microstructure.contract.schemas import FEATURE_NAMES
from microstructure.jobs.build import build_and_publish
from microstructure.jobs.poll import cycle_times, poll_cycles
from microstructure.jobs.publisher import OnlinePublisher
from microstructure.lake.compaction import compact, recover
from microstructure.lake.paths import FEATURES, FEATURES_QUARANTINE, SNAPSHOTS, LakePaths
from microstructure.lake.views import connect
from microstructure.lake.writer import PartitionWriter
from microstructure.sources.simulated import SimulatedSource, universe
from microstructure.store.lookup import read_online
from microstructure.store.repo import open_store
from microstructure.store.training import training_set
from tests.conftest import T0, book


def _offline(paths: LakePaths) -> pd.DataFrame:
    return duckdb.sql("SELECT * FROM read_parquet(?)", params=[paths.glob("features")]).df()


def test_online_and_offline_values_are_identical(polled):
    online = pa.concat_tables(polled["online"]).to_pandas()
    offline = _offline(polled["paths"])
    assert len(online) == len(offline) == polled["stats"].written
    m = online.merge(offline, on=["symbol", "event_ts"], suffixes=("_on", "_off"), validate="one_to_one")
    assert len(m) == len(online)
    for name in FEATURE_NAMES:
        if name == "event_ts":
            continue
        a, b = m[f"{name}_on"], m[f"{name}_off"]
        assert ((a == b) | (a.isna() & b.isna())).all(), name
    # The windowed features were exercised, not trivially zero.
    assert (offline["gap_pct"] > 0).any()


def test_feast_online_store_holds_the_last_cycle(polled):
    paths = polled["paths"]
    offline = _offline(paths)
    latest = offline.sort_values("received_ts").groupby("symbol").tail(1).set_index("symbol")
    now = latest["event_ts"].max().to_pydatetime() + dt.timedelta(seconds=3)
    rows = read_online(open_store(paths.data_dir), [*list(latest.index), "NOPE99"], freshness_s=10, now=now)
    for r in rows[:-1]:
        exp = latest.loc[r.symbol]
        assert r.found and r.features["spread_bps"] == exp["spread_bps"]
        assert r.features["order_imbalance"] == exp["order_imbalance"]
        # Feast keeps UnixTimestamp to the second: the age errs on the old side, never younger.
        assert 3 <= r.age_s < 4.01
        assert r.stale is False
    assert rows[-1].found is False and rows[-1].stale is True
    later = read_online(open_store(paths.data_dir), ["MEGA01"], freshness_s=10, now=now + dt.timedelta(seconds=30))
    assert later[0].stale is True


def test_lake_has_no_duplicates_and_only_complete_files(polled):
    paths = polled["paths"]
    con = connect(paths)
    n, distinct = con.sql("SELECT count(*), count(DISTINCT (symbol, event_ts, source)) FROM snapshots").fetchall()[0]
    assert n == distinct == polled["stats"].written
    assert not list(paths.root.rglob("*.tmp"))
    q = con.sql("SELECT reason, count(*) FROM quarantine GROUP BY ALL").fetchall()
    assert sum(c for _, c in q) == sum(polled["stats"].quarantined.values())


def test_rewriting_the_same_snapshots_adds_nothing(data_dir):
    paths = LakePaths(data_dir)
    clean = validate(table_from_quotes([book("A"), book("B")])).clean
    assert PartitionWriter(paths, SNAPSHOTS, KEY, SNAPSHOT_SCHEMA).write(clean).num_rows == 2
    # A fresh writer (a re-run, a new process) reads the keys back from the lake.
    again = PartitionWriter(paths, SNAPSHOTS, KEY, SNAPSHOT_SCHEMA)
    assert again.write(clean).num_rows == 0
    assert duckdb.sql("SELECT count(*) FROM read_parquet(?)", params=[paths.glob("snapshots")]).fetchall()[0][0] == 2


def test_compaction_merges_sorts_and_survives_a_crash(data_dir):
    paths = LakePaths(data_dir)
    w = PartitionWriter(paths, SNAPSHOTS, KEY, SNAPSHOT_SCHEMA)
    for i in range(5):
        w.write(validate(table_from_quotes(
            [book(s, event_ts=T0 + dt.timedelta(seconds=i)) for s in ("B", "A")])).clean)
    part = paths.partition(SNAPSHOTS, T0.date())
    before = sorted(part.glob("*.parquet"))
    assert len(before) == 5
    # Simulate a crash after the commit point: merged file in place, old files not yet deleted.
    assert compact(paths, SNAPSHOTS, T0.date(), KEY, ("symbol", "event_ts")) == (5, 1)
    t = duckdb.sql(f"SELECT symbol, event_ts FROM read_parquet('{part}/*.parquet')").fetchall()
    assert len(t) == 10 and t == sorted(t)
    # An interrupted compaction before its commit point leaves the partition as it was.
    staging = part / ".compacting"
    staging.mkdir()
    (staging / "plan.json").write_text('{"merged": "compacted-x.parquet", "replaces": ["nope.parquet"]}')
    recover(part)
    assert not staging.exists() and len(list(part.glob("*.parquet"))) == 1


def test_training_set_never_sees_a_book_received_after_the_entity_time(data_dir):
    """Adversarial latency: each book reaches us 30 s after its event time."""
    paths = LakePaths(data_dir)
    lag = dt.timedelta(seconds=30)
    quotes = [book("A", ((100.0 + i, 10),), ((100.5 + i, 10),), event_ts=T0 + dt.timedelta(seconds=10 * i),
                   received_ts=T0 + dt.timedelta(seconds=10 * i) + lag) for i in range(10)]
    w = PartitionWriter(paths, SNAPSHOTS, KEY, SNAPSHOT_SCHEMA)
    w.write(validate(table_from_quotes(quotes)).clean)
    res = build_and_publish(paths, None, None)
    assert res[0].published
    ent_times = [T0 + dt.timedelta(seconds=s) for s in (5, 29.999, 30, 45, 59.9999, 95, 420, 420.001)]
    ents = pd.DataFrame({"symbol": "A", "event_timestamp": ent_times, "label": range(len(ent_times))})
    out = training_set(open_store(data_dir), ents)
    assert out["label"].tolist() == list(range(len(ent_times)))  # labels pass through, in order
    known = {q.event_ts: q.received_ts for q in quotes}
    for t, ev in zip(ent_times, out["event_ts"], strict=True):
        if pd.isna(ev):
            continue
        assert known[ev.to_pydatetime()] <= t  # the book was in our hands at the entity time
    got = [None if pd.isna(e) else e.to_pydatetime() for e in out["event_ts"]]
    # At T0+29.999 s nothing had arrived; at T0+30 s exactly the first book had. The last book arrived
    # at T0+120 s: the view's 5-minute TTL still serves it at T0+420 s and hides it just after.
    assert got == [None, None, T0, T0 + dt.timedelta(seconds=10), T0 + dt.timedelta(seconds=20),
                   T0 + dt.timedelta(seconds=60), T0 + dt.timedelta(seconds=90), None]


def test_a_batch_failing_its_checks_is_quarantined_not_published(data_dir):
    paths = LakePaths(data_dir)
    w = PartitionWriter(paths, SNAPSHOTS, KEY, SNAPSHOT_SCHEMA)
    ok = [book("A", event_ts=T0 + dt.timedelta(seconds=i)) for i in range(3)]
    # Valid as a book, but the vendor handed it to us 20 minutes late: fails the freshness check.
    stale = book("S", event_ts=T0, received_ts=T0 + dt.timedelta(minutes=20))
    w.write(validate(table_from_quotes([*ok, stale])).clean)
    res = build_and_publish(paths, None, Checker(data_dir / "gx"))
    assert not res[0].published
    assert any("lag_s" in r for r in res[0].reasons)
    assert not paths.has(FEATURES)
    assert list(paths.dataset(FEATURES_QUARANTINE).glob("*/*.json"))
    assert (data_dir / "gx" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html").exists()


def test_online_batch_failing_checks_is_not_pushed(data_dir):
    paths = LakePaths(data_dir)
    pub = OnlinePublisher(paths, open_store(data_dir), Checker())
    stale = validate(table_from_quotes([book("S", event_ts=T0, received_ts=T0 + dt.timedelta(minutes=20))])).clean
    pub.add_cycle(stale)
    pub.flush()
    assert pub.pushed == 0 and sum(pub.rejected.values()) == 1
    assert read_online(open_store(data_dir), ["S"])[0].found is False
    assert paths.has(FEATURES_QUARANTINE)


def test_simulated_source_is_deterministic_and_informative():
    times = list(cycle_times(T0, 2.0, 400, 0))

    def run(seed):
        s = SimulatedSource(seed=seed)
        return pa.concat_tables([validate(s.poll(universe(), t).raw).clean for t in times])

    a, b = run(3), run(3)
    assert a.equals(b)
    assert not a.equals(run(4))
    df = a.to_pandas()
    df["mid"] = (df.bid_px_1 + df.ask_px_1) / 2
    df["imb"] = (df.bid_sz_1 - df.ask_sz_1) / (df.bid_sz_1 + df.ask_sz_1)
    df = df.sort_values(["symbol", "received_ts"])
    df["next_move"] = df.groupby("symbol")["mid"].shift(-1) - df["mid"]
    moved = df[df["next_move"].fillna(0) != 0]
    hit = ((moved["imb"] > 0) == (moved["next_move"] > 0)).mean()
    assert hit > 0.6  # imbalance carries real information about the next move
    spread = (df.ask_px_1 - df.bid_px_1) / df.mid * 1e4
    assert spread.min() < 1.5 and spread.max() > 250
    assert df["halted"].any()


def test_simulated_state_round_trips(tmp_path):
    s = SimulatedSource(seed=5)
    s.poll(universe(), T0)
    s.save(tmp_path / "s.npz")
    r = SimulatedSource.load(tmp_path / "s.npz")
    t1 = T0 + dt.timedelta(seconds=2)
    assert s.poll(universe(), t1).raw.to_pandas().equals(r.poll(universe(), t1).raw.to_pandas())  # NaN-aware


def test_unknown_symbol_is_quarantined_not_dropped(data_dir):
    paths = LakePaths(data_dir)
    stats = poll_cycles(paths, SimulatedSource(seed=1), ["MEGA01", "NOPE"], iter([T0]))
    assert stats.written == 1 and stats.quarantined["unknown_symbol"] == 1


@pytest.mark.parametrize("cycles", [1])
def test_poll_writes_hive_partitions(data_dir, cycles):
    paths = LakePaths(data_dir)
    poll_cycles(paths, SimulatedSource(seed=1), universe()[:3], cycle_times(T0, 2, cycles, 0))
    assert (data_dir / "lake" / "snapshots" / f"date={T0.date()}").is_dir()


def test_online_cycle_quarantines_a_stale_row_and_serves_the_others(data_dir):
    from microstructure.checks.sql import SqlChecker

    paths = LakePaths(data_dir)
    store = open_store(data_dir)
    pub = OnlinePublisher(paths, store, SqlChecker())
    stale = book("S", event_ts=T0, received_ts=T0 + dt.timedelta(minutes=20))
    fresh = book("F", event_ts=T0 + dt.timedelta(minutes=20), received_ts=T0 + dt.timedelta(minutes=20))
    pub.add_cycle(validate(table_from_quotes([stale, fresh])).clean)
    pub.flush()
    assert pub.pushed == 1 and pub.rejected == {"expect_column_values_to_be_between(lag_s)": 1}
    s, f = read_online(store, ["S", "F"])
    assert not s.found and f.found
    q = duckdb.sql("SELECT symbol, reason FROM read_parquet(?)",
                   params=[paths.glob(FEATURES_QUARANTINE)]).fetchall()
    assert q == [("S", "expect_column_values_to_be_between(lag_s)")]
