"""Every feature is declared once, in transforms/features.sql; everything else is derived from that declaration.

The proof: a copy of the installed package whose features.sql has one more annotated column, and nothing else
changed, computes it, checks it, serves it online and joins it offline through the real command line.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import microstructure
from microstructure.contract.book import SNAPSHOT_SCHEMA
from microstructure.contract.catalogue import DeclarationError, declare, parse, say
from microstructure.contract.schemas import (
    DECLARATION,
    FEATURE_NAMES,
    FEATURES_SCHEMA,
    GAP_WINDOW,
    HALT_WINDOW,
    package_dir,
    sql,
)

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "docs" / "hooks" / "feature_table.py"
SQL = sql("features")
NEW_COLUMN = "    bid_depth + ask_depth AS total_depth,  -- feature: unit=shares range=[0,) | Top-5 size, both sides\n"


def _hook():
    pytest.importorskip("mkdocs")  # the docs extra; .ci/run installs it before the tests
    spec = importlib.util.spec_from_file_location("feature_table_hook", HOOK)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _docs_rows(markdown: str) -> dict[str, list[str]]:
    """The generated table's rows by column name: [type, unit, checked, description]."""
    rows = {}
    for line in markdown.splitlines():
        m = re.match(r"\| `(\w+)`[^|]*\|(.*)\|$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in re.split(r"(?<!\\)\|", m.group(2))]
    return rows


def _between(suite: list, column: str) -> list[dict]:
    return [dict(e.configuration.kwargs) for e in suite if e.expectation_type == "expect_column_values_to_be_between"
            and e.configuration.kwargs["column"] == column]


# ---- the declaration and what is derived from it (the real tree, in process) ------------------------------------
def test_schema_feast_suite_and_docs_list_exactly_the_declared_columns(tmp_path):
    import great_expectations as gx
    from feast.type_map import pa_to_feast_value_type
    from feast.types import from_value_type

    from microstructure.checks.suites import FLOAT_MAX, _expectations
    from microstructure.store.repo import feast_objects

    notes, _ = parse(SQL)
    declared = [a.name for a in notes]
    assert len(declared) == len(set(declared)) > 20
    # The Arrow schema: exactly the annotated columns, in the SQL's order.
    assert FEATURES_SCHEMA.names == declared == [c.name for c in DECLARATION.columns]
    assert [a.name for a in notes if a.role == "feature"] == FEATURE_NAMES

    # Feast: one field per declared feature, its type from the schema, its description from the annotation.
    view = next(o for o in feast_objects(tmp_path) if getattr(o, "name", None) == "order_book")
    fields = {f.name: f for f in view.schema}
    assert set(fields) == set(FEATURE_NAMES)
    for c in DECLARATION.features:
        assert fields[c.name].dtype == from_value_type(pa_to_feast_value_type(str(c.type))), c.name
        assert fields[c.name].description == c.description and c.description

    # GE: every declared range, bounds and strictness as written; every float without one finite; not_null. (The
    # snapshot contract's own checks, such as book_levels in 1-10, apply to feature rows too.)
    suite, contract = _expectations("features"), _expectations("snapshots")
    not_null = {e.configuration.kwargs["column"] for e in suite
                if e.expectation_type == "expect_column_values_to_not_be_null"}
    for c in DECLARATION.features:
        got = _between(suite, c.name)
        floating = pa.types.is_floating(c.type)
        if c.range is None:
            finite = [{"column": c.name, "min_value": -FLOAT_MAX, "max_value": FLOAT_MAX}] if floating else []
            assert got == _between(contract, c.name) + finite
        else:
            (kw,) = got
            r = c.range
            assert kw.get("min_value") == (r.lo if r.lo is not None else -FLOAT_MAX if floating else None)
            assert kw.get("max_value") == (r.hi if r.hi is not None else FLOAT_MAX if floating else None)
            assert kw.get("strict_min", False) == (r.lo is not None and not r.lo_closed)
            assert kw.get("strict_max", False) == (r.hi is not None and not r.hi_closed)
        assert (c.name in not_null) == c.not_null or c.name in ("event_ts", "source"), c.name
    # ... and nothing on a column the declaration does not know (the snapshot contract's lag_s aside).
    columns = {e.configuration.kwargs.get("column") for e in suite} - {None}
    assert columns - set(declared) == {"lag_s"}
    assert isinstance(suite[0], gx.expectations.ExpectColumnValuesToNotBeNull)

    # The docs table: one row per declared column, in order, with its type, unit, checks and description.
    page = (ROOT / "docs" / "features.md").read_text()
    rows = _docs_rows(_hook().render(page))
    assert list(rows) == declared
    for c in DECLARATION.columns:
        typ, unit, checked, text = rows[c.name]
        assert typ == re.sub(r"([\[\]])", r"\\\1", str(c.type)) and unit == (c.unit or "")
        assert (str(c.range) in checked) == (c.range is not None) and ("not null" in checked) == c.not_null
        assert text.replace("\\", "") == c.description


def test_the_docs_page_holds_the_table_marker_once_and_only_there():
    hook = _hook()
    page = (ROOT / "docs" / "features.md").read_text()
    assert page.count(hook.MARKER) == 1 and "| `" not in page  # the table is generated, never written by hand
    from mkdocs.exceptions import PluginError

    with pytest.raises(PluginError, match="exactly once"):
        hook.render(page.replace(hook.MARKER, ""))
    for other in (ROOT / "docs").glob("*.md"):
        assert other.name == "features.md" or hook.MARKER not in other.read_text()


def test_windows_are_read_from_the_sql():
    assert (DECLARATION.window("GAP_WINDOW"), DECLARATION.window("HALT_WINDOW")) == (GAP_WINDOW, HALT_WINDOW)
    assert f"INTERVAL {int(HALT_WINDOW.total_seconds() // 60)} MINUTES" in SQL
    # Change the interval in the SQL and the window follows: Python's constant cannot disagree with it.
    longer = declare(SQL.replace("INTERVAL 30 MINUTES", "INTERVAL 45 MINUTES"), SNAPSHOT_SCHEMA)
    assert longer.window("HALT_WINDOW") == dt.timedelta(minutes=45)
    assert "45 minutes" in next(c.description for c in longer.columns if c.name == "has_recent_halt")
    assert say(dt.timedelta(minutes=5)) == "5 minutes" and say(dt.timedelta(seconds=90)) == "90 seconds"


ANNOTATED = "    ask_depth,  -- feature: unit=shares range=[0,) | Size on the top 5 ask levels\n"


@pytest.mark.parametrize(("edit", "error"), [
    (lambda s: s.replace(ANNOTATED, "    ask_depth,\n"), "ask_depth have no annotation"),
    (lambda s: s.replace(ANNOTATED, ANNOTATED + "    -- feature: | floating\n"), "names no column"),
    (lambda s: s.replace("mid * 10000\n", "mid * 10000  -- feature: | on the expression, not the name\n"),
     "names no column"),
    (lambda s: s.replace("mid * 10000\n", "mid * 10000 + 0 * mid  -- feature: | the mid again\n"),
     "mid is annotated twice"),
    (lambda s: s.replace("ELSE mid END\n", "ELSE mid END  -- feature: | a keyword\n"),
     "names END, which is no output column"),
    (lambda s: s.replace("range=[0,) | Size on the top 5 ask", "range=[0,] | Size on the top 5 ask"),
     "unbounded side is open"),
    (lambda s: s.replace("range=[0,) | Size on the top 5 ask", "range=(1,0) | Size on the top 5 ask"), "is empty"),
    (lambda s: s.replace("range=[0,) | Size on the top 5 ask", "range=0..1 | Size on the top 5 ask"),
     "not interval notation"),
    (lambda s: s.replace("unit=shares range=[0,) | Size on the top 5 ask", "units=shares | Size on the top 5 ask"),
     "unknown attribute"),
    (lambda s: s.replace(ANNOTATED, ANNOTATED.replace(" | Size on the top 5 ask levels", "")), "description"),
    (lambda s: s.replace("-- entity: |", "-- feature: |"), "exactly one column must be the entity"),
    (lambda s: s.replace("locked,  -- feature: |", "locked,  -- feature: range=[0,1] |"), "a range needs a number"),
    (lambda s: s.replace("  -- window: HALT_WINDOW", ""), "an INTERVAL must declare its window"),
    (lambda s: s.replace("  -- window: GAP_WINDOW", "  -- window: HALT_WINDOW"), "declared twice"),
    (lambda s: s.replace("trailing {GAP_WINDOW}", "trailing {GAP}"), "no declared window"),
])
def test_a_malformed_declaration_is_refused_naming_the_problem(edit, error):
    changed = edit(SQL)
    assert changed != SQL
    with pytest.raises(DeclarationError, match=re.escape(error)):
        declare(changed, SNAPSHOT_SCHEMA)


# ---- the proof: one line added to the SQL, nothing else touched ----------------------------------------------------
def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def _installed_copy(dest: Path) -> Path:
    """The package as a wheel installs it, under ``dest``: microstructure/ with transforms/, feature_repo/ and
    flows/ inside. Returns the copy's features.sql."""
    pkg = dest / "microstructure"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(Path(microstructure.__file__).parent, pkg, ignore=ignore)
    for name in ("transforms", "feature_repo", "flows"):
        shutil.copytree(package_dir(f"microstructure.{name}"), pkg / name, ignore=ignore)
    return pkg / "transforms" / "features.sql"


CHECK_THE_COPY = r"""
import datetime as dt, json, sys
import pyarrow as pa
import microstructure, microstructure.flows
from microstructure.contract.schemas import TRANSFORMS_DIR
from microstructure.store.repo import FEATURE_REPO
from microstructure.contract.book import BookQuote, table_from_quotes, validate
from microstructure.features.compute import compute_features
from microstructure.checks.suites import _expectations
from microstructure.checks.sql import SqlChecker
from microstructure.checks.ge import Checker

t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=1)
quotes = [BookQuote(s, t0, t0 + dt.timedelta(milliseconds=50), "test", ((100.0, 300.0), (99.9, 10.0)),
                    ((100.1, 100.0),), False) for s in ("AAA", "BBB")]
feats = compute_features(validate(table_from_quotes(quotes)).clean)
bad = feats.set_column(feats.schema.get_field_index("total_depth"), "total_depth",
                       pa.array([-1.0, *feats.column("total_depth").to_pylist()[1:]]))
res, served, quarantined = SqlChecker().split("features", bad)
ge = Checker().check("features", bad)
print(json.dumps({
    "paths": [microstructure.__file__, str(TRANSFORMS_DIR), str(FEATURE_REPO), microstructure.flows.__file__],
    "expectations": [dict(e.configuration.kwargs) for e in _expectations("features")
                     if e.configuration.kwargs.get("column") == "total_depth"],
    "computed": feats.select(["bid_depth", "ask_depth", "total_depth"]).to_pylist(),
    "sql": [served.column("symbol").to_pylist(), quarantined.column("symbol").to_pylist(),
            quarantined.column("reason").to_pylist()],
    "ge": [ge.success, ge.failures],
}))
"""


@pytest.mark.integration  # the CLI in subprocesses, on a copy of the package
def test_a_column_added_to_the_sql_is_computed_checked_served_and_joined(tmp_path):
    copy = tmp_path / "site"
    features_sql = _installed_copy(copy)
    before = _tree(copy)
    text = features_sql.read_text()
    anchor = "    ask_depth,  -- feature:"
    assert text.count(anchor) == 1
    features_sql.write_text(text.replace(anchor, NEW_COLUMN + anchor))
    changed = {k for k, v in _tree(copy).items() if before.get(k) != v}
    assert changed == {"microstructure/transforms/features.sql"}  # one file, one line

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(copy), os.environ.get("PYTHONPATH")]))}
    data = tmp_path / "data"

    def start(*args: object) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, *map(str, args)], env=env, cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def done(p: subprocess.Popen) -> str:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        return out

    # The checks, in a process of their own beside the run (both import the copy).
    check = start("-c", CHECK_THE_COPY)
    run = done(start("-m", "microstructure", "run", "--data-dir", data, "--cycles", 3, "--symbols", 2, "--json"))
    got = json.loads(done(check))

    # The subprocesses imported the copy: its package, SQL, Feast repository and flows.
    assert all(Path(p).resolve().is_relative_to(copy.resolve()) for p in got["paths"]), got["paths"]

    # Computed: by the SQL run (and by the offline build of `run`, into the lake's Parquet).
    assert all(r["total_depth"] == r["bid_depth"] + r["ask_depth"] for r in got["computed"])
    lake = pq.read_table(next((data / "lake" / "features").glob("date=*/*.parquet"))).to_pandas()
    assert len(lake) == 6 and (lake["total_depth"] == lake["bid_depth"] + lake["ask_depth"]).all()
    empty = pq.read_schema(data / "lake" / "features" / "_schema" / "empty.parquet")
    assert empty.field("total_depth").type == pa.float64()
    assert json.loads(run)["builds"][0]["published"]

    # Checked: the declared range is in the suite, and a value outside it is caught (row-level, and by GE).
    assert got["expectations"] == [{"column": "total_depth", "min_value": 0, "max_value": sys.float_info.max}]
    assert got["sql"] == [["BBB"], ["AAA"], ["expect_column_values_to_be_between(total_depth)"]]
    assert got["ge"] == [False, ["expect_column_values_to_be_between(total_depth): 1 rows"]]

    # Served online and joined offline (point in time, through Feast), side by side.
    latest = lake.sort_values("event_ts").groupby("symbol").tail(1)
    entities = tmp_path / "entities.csv"
    pd.DataFrame({"symbol": lake["symbol"], "event_timestamp": lake["received_ts"]}).to_csv(entities, index=False)
    online = start("-m", "microstructure", "online", *latest["symbol"], "--data-dir", data, "--freshness", 86400,
                   "--json")
    joined_path = tmp_path / "joined.parquet"
    done(start("-m", "microstructure", "training-set", "--entities", entities, "--out", joined_path,
               "--data-dir", data))
    rows = json.loads(done(online))
    assert [r["symbol"] for r in rows] == list(latest["symbol"]) and all(r["found"] for r in rows)
    want = dict(zip(latest["symbol"], latest["total_depth"], strict=True))
    assert {r["symbol"]: r["total_depth"] for r in rows} == want
    joined = pd.read_parquet(joined_path)
    assert len(joined) == len(lake) and joined["total_depth"].notna().all()
    assert (joined["total_depth"].to_numpy() == lake["total_depth"].to_numpy()).all()
