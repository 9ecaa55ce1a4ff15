"""`microstructure picks` reads unless asked: a stale book is reported, not fetched; `--refresh` fetches it."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # the CLI in subprocesses, on a copy of the shared `run` data dir


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    return p


def lake_bytes(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted((d / "lake").rglob("*")) if f.is_file()}


@pytest.fixture
def stale_world(ran, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(ran[0], d)
    picks = tmp_path / "p.csv"
    picks.write_text("symbol,side,score,mode\nMEGA01,buy,0.5,SAFE\nLRG01,sell,0.4,AGGRESSIVE\n")
    # Every book is stale under a 1 ms freshness limit, however soon after the run this test starts.
    config = tmp_path / "t.toml"
    config.write_text("freshness_s = 0.001\n")
    return d, picks, config


def test_picks_without_refresh_never_writes_and_reports_the_stale_book(stale_world):
    d, picks, config = stale_world
    before = lake_bytes(d)
    rows = json.loads(cli("picks", "--in", picks, "--data-dir", d, "--config", config, "--json").stdout)["picks"]
    assert lake_bytes(d) == before  # not one file added or changed
    assert [r["filter"] for r in rows] == ["stale", "stale"]
    assert all(r["reason"].endswith("(limit 0.001 s)") for r in rows)


def test_picks_with_refresh_polls_the_source_and_writes_the_lake(stale_world):
    d, picks, config = stale_world
    before = lake_bytes(d)
    cli("picks", "--in", picks, "--data-dir", d, "--config", config, "--refresh", "--json")
    added = set(lake_bytes(d)) - set(before)
    assert any(f.startswith("lake/snapshots/") for f in added), sorted(added)
