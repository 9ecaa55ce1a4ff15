"""Exit codes of the commands that look symbols up (docs/cli.md "Exit codes"): 0 when every symbol asked for has
data, 1 when one has none (the whole answer still printed, found false for it, and one `not found:` line on
stderr naming it), 2 for bad input as before.

Failing before: `online`, `picks` and `poll --symbol` answered a symbol nobody has with exit 0, so a script could
not tell without parsing the answer (test_online_*_unknown_*, test_picks_*_no_data_*, test_poll_*_never_served_*).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # the CLI in subprocesses

KNOWN = ["MEGA01", "LRG01"]  # the first symbols of the simulated universe: polled by the fixture


def cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "COLUMNS": "120"})


@pytest.fixture(scope="module")
def polled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("exit") / "data"
    r = cli("poll", "--data-dir", d, "--interval", 0, "--cycles", 3, "--symbols", 3, "--json")  # online too
    assert r.returncode == 0, r.stderr
    return d


def test_online_with_every_symbol_known_exits_0(polled):
    r = cli("online", *KNOWN, "--data-dir", polled, "--freshness", 86400, "--json")
    assert r.returncode == 0, r.stderr
    assert [x["found"] for x in json.loads(r.stdout)] == [True, True] and r.stderr == ""


def test_online_a_stale_book_is_not_unknown_exit_0(polled):
    r = cli("online", "MEGA01", "--data-dir", polled, "--freshness", 0.001, "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)[0]
    assert row["found"] is True and row["stale"] is True


def test_online_an_unknown_symbol_exits_1_with_the_whole_answer_printed(polled):
    r = cli("online", "MEGA01", "NOPE", "LRG01", "--data-dir", polled, "--freshness", 86400, "--json")
    assert r.returncode == 1, r.stderr
    rows = json.loads(r.stdout)
    assert [x["symbol"] for x in rows] == ["MEGA01", "NOPE", "LRG01"]
    assert [x["found"] for x in rows] == [True, False, True]
    assert r.stderr == "not found: NOPE (no online row that can be served)\n"


def test_online_table_for_an_unknown_symbol_is_a_readable_row(polled):
    r = cli("online", "NOPE", "MEGA01", "--data-dir", polled, "--freshness", 86400)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stdout.splitlines()
    head = next(line for line in lines if "NOPE" in line)
    assert "MEGA01" in head  # one column per symbol, the unknown one among them
    found = next(line for line in lines if "found" in line)
    assert "False" in found and "True" in found
    spread = next(line for line in lines if "spread_bps" in line)
    assert " - " in spread  # its cells say "no value", never blank
    assert r.stderr.startswith("not found: NOPE")


def test_online_bad_input_still_exits_2(polled):
    r = cli("online", "A" * 300, "--data-dir", polled)
    assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    r = cli("online", "NOPE", "--data-dir", polled.parent / "no-such-dir")
    assert r.returncode == 2 and r.stderr.startswith("error:"), r.stderr


def test_online_many_unknown_symbols_are_named_in_one_bounded_line(polled):
    names = [f"NOPE{i:02d}" for i in range(25)]
    r = cli("online", *names, "--data-dir", polled, "--json")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("not found: NOPE00, NOPE01,") and "and 15 more" in r.stderr
    assert len(json.loads(r.stdout)) == 25


def picks_file(tmp_path: Path, *symbols: str) -> Path:
    f = tmp_path / "picks.csv"
    f.write_text("symbol,side,score,mode\n" + "".join(f"{s},buy,0.5,SAFE\n" for s in symbols))
    return f


def test_picks_with_no_data_for_a_symbol_exits_1_and_prints_every_pick(polled, tmp_path):
    f = picks_file(tmp_path, "MEGA01", "NOPE")
    r = cli("picks", "--in", f, "--data-dir", polled, "--json")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert [p["symbol"] for p in out["picks"]] == ["MEGA01", "NOPE"]
    assert out["picks"][1]["filter"] == "no_data" and out["picks"][0]["filter"] != "no_data"
    assert r.stderr == "not found: NOPE (no order-book data; dropped)\n"
    table = cli("picks", "--in", f, "--data-dir", polled)  # a person's table: the row is there, readable
    assert table.returncode == 1 and "Traceback" not in table.stdout + table.stderr
    assert "NOPE" in table.stdout and "no order-book data" in table.stdout


def test_picks_with_data_for_every_symbol_exits_0_even_when_dropped(polled, tmp_path):
    # Dropped for a stale book (the simulated clock's books are minutes old), not for a missing one: exit 0.
    r = cli("picks", "--in", picks_file(tmp_path, *KNOWN), "--data-dir", polled, "--json")
    assert r.returncode == 0, r.stderr
    assert all(p["filter"] != "no_data" for p in json.loads(r.stdout)["picks"])


def test_poll_a_named_symbol_never_served_exits_1(polled, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(polled, d)
    r = cli("poll", "--data-dir", d, "--interval", 0, "--cycles", 2, "--symbol", "MEGA01", "--symbol", "NOPE",
            "--no-online", "--json")
    assert r.returncode == 1, r.stderr
    stats = json.loads(r.stdout)
    assert stats["coverage"]["none"] == 1 and stats["quarantined"] == {"unknown_symbol": 2}
    # A piped poll logs a text summary line on stderr first (jobs/logs.py); the verdict is the last line.
    assert r.stderr.splitlines()[-1] == "not found: NOPE (no source served it in any cycle)", r.stderr


def test_poll_named_symbols_all_served_exits_0(polled, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(polled, d)
    r = cli("poll", "--data-dir", d, "--interval", 0, "--cycles", 1, "--symbol", "MEGA01", "--no-online", "--json")
    assert r.returncode == 0, r.stderr
