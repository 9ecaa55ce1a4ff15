"""The front door: every command run as a user would, in a subprocess, against one data dir."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest


def cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr[-2000:]}")
    return p


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "data"
    p = cli("run", "--data-dir", d, "--cycles", 60, "--symbols", 10, "--json")
    return d, json.loads(p.stdout)


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
    rows = json.loads(cli("online", "MEGA01", "NOPE", "--data-dir", d, "--json").stdout)
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


def test_errors_are_one_line_with_nonzero_exit(tmp_path):
    p = cli("training-set", "--entities", tmp_path / "missing.csv", "--out", tmp_path / "o.csv", "--data-dir",
            tmp_path, check=False)
    assert p.returncode != 0 and p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    p = cli("build-features", "--data-dir", tmp_path / "empty", check=False)
    assert p.returncode == 2 and "not a data dir" in p.stderr
    assert not (tmp_path / "empty").exists()  # a read command never creates a mistyped data dir


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"symbol,score\nAAA,1\n", "lacks column(s) ['side']"),
    (b"\x1f\x8b\x08\x00\x00\x00", "truncated"),
])
def test_unusable_files_are_one_plain_error_with_exit_2(ran, tmp_path, content, expected):
    d, _ = ran
    f = tmp_path / ("picks.csv.gz" if content.startswith(b"\x1f") else "picks.csv")
    f.write_bytes(content)
    p = cli("picks", "--in", f, "--data-dir", d, check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error:") and p.stderr.count("\n") == 1 and expected in p.stderr, p.stderr
    for name in ("EmptyDataError", "ArrowInvalid", "DateParseError", "Traceback"):
        assert name not in p.stderr


def test_bad_values_are_plain_errors(ran, tmp_path):
    d, _ = ran
    p = cli("build-features", "--data-dir", d, "--date", "2026-13-01", check=False)
    assert p.returncode == 2 and p.stderr == "error: not a date (YYYY-MM-DD): '2026-13-01'\n"
    p = cli("poll", "--data-dir", d, "--source", "bloomberg", check=False)
    assert p.returncode == 2 and "bloomberg" in p.stderr  # a choice, checked by the parser
    ent = tmp_path / "e.csv"
    ent.write_text("symbol,event_timestamp\nMEGA01,not-a-time\n")
    p = cli("training-set", "--entities", ent, "--out", tmp_path / "o.csv", "--data-dir", d, check=False)
    assert p.returncode == 2 and "no readable event_timestamp (first: 'not-a-time')" in p.stderr
    assert cli("--version").stdout.startswith("microstructure ")


def test_picks_nan_scores_are_row_errors_and_output_is_strict_json(ran, tmp_path):
    d, _ = ran
    f = tmp_path / "p.csv"
    f.write_text("symbol,side,score,mode\nMEGA01,buy,0.5,SAFE\nMEGA02,buy,nan,SAFE\nMEGA03,sell,inf,SAFE\n")
    p = cli("picks", "--in", f, "--data-dir", d, "--json")
    out = json.loads(p.stdout)  # strict: the parser rejects bare NaN
    status = {r["symbol"]: r["status"] for r in out["picks"]}
    assert status["MEGA02"] == "error" and status["MEGA03"] == "error" and status["MEGA01"] != "error"
    assert "NaN" not in p.stdout and "Infinity" not in p.stdout


def test_tables_keep_full_precision_and_fold_at_80_columns(ran):
    import os

    from microstructure.contract.text import cell, dumps, number

    assert number(328.29) == "328.29" and number(328.3) == "328.3" and number(1234567.5) == "1,234,567.5"
    assert number(27491.699999999997) == "27,491.7" and number(100.0) == "100" and number(-0.125) == "-0.125"
    assert cell({"l2": 150, "none": 0}) == "l2 150, none 0"
    assert json.loads(dumps({"x": float("nan"), "y": [float("inf")]})) == {"x": None, "y": [None]}
    d, _ = ran
    p = subprocess.run([sys.executable, "-m", "microstructure", "online", "MEGA01", "LRG01", "--data-dir", str(d)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    assert max(len(line) for line in p.stdout.splitlines()) <= 80
    assert any(line.startswith("spread_bps") for line in p.stdout.splitlines())  # folded: one line per column
