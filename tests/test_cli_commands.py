"""The front door: every command run as a user would, in a subprocess, against one data dir (the shared
``ran`` fixture: a `microstructure run` of 60 cycles x 10 symbols)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

pytestmark = pytest.mark.integration  # every test runs the CLI in a subprocess


def cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr[-2000:]}")
    return p


def test_run_summary(ran):
    _d, s = ran
    assert s["poll"]["cycles"] == 60 and s["symbols"] == 10
    assert s["poll"]["written"] > 500
    assert all(b["published"] for b in s["builds"])
    assert len(s["online_sample"]) == 5
    # The replay's last cycle is stamped "now", so online rows are seconds old; the bound is loose on
    # purpose because a loaded CI box can take a while between the last poll and this read.
    assert all(0 <= r["age_s"] < 120 for r in s["online_sample"])


def test_sql_views_and_formats(ran):
    d, s = ran
    rows = json.loads(cli("sql", "SELECT count(*) AS n FROM snapshots", "--data-dir", d, "--json").stdout)
    assert rows == [{"n": s["poll"]["written"]}]
    csv = cli("sql", "SELECT symbol FROM features GROUP BY 1 ORDER BY 1", "--data-dir", d, "--csv").stdout
    assert csv.splitlines()[0] == "symbol" and len(csv.splitlines()) == 11
    q = json.loads(cli("sql", "SELECT count(*) AS n FROM quarantine", "--data-dir", d, "--json").stdout)
    assert q[0]["n"] == sum(s["poll"]["quarantined"].values())


def test_online_json(ran):
    d, _ = ran
    p = cli("online", "MEGA01", "NOPE", "--data-dir", d, "--json", check=False)
    assert p.returncode == 1 and p.stderr.startswith("not found: NOPE"), p.stderr  # docs/cli.md "Exit codes"
    rows = json.loads(p.stdout)
    assert rows[0]["symbol"] == "MEGA01" and rows[0]["found"] and rows[0]["spread_bps"] > 0
    assert rows[1]["found"] is False and rows[1]["stale"] is True


def test_training_set_through_feast(ran, tmp_path):
    d, _ = ran
    feats = pd.read_json(cli("sql", "SELECT symbol, received_ts FROM features ORDER BY received_ts LIMIT 30 OFFSET 40",
                             "--data-dir", d, "--json").stdout)
    ents = pd.DataFrame({"symbol": feats["symbol"], "timestamp": pd.to_datetime(feats["received_ts"], utc=True),
                         "y": range(len(feats))})
    ents.to_csv(tmp_path / "e.csv", index=False)
    cli("training-set", "--entities", tmp_path / "e.csv", "--out", tmp_path / "o.parquet", "--data-dir", d)
    out = pd.read_parquet(tmp_path / "o.parquet")
    assert out["y"].tolist() == list(range(len(feats)))
    assert out["spread_bps"].notna().all()


def test_validate_and_compact(ran):
    d, _ = ran
    v = json.loads(cli("validate", "--data-dir", d, "--json").stdout)
    assert all(c["success"] for c in v["checks"]) and v["data_docs"].endswith("index.html")
    c = json.loads(cli("compact", "--data-dir", d, "--json").stdout)
    assert all(r["files_after"] <= 1 for r in c)


def test_tables_fold_at_80_columns(ran):
    # How the numbers read (rules by unit) and the 120-column layout: test_tables_for_people.py.
    import os

    d, _ = ran
    p = subprocess.run([sys.executable, "-m", "microstructure", "online", "MEGA01", "LRG01", "MID01", "--data-dir",
                        str(d)], capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    assert max(len(line) for line in p.stdout.splitlines()) <= 80
    assert any(line.startswith("spread_bps") for line in p.stdout.splitlines())  # folded: one line per column
