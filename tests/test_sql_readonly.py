"""`microstructure sql` can only read, and only the lake: attacks on the command, its prompt and its connection.

Every attack is judged by real effects: the data dir's bytes and file names are unchanged (every file hashed
before and after), a marker file is never created, rows from outside the lake never come back. Most attacks are
sent twice: through the CLI as a user would, and straight at the connection with the friendly statement check
bypassed, because the connection (no file system at all, configuration locked) is the defence, not the check.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from microstructure.cli import sql_shell as shell
from microstructure.contract.atomic import atomic_write_parquet
from microstructure.contract.inputs import InputError
from microstructure.lake.paths import LakePaths, ensure_schemas
from microstructure.lake.views import connect

T0 = dt.datetime(2026, 11, 23, 14, 30, tzinfo=dt.UTC)
SECRET = "OUTSIDE_SECRET"  # the symbol of the rows in the parquet file outside the lake


def cli(*args: object, stdin: str | None = None, cwd: Path | None = None, env: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                          input=stdin, cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) -> sha256 of its bytes; links by their target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small lake written by the project's own code: snapshots and outcomes from a poll, features computed by
    features.sql and written as the build does, every dataset's schema file."""
    from microstructure.features.compute import compute_features
    from microstructure.jobs import poll as pipeline
    from microstructure.sources.simulated import SimulatedSource, universe

    d = tmp_path_factory.mktemp("sqlro") / "data"
    paths = LakePaths(d)
    pipeline.poll_cycles(paths, SimulatedSource(seed=5), universe()[:5], pipeline.cycle_times(T0, 2.0, 20, 0))
    feats = compute_features(pq.read_table(paths.files("snapshots")))
    atomic_write_parquet(feats, paths.partition("features", T0.date()) / "features.parquet")
    ensure_schemas(paths)
    return d


