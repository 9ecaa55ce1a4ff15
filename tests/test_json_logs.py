"""The poll's log lines on stderr: JSON (a line per cycle and per warning, every error attributed to its source and
symbols, no key ever) or text (a line a minute when stderr is no terminal, so a piped or daemonised poll shows
progress)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest

from microstructure.jobs.logs import CycleLog, formatter, poll_logger
from microstructure.jobs.runner import PollError, run_poll
from tests.vendor_server import (
    ALPACA_CRYPTO,
    ALPACA_STOCKS,
    POLY_STOCKS,
    SECRET_ID,
    SECRET_KEY,
    SECRET_POLY,
    poly_crypto_path,
)

SECRETS = (SECRET_POLY, SECRET_ID, SECRET_KEY)


def cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real command, its stdout and stderr pipes (no terminal), as a service manager runs it."""
    return subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env if env is not None else dict(os.environ))


def lines(text: str) -> list[dict]:
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]


def test_json_log_has_one_line_per_cycle_with_coverage_by_source(data_dir, capsys):
    stats = run_poll(data_dir, 4, 0, 2.0, 3, 5, False, False, log_format="json")
    err = capsys.readouterr().err
    got = lines(err)
    assert len(got) == len(err.strip().splitlines()) == 4  # nothing but JSON lines, one per cycle
    assert [g["cycle"] for g in got] == [1, 2, 3, 4] and {g["event"] for g in got} == {"cycle"}
    assert all(g["level"] == "INFO" and g["logger"] == "microstructure.poll" and g["timestamp"] for g in got)
    assert sum(g["written"] for g in got) == got[-1]["written_total"] == stats.written
    assert got[-1]["cycle_coverage_by_source"] == {"simulated": {"l2": 3, "shallow": 0, "l1_only": 0, "none": 0}}
    assert got[-1]["coverage"] == stats.coverage()


def test_no_log_format_writes_no_lines(data_dir, capsys):
    run_poll(data_dir, 2, 0, 2.0, 2, 5, False, False)
    assert capsys.readouterr().err == ""


def test_unknown_log_format_is_refused(data_dir):
    with pytest.raises(PollError, match="text or json"):
        run_poll(data_dir, 2, 0, 2.0, 2, 5, False, False, log_format="xml")


def test_text_log_writes_a_line_a_minute(data_dir):
    """The text format's cadence, on an injected clock: the first cycle, then one a minute."""
    from microstructure.jobs.poll import PollStats

    buf = io.StringIO()
    now = [0.0]
    with poll_logger("text", buf) as log:
        cl = CycleLog(log, "text", monotonic=lambda: now[0])
        for i, t in enumerate([0.0, 2.0, 59.0, 61.0, 100.0, 122.0]):
            now[0] = t
            cl.cycle(i, PollStats(cycles=i + 1, written=3 * (i + 1)))
    out = buf.getvalue().splitlines()
    assert [ln.split(" INFO ", 1)[1].split(":", 1)[0] for ln in out] == ["cycle 1", "cycle 4", "cycle 6"]
    assert "18 snapshots written" in out[-1]


def test_formatter_scrubs_a_key_wherever_it_is(monkeypatch):
    """Defence in depth: whatever puts a key into a log record (message, a field, a nested field, a list), the
    line carries ``***``; a key with characters JSON escapes is caught before it is escaped."""
    key = 'pk_LIVE_"quoted"\\_12345'
    monkeypatch.setenv("POLYGON_API_KEY", key)
    rec = logging.LogRecord("microstructure.poll", logging.WARNING, __file__, 1, f"vendor said {key}", None, None)
    rec.detail = {"body": f"Authorization: Bearer {key}", "sent": [key]}
    for fmt in ("json", "text"):
        line = formatter(fmt).format(rec)
        assert key not in line and json.dumps(key)[1:-1] not in line and "***" in line, line
    parsed = json.loads(formatter("json").format(rec))
    assert parsed["message"] == "vendor said ***" and parsed["detail"]["sent"] == ["***"]


@pytest.mark.integration
def test_piped_poll_prints_progress_lines_and_json_on_request(tmp_path):
    """A live poll whose stderr is a pipe (no progress bar can draw) says it is alive in text by default; with
    $MICROSTRUCTURE_LOG_FORMAT=json (or --log-format json) every cycle is a JSON line; stdout keeps the result."""
    d = tmp_path / "data"
    r = cli("poll", "--interval", "0.2", "--cycles", "3", "--symbols", "2", "--seed", "3", "--no-online",
            "--data-dir", d)
    assert r.returncode == 0, r.stderr
    text = [ln for ln in r.stderr.splitlines() if " INFO cycle " in ln]
    assert text and "cycle 1: " in text[0] and "snapshots written" in text[0]
    env = {**os.environ, "MICROSTRUCTURE_LOG_FORMAT": "json"}
    r = cli("poll", "--interval", "0.2", "--cycles", "3", "--symbols", "2", "--no-online", "--json",
            "--data-dir", d, env=env)
    assert r.returncode == 0, r.stderr
    assert [g["cycle"] for g in lines(r.stderr) if g["event"] == "cycle"] == [1, 2, 3]
    assert json.loads(r.stdout)["cycles"] == 3  # the result alone on stdout
    bad = cli("poll", "--log-format", "xml", "--data-dir", d)
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1 and "text or json" in bad.stderr


