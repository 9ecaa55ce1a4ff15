"""Tables for people, JSON for programs (issue 19, item 6): a table rounds each number by the unit its feature
declares in features.sql (text.UNIT_FORMATS), lays three symbols out side by side in 120 columns, and still shows
data as data; `--json` keeps every digit."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from microstructure.contract.schemas import DECLARATION
from microstructure.contract.text import UNIT_FORMATS, formatted, number, price

THREE = ["MEGA01", "LRG01", "MID01"]
TOO_MANY_DECIMALS = re.compile(r"\d\.\d{7,}")
# What each unit's cell looks like: the rule, checked on its shape rather than by calling it again.
SHAPES = {
    "bps": r"-?[\d,]+\.\d{2}",
    "none": r"-?\d\.\d{3}",
    "USD": r"-?\$[\d,]+",
    "USD/share": r"[\d,]+\.\d{2}|0\.\d{4,6}",
    "shares": r"[\d,]+(\.\d{1,6})?",
    "levels": r"[\d,]+",
    "fraction": r"[\d,]+\.\d{2}%",
    "s": r"-?[\d,]+\.\d{3}",
    "µs": r"\d+",  # an epoch in microseconds: its digits, no separators
}


def cli(*args, columns: int = 120, code: int = 0) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "COLUMNS": str(columns)})
    assert p.returncode == code, p.stderr[-2000:]
    return p


def shown(text: str) -> float:
    """The number a cell shows: separators, $ and % dropped (a percent back to a fraction)."""
    v = float(text.replace(",", "").replace("$", "").rstrip("%"))
    return v / 100 if text.endswith("%") else v


def step(text: str) -> float:
    """Half the last shown digit's place: how far a correctly rounded cell may sit from the exact value."""
    decimals = len(text.rstrip("%").partition(".")[2])
    scale = 100 if text.endswith("%") else 1
    return 0.5 * 10**-decimals / scale


def test_every_declared_unit_has_one_rule():
    units = {c.unit or "none" for c in DECLARATION.features}
    assert units <= UNIT_FORMATS.keys(), units - UNIT_FORMATS.keys()
    assert units >= {"bps", "USD", "USD/share", "shares", "levels", "fraction", "none"}


def test_the_rules_by_unit():
    assert formatted(211.267605633803, "bps") == "211.27" and formatted(-0.2143, "none") == "-0.214"
    assert formatted(1234567.5, "USD") == "$1,234,568" and formatted(12345.0, "shares") == "12,345"
    assert formatted(0.012345, "fraction") == "1.23%" and formatted(1.23456, "s") == "1.235"
    assert price(328.295) == "328.30" and price(328.3) == "328.30" and price(61234.5) == "61,234.50"
    assert price(0.5) == "0.5000" and price(0.51234) == "0.51234" and price(0.512345678) == "0.512346"
    assert formatted(None, "bps") == "-" and formatted(float("nan"), "USD") == "-" and formatted(True, "none") == "True"
    assert formatted(-0.00001, "none") == "0.000"  # no "-0.000"
    # Anything without a unit: at most 6 decimals, and a tiny non-zero number never reads 0.
    assert number(27491.699999999997) == "27,491.7" and number(0.1234567891) == "0.123457"
    assert number(1.5e-9) == "1.50e-09" and number(3) == "3"
    assert formatted(1795444202123456, "µs") == "1795444202123456"


@pytest.mark.integration
def test_the_unit_map_on_real_feature_rows(ran):
    d, _ = ran
    rows = json.loads(cli("sql", "SELECT * FROM features ORDER BY symbol, event_ts LIMIT 200", "--data-dir", d,
                          "--json").stdout)
    units = {c.name: c.unit or "none" for c in DECLARATION.features}
    checked = set()
    for r in rows:
        for name, unit in units.items():
            v = r.get(name)
            if not isinstance(v, int | float) or isinstance(v, bool):
                continue
            t = formatted(v, unit)
            assert re.fullmatch(SHAPES[unit], t), (name, v, t)
            assert not TOO_MANY_DECIMALS.search(t)
            assert math.isclose(shown(t), v, abs_tol=step(t) + 1e-9), (name, v, t)
            checked.add(unit)
    assert checked >= {"bps", "USD", "USD/share", "shares", "levels", "fraction", "none"}


@pytest.mark.integration
def test_online_for_three_symbols_fits_120_columns_and_matches_json(ran):
    d, _ = ran
    table = cli("online", *THREE, "--data-dir", d).stdout
    rows = json.loads(cli("online", *THREE, "--data-dir", d, "--json").stdout)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 120, table
    assert not TOO_MANY_DECIMALS.search(table), table
    # Symbols as columns, features as lines: one "│ name │ v1 │ v2 │ v3 │" line per feature.
    cells = {}
    for line in lines:
        parts = [p.strip() for p in re.split("[│┃]", line)[1:-1]]  # ┃: the header row
        if len(parts) == 4:
            cells[parts[0]] = parts[1:]
    assert cells["symbol"] == THREE, table
    units = {c.name: c.unit or "none" for c in DECLARATION.features} | {"age_s": "s"}
    compared = 0
    for name, unit in units.items():
        if name not in cells:
            continue
        for r, t in zip(rows, cells[name], strict=True):
            v = r[name]
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            assert re.fullmatch(SHAPES[unit], t), (name, v, t)
            if name != "age_s":  # two reads, two ages: only its shape compares
                assert math.isclose(shown(t), v, abs_tol=step(t) + 1e-9), (name, v, t)
                compared += 1
    assert compared == 3 * 10, cells  # book_levels, 2 prices, spread, 2 imbalances, 2 depths, dollars, gap
    assert all(isinstance(r["spread_bps"], float) for r in rows)  # --json: the exact float, not a rounded text


@pytest.mark.integration
def test_markup_and_control_characters_in_a_symbol_are_shown_as_data(ran):
    d, _ = ran
    hostile = "[red]X[/red]\x1b[2J"
    for columns in (120, 60):  # side by side, and folded into blocks
        p = cli("online", "MEGA01", hostile, "--data-dir", d, columns=columns, code=1)  # 1: nobody has it
        out = p.stdout
        assert "\x1b" not in p.stderr and "[red]X[/red]\\x1b[2J" in p.stderr, p.stderr  # named as data too
        assert "\x1b" not in out and "[red]X[/red]\\x1b[2J" in out, out