@pytest.fixture
def world(pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A private copy of the lake, a parquet file with secret rows outside it, a clean working directory (where
    DuckDB would make its `.tmp`), a HOME (where it would keep extensions and secrets), and marker paths."""
    d = tmp_path / "data"
    shutil.copytree(pristine, d, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    snaps = pq.read_table(LakePaths(d).files("snapshots")).slice(0, 3)
    secret_file = outside / "secret.parquet"
    pq.write_table(snaps.set_column(0, "symbol", [[SECRET] * 3]), secret_file)
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    monkeypatch.chdir(cwd)  # in-process sessions: a `.tmp` would appear here
    monkeypatch.setenv("HOME", str(home))
    features_file = LakePaths(d).files("features")[0]
    return {"d": d, "paths": LakePaths(d), "secret_file": secret_file, "cwd": cwd, "home": home,
            "marker": tmp_path / "marker", "features_file": features_file,
            "before": tree(d), "env": {"HOME": str(home)}}


def unharmed(w: dict) -> None:
    assert tree(w["d"]) == w["before"], "the data dir changed"
    assert not w["marker"].exists() and not Path(str(w["marker"]) + ".csv").exists()
    assert not (w["cwd"] / ".tmp").exists(), "DuckDB made a temp folder in the working directory"
    assert list(w["home"].iterdir()) == [], "something was written under HOME (~/.duckdb: extensions, secrets)"


def attack_connection(w: dict, statements: list[str], setup: str | None = None) -> list[str]:
    """Send each statement straight to a session's connection (no friendly check): each must fail; the errors."""
    errors = []
    with shell.Session(w["paths"]) as session:
        if setup:
            session.con.execute(setup)
        for q in statements:
            try:
                session.con.execute(q).fetchall()
            except duckdb.Error as e:
                errors.append(str(e).splitlines()[0])
                continue
            raise AssertionError(f"{q!r} ran")
    return errors


@pytest.fixture
def con(world: dict) -> Iterator[duckdb.DuckDBPyConnection]:
    """A session's connection, attacked directly (the friendly statement check is not in the way)."""
    with shell.Session(world["paths"]) as session:
        yield session.con


# --- writes -----------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_explain_analyze_copy_cannot_truncate_a_lake_file(world):
    w = world
    target = w["features_file"]
    q = (f"EXPLAIN ANALYZE COPY (SELECT best_bid * 1000 AS best_bid FROM features) TO '{target}' "
         "(FORMAT parquet, USE_TMP_FILE false)")
    one_error_line(cli("sql", q, "--data-dir", w["d"], cwd=w["cwd"], env=w["env"]))
    errors = attack_connection(w, [q, f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{w['marker']}.csv'"])
    assert all("disabled by configuration" in e for e in errors), errors
    unharmed(w)


@pytest.mark.integration
def test_plain_copy_to_a_lake_file_or_anywhere_writes_nothing(world):
    w = world
    for target in (w["features_file"], f"{w['marker']}.csv",
                   w["d"] / "lake" / "snapshots" / "date=2026-11-23" / "planted.parquet"):
        q = f"COPY (SELECT 1 AS a) TO '{target}'"
        one_error_line(cli("sql", q, "--data-dir", w["d"], cwd=w["cwd"], env=w["env"]))
        attack_connection(w, [q, f"COPY features TO '{target}' (FORMAT parquet)"])
    unharmed(w)


@pytest.mark.integration
def test_chained_statements_cannot_smuggle_a_copy(world, con):
    w = world
    q = f"SELECT 1; COPY (SELECT 1) TO '{w['features_file']}' (FORMAT parquet, USE_TMP_FILE false); SELECT 2"
    one_error_line(cli("sql", q, "--data-dir", w["d"], cwd=w["cwd"], env=w["env"]))
    # Straight at the connection, where DuckDB runs every statement of the chain.
    with pytest.raises(duckdb.Error, match="disabled by configuration"):
        con.sql(q)
    unharmed(w)


@pytest.mark.integration
def test_attach_cannot_create_or_open_a_database_file(world):
    w = world
    for q in (f"ATTACH '{w['marker']}' AS m", f"ATTACH '{w['features_file']}' AS f",
              f"ATTACH '{w['marker']}' AS m (TYPE sqlite)"):
        one_error_line(cli("sql", q, "--data-dir", w["d"], cwd=w["cwd"], env=w["env"]))
        attack_connection(w, [q])
    unharmed(w)


@pytest.mark.integration
def test_export_database_writes_nothing(world):
    w = world
    q = f"EXPORT DATABASE '{w['marker']}' (FORMAT parquet)"
    one_error_line(cli("sql", q, "--data-dir", w["d"], cwd=w["cwd"], env=w["env"]))
    attack_connection(w, [q, f"EXPORT DATABASE '{w['d'] / 'lake'}'", f"IMPORT DATABASE '{w['d'] / 'lake'}'"],
                      setup="CREATE TABLE t AS SELECT * FROM snapshots")  # something to export
    unharmed(w)


@pytest.mark.integration
def test_install_and_load_of_extensions_are_refused(world):
    w = world
    fake = w["marker"].with_suffix(".duckdb_extension")  # a planted extension file must never be loaded
    fake.write_bytes(b"\0" * 64)
    attacks = ["INSTALL httpfs", "FORCE INSTALL httpfs", f"INSTALL '{fake}'", f"LOAD '{fake}'", "LOAD httpfs",
               "UPDATE EXTENSIONS", "SELECT * FROM duckdb_extensions()"]
    for q in attacks[:2]:
        one_error_line(cli("sql", q, "--data-dir", w["d"], cwd=w["cwd"], env=w["env"]))
    errors = attack_connection(w, attacks)
    assert len(errors) == len(attacks)
    fake.unlink()
    unharmed(w)  # ~/.duckdb/extensions was never made


# --- settings ---------------------------------------------------------------------------------------------------


SETTINGS_ATTACKS = [
    "SET enable_external_access = true", "RESET enable_external_access", "SET GLOBAL enable_external_access = true",
    "SET lock_configuration = false", "RESET lock_configuration", "RESET ALL",
    "SET memory_limit = '100GB'", "RESET memory_limit", "PRAGMA memory_limit = '100GB'", "SET threads = 64",
    "SET temp_directory = '.tmp'", "SET disabled_filesystems = ''", "SET allowed_directories = ['/']",
    "SET allowed_paths = ['/etc/passwd']", "SET autoload_known_extensions = true",
    "SET python_enable_replacements = true", "PRAGMA enable_profiling = 'json'",
    "SET profiling_output = '{marker}'", "SET log_query_path = '{marker}'",
    "CALL enable_logging(storage = 'file', storage_config = {{'path': '{marker}'}})",
]


@pytest.mark.integration
def test_set_and_reset_cannot_reopen_the_connection(world, con):
    w = world
    attacks = [a.format(marker=w["marker"]) for a in SETTINGS_ATTACKS]
    for q in ("SET enable_external_access = true", "RESET ALL", "SET memory_limit = '100GB'"):
        one_error_line(cli("sql", f"{q}; COPY (SELECT 1) TO '{w['marker']}.csv'", "--data-dir", w["d"],
                           cwd=w["cwd"], env=w["env"]))
    settings = ("enable_external_access", "lock_configuration", "memory_limit", "threads", "temp_directory",
                "autoload_known_extensions", "python_enable_replacements")
    before = con.execute(f"SELECT {', '.join(f'current_setting({s!r})' for s in settings)}").fetchall()
    assert before[0][:2] == (False, True) and before[0][4] == ""
    for q in attacks:
        with pytest.raises(duckdb.Error):
            con.execute(q)
    assert con.execute(f"SELECT {', '.join(f'current_setting({s!r})' for s in settings)}").fetchall() == before
    with pytest.raises(duckdb.Error, match="disabled by configuration"):
        con.execute(f"COPY (SELECT 1) TO '{w['marker']}.csv'")
    unharmed(w)


# --- reads outside the lake -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_reading_files_outside_the_lake_is_refused(world):
    w = world
    s = w["secret_file"]
    attacks = ["SELECT * FROM read_text('/etc/passwd')", "SELECT * FROM read_csv('/etc/passwd')",
               "SELECT * FROM read_blob('/etc/hostname')", "SELECT * FROM sniff_csv('/etc/passwd')",
               f"SELECT * FROM read_parquet('{s}')", f"SELECT * FROM '{s}'", f"SELECT * FROM parquet_metadata('{s}')",
               "SELECT * FROM glob('/etc/*')", f"SELECT * FROM read_parquet('{w['features_file']}')",
               "CREATE MACRO leak() AS TABLE SELECT * FROM read_text('/etc/passwd'); SELECT * FROM leak()"]
    for q in (attacks[0], attacks[4], attacks[7]):  # the CLI as a user runs it; all of them at the connection
        r = cli("sql", q, "--data-dir", w["d"], "--json", cwd=w["cwd"], env=w["env"])
        one_error_line(r)
        assert "root:" not in r.stdout + r.stderr and SECRET not in r.stdout + r.stderr
    attack_connection(w, attacks)
    unharmed(w)


@pytest.mark.integration
def test_symlink_in_a_lake_partition_to_an_outside_parquet_is_never_read(world):
    w = world
    part = w["paths"].partition("snapshots", T0.date())
    (part / "zz-link.parquet").symlink_to(w["secret_file"])
    r = cli("sql", f"SELECT count(*) AS n FROM snapshots WHERE symbol = '{SECRET}'", "--data-dir", w["d"], "--json",
            cwd=w["cwd"], env=w["env"])
    assert "resolves outside the lake" in one_error_line(r)
    assert SECRET not in r.stdout
    with pytest.raises(shell.NotAllowed, match="outside the lake"):
        shell.Session(w["paths"])
    (part / "zz-link.parquet").unlink()
    # A whole partition linked out of the lake is refused the same way.
    (w["secret_file"].parent / "date=2099-01-01").mkdir()
    shutil.copy(w["secret_file"], w["secret_file"].parent / "date=2099-01-01" / "x.parquet")
    (w["paths"].dataset("snapshots") / "date=2099-01-01").symlink_to(w["secret_file"].parent / "date=2099-01-01")
    one_error_line(cli("sql", "SELECT count(*) FROM snapshots", "--data-dir", w["d"], cwd=w["cwd"], env=w["env"]))
    (w["paths"].dataset("snapshots") / "date=2099-01-01").unlink()
    unharmed(w)


@pytest.mark.integration
def test_symlink_between_lake_files_is_still_read(world):
    """The guard is about leaving the lake, not about links: one that stays inside reads normally."""
    w = world
    inside = LakePaths(w["d"]).files("outcomes")[0]
    n = json.loads(cli("sql", "SELECT count(*) AS n FROM outcomes", "--data-dir", w["d"], "--json").stdout)[0]["n"]
    Path(inside).with_name("zz-alias.parquet").symlink_to(Path(inside).name)
    got = json.loads(cli("sql", "SELECT count(*) AS n FROM outcomes", "--data-dir", w["d"], "--json").stdout)
    assert got == [{"n": n + pq.read_metadata(inside).num_rows}]


@pytest.mark.integration
def test_fifo_in_a_lake_partition_is_refused_not_opened(world):
    w = world
    os.mkfifo(w["paths"].partition("snapshots", T0.date()) / "zz-fifo.parquet")  # opening it would block forever
    r = cli("sql", "SELECT count(*) FROM snapshots", "--data-dir", w["d"], cwd=w["cwd"], env=w["env"], timeout=120)
    assert "not a regular file" in one_error_line(r)


@pytest.mark.integration
def test_parquet_planted_in_the_working_directory_tmp_is_not_readable(world):
    w = world
    tmp = w["cwd"] / ".tmp"
    tmp.mkdir()
    shutil.copy(w["secret_file"], tmp / "secret.parquet")
    for q in ("SELECT * FROM read_parquet('.tmp/secret.parquet')", f"SELECT * FROM '{tmp / 'secret.parquet'}'",
              "SELECT * FROM glob('.tmp/*')"):
        r = cli("sql", q, "--data-dir", w["d"], cwd=w["cwd"], env=w["env"])
        one_error_line(r)
        assert SECRET not in r.stdout
    attack_connection(w, ["SELECT * FROM read_parquet('.tmp/secret.parquet')"])
    assert sorted(p.name for p in tmp.iterdir()) == ["secret.parquet"]
    shutil.rmtree(tmp)
    unharmed(w)


def test_python_variables_are_not_reachable_by_name(con):
    import pandas as pd

    secret_frame = pd.DataFrame({"symbol": [SECRET]})  # noqa: F841 - what a replacement scan would find
    with pytest.raises(duckdb.CatalogException):
        con.sql("SELECT * FROM secret_frame").fetchall()


# --- in-memory statements: harmless ------------------------------------------------------------------------------


@pytest.mark.integration
def test_create_table_macro_and_pragma_stay_in_memory(world, con):
    w = world
    con.execute("CREATE TABLE t AS SELECT * FROM snapshots")
    con.execute("INSERT INTO t SELECT * FROM t")
    con.execute("CREATE MACRO twice(x) AS x * 2")
    assert con.execute("SELECT twice(count(*)) FROM snapshots").fetchone() == con.execute(
        "SELECT count(*) FROM t").fetchone()
    con.execute("CHECKPOINT")  # of an in-memory database: nothing to write to
    # Macros, views and pragmas that would reach a file when used: refused when made or when used.
    escapes = [f"CREATE MACRO out() AS TABLE SELECT * FROM read_csv('{w['marker']}')",
               f"CREATE VIEW v AS SELECT * FROM read_parquet('{w['secret_file']}')",
               "CREATE MACRO rt(p) AS (SELECT string_agg(content) FROM read_text(p))", "SELECT rt('/etc/passwd')",
               "PRAGMA enable_profiling", f"PRAGMA profiling_output = '{w['marker']}'",
               "PRAGMA enable_checkpoint_on_shutdown", "PRAGMA threads = 64",
               "CREATE PERSISTENT SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')"]
    failed = []
    for q in escapes:
        try:
            con.execute(q).fetchall()
        except duckdb.Error:
            failed.append(q)
    assert set(escapes) - set(failed) <= {escapes[2]}, "only the lazy macro itself may be made"
    # The same statements at the CLI are refused up front, with a plain word for what was refused.
    r = cli("sql", "CREATE TABLE t AS SELECT 1", "--data-dir", w["d"], cwd=w["cwd"], env=w["env"])
    assert "CREATE is not allowed" in one_error_line(r)
    unharmed(w)


# --- the prompt -------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_prompt_fed_the_same_attacks_changes_nothing(world):
    w = world
    m, f = w["marker"], w["features_file"]
    attacks = [
        f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{f}' (FORMAT parquet, USE_TMP_FILE false);",
        f"COPY (SELECT 1) TO '{m}.csv';",
        f"SELECT 1; COPY (SELECT 1) TO '{f}' (FORMAT parquet, USE_TMP_FILE false);",
        f"ATTACH '{m}' AS m;", "INSTALL httpfs;", "SET enable_external_access = true;", "RESET ALL;",
        "SET memory_limit = '100GB';", "SELECT * FROM read_text('/etc/passwd');",
        f"SELECT * FROM read_parquet('{w['secret_file']}');", f"EXPORT DATABASE '{m}';",
        "CREATE TABLE t AS SELECT 1;", f"PRAGMA profiling_output = '{m}';",
    ]
    stdin = "\n".join(["SELECT count(*) AS before_n", "FROM snapshots;", *attacks, ".tables",
                       f"COPY (SELECT 1)\nTO '{m}.csv';", "SELECT count(*) AS after_n FROM snapshots;", ""])
    r = cli("sql", "--data-dir", w["d"], stdin=stdin, cwd=w["cwd"], env=w["env"])
    assert r.returncode == 0, r.stderr
    lines = [line.strip() for line in r.stdout.splitlines()]
    assert sum(line.startswith("error: ") for line in lines) == len(attacks) + 1, r.stdout
    assert "root:" not in r.stdout and SECRET not in r.stdout
    n = len(pq.read_table(w["paths"].files("snapshots")))
    assert lines[lines.index("before_n") + 1] == str(n)
    assert lines[lines.index("after_n") + 1] == str(n)  # the prompt still answers after every attack
    assert {"snapshots", "features", "quarantine", "outcomes"} <= set(lines)  # .tables
    unharmed(w)


@pytest.mark.integration
def test_prompt_refuses_an_endless_statement_without_buffering_it(world):
    w = world
    r = cli("sql", "--data-dir", w["d"], stdin="SELECT '" + "x" * 3_000_000 + "';\nSELECT 42 AS answer;\n",
            cwd=w["cwd"], env=w["env"])
    assert r.returncode == 0, r.stderr
    assert "error: a statement longer than" in r.stdout and r.stdout.rstrip().endswith("42"), r.stdout[-500:]


# --- bounds -----------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_runaway_cross_join_is_stopped_by_the_statement_timeout(world):
    w = world
    q = "SELECT count(*) FROM range(1000000) a, range(1000000) b WHERE a.range + b.range = 7"
    assert "ran longer than 1 s" in one_error_line(cli("sql", q, "--data-dir", w["d"], "--timeout", 1, cwd=w["cwd"]))
    r = cli("sql", q, "--data-dir", w["d"], cwd=w["cwd"], env={"MICROSTRUCTURE_SQL_TIMEOUT": "0.5"})
    assert "ran longer than 0.5 s" in one_error_line(r)
    # In the prompt the timeout stops the statement, and the next one runs.
    r = cli("sql", "--data-dir", w["d"], "--timeout", 1, stdin=f"{q};\nSELECT 42 AS answer;\n", cwd=w["cwd"])
    assert "ran longer than 1 s" in r.stdout and r.stdout.rstrip().endswith("42"), r.stdout


@pytest.mark.integration
def test_a_huge_aggregation_hits_the_memory_limit_with_one_error_line(world):
    w = world
    r = cli("sql", "SELECT count(DISTINCT range) FROM range(2000000000)", "--data-dir", w["d"],
            "--memory-limit", "200MB", cwd=w["cwd"], env=w["env"])
    assert "Out of Memory" in one_error_line(r)
    unharmed(w)  # nothing spilled to <cwd>/.tmp


@pytest.mark.integration
def test_a_huge_result_is_refused_before_it_fills_memory(world, tmp_path):
    w = world
    # A parent process runs the CLI, so ru_maxrss of its children is the CLI's alone.
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stderr.write(r.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "microstructure", "sql",
                        "SELECT repeat('x', 1000) || range AS s FROM range(20000000)", "--data-dir", w["d"],
                        "--memory-limit", "200MB", "--csv"], capture_output=True, text=True, timeout=300)
    assert "result is larger than 200 MB" in one_error_line(r)
    peak_mb = int(r.stdout.split()[-1]) / 1024
    assert peak_mb < 1500, peak_mb  # a 20 GB result, never held


@pytest.mark.integration
def test_limits_that_are_not_numbers_are_refused(world):
    assert "--timeout" in one_error_line(cli("sql", "SELECT 1", "--data-dir", world["d"], "--timeout", "nan"))
    for bad in ({"timeout": math.inf}, {"timeout": 0.0}, {"timeout": -1.0}, {"memory": "lots"}, {"memory": "1KB"},
                {"memory": "nanGB"}, {"memory": "1e400GB"}):
        with pytest.raises(InputError):
            shell.Limits.parse(**bad)
    assert shell.Limits.parse(5, "1.5GiB") == shell.Limits(5, int(1.5 * 1024**3))


@pytest.mark.integration
def test_allow_writes_is_gone(world):
    one_error_line(cli("sql", "SELECT 1", "--data-dir", world["d"], "--allow-writes"))


# --- it still reads ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_normal_query_still_works_with_the_views_columns(world, con):
    w = world
    n = len(pq.read_table(w["paths"].files("snapshots")))
    got = json.loads(cli("sql", "SELECT count(*) AS n FROM snapshots", "--data-dir", w["d"], "--json").stdout)
    assert got == [{"n": n}]
    # The same columns as views.sql gives through connect (the folder's date as `date`, views.sql's
    # computed one as `date_1`), and the same rows.
    stock = connect(w["paths"])
    for view in shell.DATASETS:
        assert con.sql(f"DESCRIBE {view}").fetchall() == stock.sql(f"DESCRIBE {view}").fetchall(), view
        q = f"SELECT * FROM {view} ORDER BY ALL"
        assert con.sql(q).fetchall() == stock.sql(q).fetchall(), view
    day = "SELECT count(*) FROM features WHERE date = ?"
    assert con.execute(day, [T0.date()]).fetchone()[0] == len(pq.read_table(w["features_file"])) > 0
    assert tree(w["d"]) == w["before"]
