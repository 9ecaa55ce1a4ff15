"""A training set is point-in-time: an entity row sees only books we had received by its time, within the
view's TTL, with its labels passed through in order (real Feast and the ASOF offline store)."""

from __future__ import annotations

import datetime as dt

import pandas as pd

from microstructure.contract.book import KEY, SNAPSHOT_SCHEMA, table_from_quotes, validate
from microstructure.jobs.build import build_and_publish
from microstructure.lake.paths import SNAPSHOTS, LakePaths
from microstructure.lake.writer import PartitionWriter
from microstructure.store.repo import open_store
from microstructure.store.training import training_set
from tests.conftest import T0, book


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
