"""The CLI's refusals: one plain `error:` line and a non-zero exit for a missing, empty, truncated or ill-formed
input, a bad value or a bad choice; never a traceback; row errors in picks, and strict JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # every test runs the CLI in a subprocess


def cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr[-2000:]}")
    return p


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


def test_backfill_without_format_is_refused_in_one_line_naming_the_formats(tmp_path):
    f = tmp_path / "book.csv"
    f.write_text("symbol,event_ts\n")
    p = cli("backfill", f, "--data-dir", tmp_path / "d", check=False)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert "Missing option '--format'" in p.stderr
    assert all(name in p.stderr for name in ("snapshots", "wide", "lobster", "iex-deep", "binance-depth",
                                             "hyperliquid-l2"))
    assert not (tmp_path / "d").exists()  # nothing guessed, nothing written
