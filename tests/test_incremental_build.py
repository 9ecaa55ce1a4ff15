"""The nightly rebuild builds, publishes and compacts only the dates whose data changed since their last build (the
manifest ``lake/features/_published.json``); a night without new data touches no file; a bad manifest costs a full
rebuild, never a failure."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest

from microstructure.contract.book import KEY, SNAPSHOT_SCHEMA, table_from_quotes, validate
from microstructure.jobs.build import build_and_publish, changed_dates, manifest_path, read_manifest, rebuild
from microstructure.lake.paths import FEATURES, SNAPSHOTS, LakePaths
from microstructure.lake.writer import PartitionWriter
from tests.conftest import T0, book

D1 = T0.date()  # 2026-11-23
D2 = D1 + dt.timedelta(days=1)
D4 = D1 + dt.timedelta(days=3)  # not the day after a built date: its features reach back into nothing built here


def _write(paths: LakePaths, day: dt.date, seconds: range, symbol: str = "A") -> None:
    at = dt.datetime.combine(day, T0.timetz())
    quotes = [book(symbol, event_ts=at + dt.timedelta(seconds=s)) for s in seconds]
    PartitionWriter(paths, SNAPSHOTS, KEY, SNAPSHOT_SCHEMA).write(validate(table_from_quotes(quotes)).clean)


def _tree(d: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``d``: mtime (ns) and content digest."""
    return {str(f.relative_to(d)): (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
            for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.fixture
def lake(data_dir: Path) -> LakePaths:
    """Three dates of snapshots, each in several small files, built once."""
    paths = LakePaths(data_dir)
    for day in (D1, D2, D4):
        for k in range(3):
            _write(paths, day, range(10 * k, 10 * k + 10))
    first = rebuild(paths)
    assert [b.day for b in first.builds] == [D1, D2, D4] and all(b.published for b in first.builds)
    return paths


def test_a_night_without_new_data_touches_no_file_and_publishes_nothing(lake):
    before = _tree(lake.data_dir)
    assert changed_dates(lake) == []
    res = rebuild(lake)
    assert res.builds == [] and res.compacted == {}
    assert _tree(lake.data_dir) == before


def test_new_snapshots_on_one_date_rebuild_and_compact_only_that_date(lake):
    features = {d: lake.partition(FEATURES, d) / "features.parquet" for d in (D1, D2, D4)}
    stamp = {d: f.stat().st_mtime_ns for d, f in features.items()}
    n_before = _rows(features[D4])
    _write(lake, D4, range(100, 110), symbol="B")
    assert changed_dates(lake) == [D4]
    res = rebuild(lake)
    assert [b.day for b in res.builds] == [D4] and res.builds[0].published
    assert {k.split("/")[1] for k in res.compacted} == {D4.isoformat()}
    assert len(lake.files(SNAPSHOTS, [D4])) == 1  # compacted: the new file merged with the old
    assert _rows(features[D4]) > n_before
    assert {d: f.stat().st_mtime_ns for d, f in features.items() if d != D4} == {d: stamp[d] for d in (D1, D2)}
    assert changed_dates(lake) == []


def test_a_changed_date_rebuilds_the_next_day_too(lake):
    # D2's features look 35 minutes back into D1: new rows on D1 rebuild D1 and D2, not D4.
    _write(lake, D1, range(200, 205), symbol="C")
    assert [b.day for b in rebuild(lake).builds] == [D1, D2]


@pytest.mark.parametrize("bad", [b"\x00\x01 not json", b"[1, 2]", b'{"version": 99, "dates": {}}',
                                 b'{"version": 1, "dates": {"2026-11-23": 5, "2026-11-24": {"fingerprint": 7}}}',
                                 b'{"version": 1, "dates": "__import__(\'os\')"}', b""])
def test_a_bad_manifest_means_a_full_rebuild_not_a_failure(lake, bad):
    manifest_path(lake).write_bytes(bad)
    res = rebuild(lake)
    assert [b.day for b in res.builds] == [D1, D2, D4] and all(b.published for b in res.builds)
    assert set(read_manifest(lake)) == {d.isoformat() for d in (D1, D2, D4)}
    assert json.loads(manifest_path(lake).read_bytes())["version"] == 1


def test_a_manifest_entry_gone_rebuilds_that_date_only(lake):
    doc = json.loads(manifest_path(lake).read_bytes())
    del doc["dates"][D2.isoformat()]
    manifest_path(lake).write_text(json.dumps(doc))
    assert [b.day for b in rebuild(lake).builds] == [D2]


def test_explicit_dates_still_build_what_is_asked(lake):
    # `build-features --date D` calls build_and_publish: the manifest never stops it.
    f = lake.partition(FEATURES, D1) / "features.parquet"
    t = f.stat().st_mtime_ns
    assert [r.day for r in build_and_publish(lake, [D1])] == [D1]
    assert f.stat().st_mtime_ns != t
    assert [b.day for b in rebuild(lake, [D2]).builds] == [D2]


def _rows(f: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(f).metadata.num_rows


@pytest.mark.integration  # a temporary Prefect server
def test_the_nightly_flow_does_nothing_on_a_night_without_new_data(lake):
    from microstructure.flows.pipeline import build_features_flow
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        before = _tree(lake.root)
        assert build_features_flow(str(lake.data_dir)) == []
        assert _tree(lake.root) == before
        _write(lake, D2, range(300, 302), symbol="D")
        res = build_features_flow(str(lake.data_dir))
        assert [r["date"] for r in res] == [D2.isoformat()] and res[0]["published"]
