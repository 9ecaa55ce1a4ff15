"""Numbers, cells and JSON as the CLI prints them: tables at most 6 decimals without float noise (the rules by unit
are in test_tables_for_people.py), and strict JSON at full precision (NaN and infinities become null). The CLI's
tables folding at 80 columns are in test_cli_commands.py."""

from __future__ import annotations

import json

from microstructure.contract.text import cell, dumps, number


def test_tables_show_at_most_six_decimals_and_json_keeps_every_digit():
    assert number(328.29) == "328.29" and number(328.3) == "328.3" and number(1234567.5) == "1,234,567.5"
    assert number(27491.699999999997) == "27,491.7" and number(100.0) == "100" and number(-0.125) == "-0.125"
    assert number(211.267605633803) == "211.267606" and number(-1e-7) == "-1.00e-07"
    assert cell({"l2": 150, "none": 0}) == "l2 150, none 0"
    assert json.loads(dumps({"x": float("nan"), "y": [float("inf")]})) == {"x": None, "y": [None]}
    assert json.loads(dumps({"spread_bps": 211.267605633803})) == {"spread_bps": 211.267605633803}
