"""DuckDB the way DuckDB users work: the stock CLI loading views.sql as docs/lake.md says, on a fresh lake whose
datasets are still empty; `microstructure sql` read-only; its prompt; ISO timestamps with microseconds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from microstructure.lake import paths as lake

VIEWS = Path(__file__).resolve().parents[1] / "transforms" / "views.sql"


def cli(*args: object, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                          timeout=300, input=stdin)


@pytest.fixture(scope="module")
def polled(tmp_path_factory) -> Path:
    """A lake with snapshots and outcomes but no features yet (a poll, no build)."""
    root = tmp_path_factory.mktemp("duck")
    r = cli("poll", "--data-dir", root / "data", "--interval", "0", "--cycles", 5, "--symbols", 5, "--no-online",
            "--json")
    assert r.returncode == 0, r.stderr
    return root


def duckdb_cli() -> str:
    exe = shutil.which("duckdb", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the duckdb CLI (pip install duckdb-cli) is not installed")
    return exe


@pytest.mark.integration  # the stock duckdb CLI on a lake polled by ours, in subprocesses
def test_stock_duckdb_cli_loads_views_as_the_readme_says(polled):
    exe = duckdb_cli()
    # From the folder holding data/: the lake defaults to data/lake.
    r = subprocess.run([exe, "-init", str(VIEWS), "-json", "-c",
                        "SELECT (SELECT count(*) FROM snapshots) AS s, (SELECT count(*) FROM features) AS f, "
                        "(SELECT count(*) FROM outcomes) AS o"], capture_output=True, text=True, cwd=polled,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)[0]
    assert got["s"] > 0 and got["f"] == 0 and got["o"] == 25  # features: empty, but the view exists
    # Another lake, named with -cmd before the file is read (-init would run before -cmd).
    r = subprocess.run([exe, "-cmd", f"SET VARIABLE lake = '{polled / 'data' / 'lake'}'", "-cmd",
                        f".read {VIEWS}", "-json", "-c", "SELECT count(*) AS n FROM quarantine"],
                       capture_output=True, text=True, cwd="/", timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["n"] >= 0


def test_views_on_a_lake_with_nothing_yet(tmp_path):
    import duckdb

    paths = lake.LakePaths(tmp_path / "data")
    lake.ensure_schemas(paths)
    con = duckdb.connect()
    con.execute("SET VARIABLE lake = ?", [str(paths.root)])
    con.execute(VIEWS.read_text())
    for v in ("snapshots", "features", "quarantine", "outcomes"):
        assert con.sql(f"SELECT count(*) FROM {v}").fetchall() == [(0,)]
    assert "spread_bps" in con.sql("SELECT * FROM features").columns


@pytest.mark.integration
def test_sql_is_read_only(polled, tmp_path):
    d = polled / "data"
    target = tmp_path / "out.csv"
    for q in (f"COPY (SELECT 1) TO '{target}'", "SELECT * FROM read_text('/etc/passwd')",
              f"ATTACH '{tmp_path / 'x.db'}'", "INSTALL httpfs",
              f"COPY (SELECT * FROM snapshots) TO '{d / 'lake' / 'snapshots' / 'date=2026-01-01' / 'x.parquet'}'"):
        r = cli("sql", q, "--data-dir", d)
        assert r.returncode == 2, (q, r.stderr)
        assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    assert not target.exists() and not (d / "lake" / "snapshots" / "date=2026-01-01").exists()
    # There is no write mode any more (the stock DuckDB CLI on views.sql is the way to write); the attacks
    # themselves are in test_sql_readonly.py.
    r = cli("sql", f"COPY (SELECT 1 AS a) TO '{target}'", "--data-dir", d, "--allow-writes")
    assert r.returncode == 2 and not target.exists(), r.stderr


@pytest.mark.integration
def test_sql_prompt_and_json_timestamps(polled):
    d = polled / "data"
    r = cli("sql", "--data-dir", d, stdin="SELECT count(*) AS n\nFROM outcomes;\nCOPY (SELECT 1) TO '/tmp/z.csv';\n")
    assert r.returncode == 0, r.stderr
    assert "25" in r.stdout and "COPY is not allowed" in r.stdout
    rows = json.loads(cli("sql", "SELECT event_ts FROM snapshots ORDER BY event_ts LIMIT 1", "--data-dir", d,
                          "--json").stdout)
    assert len(rows[0]["event_ts"].split(".")[1].rstrip("Z")) == 6  # microseconds: event_ts is a key
