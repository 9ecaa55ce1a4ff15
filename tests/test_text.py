"""Numbers, cells and JSON as the CLI prints them: full precision without float noise, and strict JSON (NaN and
infinities become null). The CLI's tables folding at 80 columns are in test_cli_commands.py."""

from __future__ import annotations

import json

from microstructure.contract.text import cell, dumps, number


def test_tables_keep_full_precision():
    assert number(328.29) == "328.29" and number(328.3) == "328.3" and number(1234567.5) == "1,234,567.5"
    assert number(27491.699999999997) == "27,491.7" and number(100.0) == "100" and number(-0.125) == "-0.125"
    assert cell({"l2": 150, "none": 0}) == "l2 150, none 0"
    assert json.loads(dumps({"x": float("nan"), "y": [float("inf")]})) == {"x": None, "y": [None]}
