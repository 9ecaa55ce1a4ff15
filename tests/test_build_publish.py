"""The batch build publishes a day's features only when the day passes its checks; a failing batch is
quarantined with its reasons and its Data Docs."""

from __future__ import annotations

import datetime as dt

import pytest

from microstructure.checks.ge import Checker
from microstructure.contract.book import KEY, SNAPSHOT_SCHEMA, table_from_quotes, validate
from microstructure.jobs.build import build_and_publish
from microstructure.lake.paths import FEATURES, FEATURES_QUARANTINE, SNAPSHOTS, LakePaths
from microstructure.lake.writer import PartitionWriter
from tests.conftest import T0, book

# Great Expectations validates the day and renders its Data Docs site: seconds.
pytestmark = pytest.mark.integration


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