@pytest.mark.integration
def test_vendor_echoing_its_key_leaves_no_key_in_the_json_log(env, tmp_path):
    """Vendors whose errors echo our key headers: each failure is a WARNING line naming its source, error class and
    symbols, with the vendor's words scrubbed; no line, and nothing on stdout, carries a key."""
    from tests.test_hostile_keys import chain_toml, echo

    env.expect_request(POLY_STOCKS).respond_with_handler(echo(403))
    env.expect_request(ALPACA_STOCKS).respond_with_handler(echo(500))
    env.expect_request(ALPACA_CRYPTO).respond_with_handler(echo(403))
    env.expect_request(poly_crypto_path("X:BTCUSD")).respond_with_handler(echo(500))
    r = cli("poll", "--source", "chain", "--sources-config", chain_toml(tmp_path), "--interval", "1", "--cycles", "2",
            "--no-online", "--json", "--log-format", "json", "--data-dir", tmp_path / "data")
    assert r.returncode == 0, r.stderr
    answered = b"".join(resp.get_data() for _, resp in env.log)
    assert all(k.encode() in answered for k in SECRETS)  # the attack happened
    for k in SECRETS:
        assert k not in r.stderr and k not in r.stdout
    got = lines(r.stderr)
    assert len([g for g in got if g["event"] == "cycle"]) == 2
    errors = [g for g in got if g["event"] == "source_errors"]
    assert errors and all(g["level"] == "WARNING" for g in errors)
    by = {(g["source"], g["error_class"]): g for g in errors if g["cycle"] == 1}
    assert {src for src, _ in by} >= {"polygon", "alpaca", "alpaca_crypto", "polygon_crypto"}, sorted(by)
    stocks = [g for (src, _), g in by.items() if src in ("polygon", "alpaca")]
    assert all(set(g["symbols"]) == {"AAPL", "MSFT", "NVDA"} and g["count"] == 3 for g in stocks), stocks
    assert any(g["detail"] and "***" in g["detail"] for g in errors)
    last = [g for g in got if g["event"] == "cycle"][-1]
    assert last["cycle_coverage_by_source"] == {"none": {"l2": 0, "shallow": 0, "l1_only": 0, "none": 4}}


@pytest.mark.parametrize("name", ['poly\n{"event": "cycle", "written": 999}', "x | ![](http://evil.example/p.png)",
                                  "poly: ok; alpaca", "\x1b[2Jpoly", 'p"} 1\nmicrostructure_snapshots_written_total'])
def test_a_hostile_source_name_in_the_sources_file_is_refused_before_any_log_label_or_artifact(tmp_path, name):
    """A source's name goes into JSON/text log lines, metric labels, the poll-health table and the outcome details
    that failed_calls and coverage parse back ("name: result; ..."): a name forging lines, markup or attribution is
    a one-line config error when the file is read, before any poll."""
    from microstructure.sources.chain_config import build_chain
    from microstructure.sources.vendor import ConfigError

    cfg = tmp_path / "sources.toml"
    cfg.write_text(f'[sources.{json.dumps(name)}]\nkind = "polygon"\n\n[groups.stocks]\nchain = [{json.dumps(name)}]\n'
                   'symbols = ["AAPL"]\n')
    with pytest.raises(ConfigError, match="source name") as e:
        build_chain(cfg)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)


def test_a_key_in_a_field_that_is_no_string_never_reaches_the_json_line(monkeypatch):
    """An exception, a path, bytes or a set put in a record's fields is made text by the serialiser after the scrub
    (bytes as base64): the key it holds must be scrubbed all the same."""
    import base64
    import datetime as dt
    from pathlib import Path

    key = "pk_LIVE_0123456789abcdef"
    monkeypatch.setenv("POLYGON_API_KEY", key)
    rec = logging.LogRecord("microstructure.poll", logging.WARNING, __file__, 1, "source_errors", None, None)
    rec.error = ValueError(f"vendor said apiKey {key}")
    rec.path = Path(f"/tmp/{key}/x")
    rec.body = f"echo {key}".encode()
    rec.names = {key}
    rec.at = dt.datetime(2026, 11, 30, 15, 30, tzinfo=dt.UTC)
    line = formatter("json").format(rec)
    assert key not in line and base64.b64encode(rec.body).decode() not in line, line
    got = json.loads(line)
    assert got["error"] == "ValueError: vendor said apiKey ***" and got["body"] == "echo ***"
    assert got["names"] == ["***"] and got["at"] == "2026-11-30T15:30:00+00:00"


def test_one_sources_error_text_is_never_shown_under_another_sources_name():
    """polygon forbidden, then alpaca timed out: the outcome's text after " | " is alpaca's. polygon's source_errors
    line must not carry it as polygon's answer; alpaca's line does."""
    import datetime as dt

    import pyarrow as pa

    from microstructure.contract.outcomes import OUTCOMES_SCHEMA
    from microstructure.jobs.poll import PollStats

    at = dt.datetime(2026, 11, 30, 15, 0, tzinfo=dt.UTC)
    out = pa.Table.from_pylist([{"cycle_ts": at, "symbol": s, "source": None, "book_levels": 0, "latency_ms": None,
                                 "error_class": "timeout",
                                 "detail": "polygon: forbidden; alpaca: timeout | alpaca: read timed out after 2 s"}
                                for s in ("AAPL", "MSFT")], schema=OUTCOMES_SCHEMA)
    buf = io.StringIO()
    with poll_logger("json", buf) as log:
        CycleLog(log, "json").cycle(0, PollStats(cycles=1, last_outcomes=out))
    by = {g["source"]: g for g in lines(buf.getvalue()) if g["event"] == "source_errors"}
    assert set(by) == {"polygon", "alpaca"} and by["polygon"]["symbols"] == ["AAPL", "MSFT"]
    assert "read timed out" not in by["polygon"]["detail"] and by["polygon"]["detail"].startswith("polygon: forbidden")
    assert "read timed out" in by["alpaca"]["detail"]
