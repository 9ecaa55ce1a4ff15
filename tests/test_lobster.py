"""Replay of the real LOBSTER AAPL sample (../shared/data/lobster) into the lake and features."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from microstructure.contract.book import validate
from microstructure.jobs import build as pipeline
from microstructure.recorded.lobster import read_lobster

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "lobster"
pytestmark = pytest.mark.skipif(not SAMPLE.exists(), reason="shared LOBSTER sample not present")


def test_lobster_sample_becomes_valid_ten_level_snapshots():
    raw = read_lobster(SAMPLE, cadence_s=1.0)
    v = validate(raw)
    assert v.quarantine.num_rows == 0
    t = v.clean.to_pandas()
    assert len(t) == 49  # 34201 s .. 34249 s after midnight
    assert (t["book_levels"] == 10).all() and t["symbol"].eq("AAPL").all() and t["source"].eq("lobster").all()
    # Hand-checked against the files: the first 4 ms grid point (34200.008 s after midnight, New York time)
    # holds the book after the third message (34200.004447484 s).
    first = read_lobster(SAMPLE, cadence_s=0.004).to_pandas().iloc[0]
    assert first["event_ts"] == dt.datetime(2012, 6, 21, 13, 30, 0, 4447, tzinfo=dt.UTC)
    assert first["received_ts"] == dt.datetime(2012, 6, 21, 13, 30, 0, 8000, tzinfo=dt.UTC)
    assert first["ask_px_1"] == 585.94 and first["ask_sz_1"] == 200
    assert first["bid_px_1"] == 585.33 and first["bid_sz_1"] == 18
    assert (t["received_ts"] >= t["event_ts"]).all()


@pytest.mark.integration  # the CLI's backfill in subprocesses
def test_backfill_is_idempotent_and_builds_features(data_dir):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "microstructure", "backfill", str(SAMPLE), "--format", "lobster",
           "--data-dir", str(data_dir), "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True)
    second = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert '"written": 48' in first.stdout and '"written": 0' in second.stdout
    from microstructure.lake.paths import LakePaths

    res = pipeline.build_and_publish(LakePaths(data_dir))
    assert res[0].published and res[0].features == 48
