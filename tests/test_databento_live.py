"""``--source databento``: the official ``databento`` SDK's live client against a local gateway speaking Databento's
live protocol (CRAM auth, subscription lines, a DBN stream; ``tests/databento_gateway.py``). Nothing is patched:
the SDK is pointed at the stand-in by ``MICROSTRUCTURE_DATABENTO_LIVE_GATEWAY``, the one way there is.

The poll runs through the CLI for 150 symbols, the gateway hangs up mid-run and flags a gap for one symbol; the lake
must then hold exactly the records the gateway sent (ten levels each), the gap as an outcome and a quarantine row,
and the symbol served again once a clean record came.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from microstructure.contract.book import LEVEL_COLUMNS
from microstructure.lake.paths import LakePaths
from microstructure.lake.views import connect
from microstructure.sources.chain_config import build_chain
from microstructure.sources.guard import SourceError
from microstructure.sources.vendor import ConfigError
from tests.databento_gateway import DatabentoGateway

KEY = "db-SECRET7dbKeyForTests4f2a9"
SYMBOLS = [f"T{i:03d}" for i in range(150)]
GAPPED = "T007"


def _env(gateway: str, key: str = KEY) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("POLYGON_API_KEY", "APCA_API_KEY_ID",
                                                            "APCA_API_SECRET_KEY", "MICROSTRUCTURE_ONLINE_STORE")}
    return {**env, "DATABENTO_API_KEY": key, "MICROSTRUCTURE_DATABENTO_LIVE_GATEWAY": gateway}


def _cli(*args: object, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "microstructure", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_acks(ack: Path, n: int, proc: subprocess.Popen[str], limit_s: float = 120) -> None:
    """Until the poller has acknowledged ``n`` cycles (the test acts between cycles, not at guessed times)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if ack.exists() and len(ack.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"poll ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"no {n} acknowledged cycles within {limit_s} s")


@pytest.mark.integration  # the CLI's live poll in a subprocess against the stand-in gateway, ~12 one-second cycles
def test_poll_databento_serves_150_symbols_ten_levels_through_a_drop_and_a_gap(tmp_path):
    d, ack, syms = tmp_path / "data", tmp_path / "ack.log", tmp_path / "symbols.txt"
    syms.write_text("\n".join(SYMBOLS) + "\n")
    cycles = 12
    with DatabentoGateway(KEY, SYMBOLS, period_s=0.2) as gw:
        proc = _cli("poll", "--source", "databento", "--symbols-file", syms, "--interval", 1, "--cycles", cycles,
                    "--no-online", "--json", "--data-dir", d, "--ack-log", ack, env=_env(gw.address))
        try:
            _wait_acks(ack, 3, proc)
            assert gw.drop() == 1  # the gateway hangs up on the one streaming session
            _wait_acks(ack, 6, proc)
            gw.gap(GAPPED)
            _wait_acks(ack, 8, proc)
            gw.release(GAPPED)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        st = gw.state
    assert proc.returncode == 0, err
    assert st.sessions >= 2 and all(sorted(s) == SYMBOLS for s in st.subscribed)  # reconnected, resubscribed all
    assert KEY not in out + err and not any(KEY in line for line in st.auth_lines)  # CRAM: the key never travels

    con = connect(LakePaths(d))
    # Every symbol served, each book with ten levels (MBP-10 is real depth, not L1).
    levels = dict(con.sql("SELECT symbol, min(book_levels) FROM snapshots GROUP BY 1").fetchall())
    assert sorted(levels) == SYMBOLS and set(levels.values()) == {10}
    assert con.sql("SELECT DISTINCT source FROM snapshots").fetchall() == [("databento_stocks",)]

    # Each book in the lake is exactly a record the gateway sent: same ts_event, same ten prices and sizes a side;
    # received when it arrived (never before it was sent), never the flagged record.
    cols = ", ".join(LEVEL_COLUMNS)
    rows = con.sql(f"SELECT symbol, epoch_us(event_ts), epoch_us(received_ts), {cols} FROM snapshots").fetchall()
    assert len(rows) >= 150 * (cycles - 4)
    for sym, ev_us, recv_us, *vals in rows:
        rec = st.sent.get((sym, ev_us * 1000))
        assert rec is not None, (sym, ev_us)
        want = {}
        for i, ((bp, bs), (ap, as_)) in enumerate(zip(rec.bids, rec.asks, strict=True), start=1):
            want |= {f"bid_px_{i}": bp / 1e9, f"bid_sz_{i}": float(bs), f"ask_px_{i}": ap / 1e9,
                     f"ask_sz_{i}": float(as_)}
        assert dict(zip(LEVEL_COLUMNS, vals, strict=True)) == pytest.approx(want, rel=1e-12), sym
        assert recv_us >= rec.sent_ns // 1000 and not rec.flags & 4
    flagged_ts = st.gaps[GAPPED]
    assert (GAPPED, flagged_ts) not in {(s, e * 1000) for s, e, *_ in rows}

    # The gap: an outcome with its reason for the cycles it lasted, the flagged record quarantined (once), then the
    # symbol served again from its next clean record.
    by_cycle = con.sql("SELECT cycle_ts, error_class, detail FROM outcomes WHERE symbol = ? ORDER BY cycle_ts",
                       params=[GAPPED]).fetchall()
    flagged = [i for i, (_, c, detail) in enumerate(by_cycle) if c == "gap" and "unrecoverable gap" in detail]
    assert flagged and "databento_stocks: gap" in by_cycle[flagged[0]][2]
    assert None in [c for _, c, _ in by_cycle[flagged[-1]:]]  # recovered
    q = con.sql("SELECT reason, detail FROM quarantine WHERE symbol = ?", params=[GAPPED]).fetchall()
    assert [r for r, _ in q] == ["gap"] and f"ts_event={flagged_ts}" in q[0][1]

    # The drop was survived: a reconnect's books were gaps until fresh records came, and the last cycle served every
    # symbol again.
    after_drop = con.sql("SELECT count(*) FROM outcomes WHERE error_class IN ('gap', 'connection') "
                         "AND (detail LIKE '%reconnect%' OR error_class = 'connection')").fetchall()[0][0]
    assert after_drop > 0
    last = con.sql("SELECT count(*) FILTER (WHERE error_class IS NULL) FROM outcomes "
                   "WHERE cycle_ts = (SELECT max(cycle_ts) FROM outcomes)").fetchall()[0][0]
    assert last == 150
    stored = con.sql("SELECT string_agg(detail, ' ') FROM outcomes").fetchall()[0][0] or ""
    assert KEY not in stored

    # What `coverage` reports: all 150 with L2.
    cov = subprocess.run([sys.executable, "-m", "microstructure", "coverage", "--data-dir", str(d), "--json"],
                         capture_output=True, text=True, timeout=120, env=_env("127.0.0.1:1"))
    assert cov.returncode == 0, cov.stderr
    overall = json.loads(cov.stdout)["overall"]
    assert (overall["symbols"], overall["l2"], overall["none"]) == (150, 150, 0)


@pytest.mark.integration  # the CLI in a subprocess
def test_databento_bad_key_is_one_error_line_and_exit_2(tmp_path):
    wrong = "db-WRONGkeyNeverValid0000"
    with DatabentoGateway(KEY, SYMBOLS[:3]) as gw:
        p = subprocess.run([sys.executable, "-m", "microstructure", "poll", "--source", "databento", "--symbol", "T000",
                            "--interval", "1", "--cycles", "2", "--no-online", "--data-dir", str(tmp_path / "d")],
                           capture_output=True, text=True, timeout=120, env=_env(gw.address, key=wrong))
        st = gw.state
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "DATABENTO_API_KEY" in lines[0], lines
    assert wrong not in p.stdout + p.stderr
    assert st.sessions == 0 and len(st.auth_lines) == 1  # one try: a refused key is not retried


def test_databento_gateway_override_refuses_a_non_loopback_host(monkeypatch):
    from microstructure.sources.databento_live import DatabentoLiveSource

    monkeypatch.setenv("DATABENTO_API_KEY", KEY)
    for bad in ("xnas-itch.lsg.databento.com.evil.example:13000", "10.0.0.5", "[2001:db8::1]:13000",
                "127.0.0.1:notaport"):
        monkeypatch.setenv("MICROSTRUCTURE_DATABENTO_LIVE_GATEWAY", bad)
        with pytest.raises(ConfigError, match="MICROSTRUCTURE_DATABENTO_LIVE_GATEWAY") as e:
            DatabentoLiveSource(symbols=["AAPL"])
        assert KEY not in str(e.value)


def test_sources_file_setting_the_databento_gateway_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DATABENTO_API_KEY", KEY)
    monkeypatch.delenv("MICROSTRUCTURE_DATABENTO_LIVE_GATEWAY", raising=False)
    cfg = tmp_path / "sources.toml"
    cfg.write_text('[sources.db]\nkind = "databento"\ngateway = "attacker.example:13000"\n'
                   '[groups.stocks]\nchain = ["db"]\nsymbols = ["AAPL"]\n')
    with pytest.raises(ConfigError, match="gateway cannot be set in a sources file"):
        build_chain(cfg)


@pytest.mark.integration  # starts the stand-in gateway
def test_built_in_chain_uses_databento_only_when_asked(monkeypatch):
    """Databento live is billed by use: the built-in stocks chain leaves it out unless ``--source databento``."""
    for k in ("POLYGON_API_KEY", "APCA_API_KEY_ID", "APCA_API_SECRET_KEY", "DATABENTO_API_KEY"):
        monkeypatch.setenv(k, "k-not-used-123")
    chain = build_chain(None, ["AAPL"])
    try:
        assert next(g for g in chain.groups if g.asset == "stocks").chain == ["polygon_stocks", "alpaca_stocks"]
    finally:
        chain.close()
    with DatabentoGateway("k-not-used-123", ["AAPL"]) as gw:
        monkeypatch.setenv("MICROSTRUCTURE_DATABENTO_LIVE_GATEWAY", gw.address)
        chain = build_chain(None, ["AAPL"], only="databento")
        try:
            assert [g.chain for g in chain.groups if g.symbols] == [["databento_stocks"]]
        finally:
            chain.close()


@pytest.mark.integration  # the SDK against the stand-in, in process (about 2 s)
def test_undefined_levels_times_and_one_sided_books_are_never_books(monkeypatch):
    syms = ["OK", "ONESIDE", "HOLE", "NOTIME"]
    shapes = {"ONESIDE": "one_sided", "HOLE": "hole", "NOTIME": "no_time"}
    with DatabentoGateway(KEY, syms, period_s=0.05, shapes=shapes) as gw:
        monkeypatch.setenv("DATABENTO_API_KEY", KEY)
        monkeypatch.setenv("MICROSTRUCTURE_DATABENTO_LIVE_GATEWAY", gw.address)
        chain = build_chain(None, syms, only="databento")
        reasons: dict[str, set[str]] = {}
        served: set[str] = set()
        try:
            # Until every symbol has had its first record (before that: connection, unknown_symbol, unavailable).
            want = {"OK": None, "ONESIDE": "invalid_book", "HOLE": "level_gap", "NOTIME": "implausible_time"}
            res, _ = _poll_until(chain, syms, lambda e: e == want, seen=(reasons, served))
            for _ in range(3):  # a few more cycles: the hole's record is quarantined once, never served
                time.sleep(0.1)
                _poll_until(chain, syms, lambda e: True, seen=(reasons, served))
        finally:
            chain.close()
    assert served == {"OK"} and set(res.raw.column("book_levels").to_pylist()) == {10}
    assert reasons == {"ONESIDE": {"one_sided_book"}, "HOLE": {"level_gap"}, "NOTIME": {"implausible_time"}}


def _poll_until(chain, syms: list[str], done, limit_s: float = 30, seen=None):  # type: ignore[no-untyped-def]
    """Poll cycles until ``done(errors by symbol)``; the last result. ``seen`` = (quarantine reasons by symbol,
    symbols served) gathered over every cycle."""
    deadline = time.monotonic() + limit_s
    while True:
        res = chain.poll(syms, dt.datetime.now(dt.UTC))
        errs = dict(zip(res.outcomes.column("symbol").to_pylist(), res.outcomes.column("error_class").to_pylist(),
                        strict=True))
        if seen is not None:
            for sym, why in zip(res.rejected.column("symbol").to_pylist(), res.rejected.column("reason").to_pylist(),
                                strict=True):
                seen[0].setdefault(sym, set()).add(why)
            seen[1].update(res.raw.column("symbol").to_pylist())
        if done(errs):
            return res, errs
        assert time.monotonic() < deadline, errs
        time.sleep(0.05)


@pytest.mark.integration  # the SDK against the stand-in, in process (about 6 s)
def test_a_sequence_that_goes_back_is_a_gap_until_the_next_record(monkeypatch):
    syms = ["AAA", "BBB"]
    with DatabentoGateway(KEY, syms, period_s=0.05) as gw:
        monkeypatch.setenv("DATABENTO_API_KEY", KEY)
        monkeypatch.setenv("MICROSTRUCTURE_DATABENTO_LIVE_GATEWAY", gw.address)
        chain = build_chain(None, syms, only="databento")
        try:
            _poll_until(chain, syms, lambda e: set(e.values()) == {None})
            gw.state.period_s = 2.0  # slow, so the next cycle sees the rewound records before fresh ones
            time.sleep(0.1)
            gw.restart_numbering()
            res, _ = _poll_until(chain, syms, lambda e: set(e.values()) == {"gap"})
            details = " ".join(res.outcomes.column("detail").to_pylist())
            assert "sequence went back" in details
            assert sorted(res.rejected.column("reason").to_pylist()) == ["gap", "gap"]
            gw.state.period_s = 0.05
            _poll_until(chain, syms, lambda e: set(e.values()) == {None})  # the next record serves them again
        finally:
            chain.close()


def _source(monkeypatch, gw: DatabentoGateway, syms: list[str], **kw):  # type: ignore[no-untyped-def]
    from microstructure.sources.databento_live import DatabentoLiveSource

    monkeypatch.setenv("DATABENTO_API_KEY", KEY)
    monkeypatch.setenv("MICROSTRUCTURE_DATABENTO_LIVE_GATEWAY", gw.address)
    return DatabentoLiveSource(symbols=syms, **kw)


def _until(cond, limit_s: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.mark.integration  # the SDK against the stand-in, in process (about 3 s)
def test_a_gateway_that_authenticates_then_sends_nothing_is_dropped_and_retried(monkeypatch):
    """The SDK's heartbeat monitor counts only from the first record: a gateway that authenticates, takes
    ``start_session`` and then sends nothing (not even the Metadata) must not hold the source forever."""
    with DatabentoGateway(KEY, ["AAA"]) as gw:
        gw.state.silent = True
        src = _source(monkeypatch, gw, ["AAA"], silence_s=1.0)
        try:
            assert _until(lambda: gw.state.sessions >= 2), "the silent session was never ended and retried"
            err = src.fetch(["AAA"], dt.datetime.now(dt.UTC)).errors["AAA"]
            assert err.error_class in ("connection", "unknown_symbol")
        finally:
            src.close()


@pytest.mark.integration  # the SDK against the stand-in, in process (about 2 s)
def test_close_during_a_slow_handshake_never_starts_a_stream(monkeypatch):
    """``close()`` while the gateway has accepted but not yet greeted: when the handshake completes later, the
    session must not start streaming behind the closed source (a socket and a thread left running)."""
    with DatabentoGateway(KEY, ["AAA"]) as gw:
        gw.state.greet_delay_s = 1.0
        src = _source(monkeypatch, gw, ["AAA"], first_connect_wait_s=0.1)
        src.close()
        assert _until(lambda: gw.state.sessions >= 1)  # the handshake did complete after close()
        assert _until(lambda: not src._thread.is_alive(), 10.0), "the connection thread outlived close()"
        time.sleep(0.3)
        assert gw.state.subscribed == [] and gw.state.conns == []  # no stream was ever started


@pytest.mark.integration  # the SDK against the stand-in, in process (about 2 s)
def test_an_instrument_id_reused_for_another_symbol_never_files_its_book_under_ours(monkeypatch):
    """The gateway gives AAA's instrument id to a symbol we did not subscribe to (and AAA a new id): the other
    instrument's records under the old id must never be served as AAA's book."""
    with DatabentoGateway(KEY, ["AAA", "BBB"], period_s=0.05) as gw:
        src = _source(monkeypatch, gw, ["AAA", "BBB"])
        try:
            assert _until(lambda: not src.fetch(["AAA", "BBB"], dt.datetime.now(dt.UTC)).errors)
            gw.state.reuse = ("AAA", "ZZZ")
            assert _until(lambda: any(s == "ZZZ" for s, _ in gw.state.sent))
            served = []
            for _ in range(10):
                time.sleep(0.06)
                served += src.fetch(["AAA"], dt.datetime.now(dt.UTC)).quotes
        finally:
            src.close()
    assert served
    for q in served:
        ns = int((q.event_ts - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)).total_seconds() * 1e6) * 1000
        assert ("AAA", ns) in gw.state.sent, "another instrument's book served as AAA's"


@pytest.mark.integration  # the SDK against the stand-in, in process (about 3 s)
def test_a_flood_of_symbol_mappings_is_bounded_and_ends_the_session(monkeypatch):
    """A gateway sending endless symbol mappings (each a new instrument id for a symbol of ours) must not grow our
    id table (nor the SDK's symbology map) without end: past a bound the session is ended as hostile."""
    with DatabentoGateway(KEY, ["AAA", "BBB"], period_s=0.05) as gw:
        gw.state.mapping_flood = 20_000
        src = _source(monkeypatch, gw, ["AAA", "BBB"])
        try:
            sizes: list[int] = []

            def ended() -> bool:
                sizes.append(len(src._by_id))
                err = src.fetch(["AAA"], dt.datetime.now(dt.UTC)).errors.get("AAA")
                return err is not None and "symbol mappings" in err.detail  # between sessions, while backing off

            assert _until(ended), "the flooding session was not ended"
        finally:
            src.close()
    assert max(sizes) <= 2, max(sizes)


@pytest.mark.integration  # the SDK against the stand-in, in process (about 1 s)
def test_a_lowercase_symbol_is_served_though_the_sdk_upper_cases_it(monkeypatch):
    """The SDK sends raw symbols upper-cased, so the gateway maps "AAPL" for our "aapl": the book must still be
    served, under the symbol we asked for."""
    with DatabentoGateway(KEY, ["AAPL"], period_s=0.05) as gw:
        src = _source(monkeypatch, gw, ["aapl"])
        try:
            assert _until(lambda: bool(src.fetch(["aapl"], dt.datetime.now(dt.UTC)).quotes), 10.0), \
                src.fetch(["aapl"], dt.datetime.now(dt.UTC)).errors
            assert src.fetch(["aapl"], dt.datetime.now(dt.UTC)).quotes[0].symbol == "aapl"
        finally:
            src.close()


def test_a_symbol_cannot_inject_a_control_line(monkeypatch):
    """A symbol is sent inside a ``|``-separated control line: a library caller passing "AAPL|start=0" or one with a
    newline must be refused before any connection."""
    from microstructure.sources.databento_live import DatabentoLiveSource

    monkeypatch.setenv("DATABENTO_API_KEY", KEY)
    monkeypatch.setenv("MICROSTRUCTURE_DATABENTO_LIVE_GATEWAY", "127.0.0.1:1")  # nothing listens: never reached
    for bad in ("AAPL|start=0", "AAPL\nstart_session=0", "AAPL,MSFT"):
        with pytest.raises(ConfigError, match="character"):
            DatabentoLiveSource(symbols=[bad], first_connect_wait_s=0.1)
    with pytest.raises(ConfigError, match="one symbol to Databento"):
        DatabentoLiveSource(symbols=["aapl", "AAPL"], first_connect_wait_s=0.1)


@pytest.mark.integration  # the SDK against the stand-in, in process (about 4 s)
def test_a_refusal_after_a_good_session_is_retried_not_fatal(monkeypatch):
    """The gateway accepted our key, hangs up, refuses the reconnect once (sessions at their limit, a restart),
    then accepts again: one refusal mid-run must not end the source for the rest of the poll."""
    with DatabentoGateway(KEY, ["AAA"], period_s=0.05) as gw:  # QQQ: subscribed, never mapped, no book
        src = _source(monkeypatch, gw, ["AAA", "QQQ"])
        try:
            assert _until(lambda: bool(src.fetch(["AAA"], dt.datetime.now(dt.UTC)).quotes))
            gw.state.key = "db-SOMEotherKEYxxxxxxxxxxxx"
            gw.drop()
            refusals: list[SourceError] = []

            def refused() -> bool:
                with contextlib.suppress(SourceError):
                    err = src.fetch(["QQQ"], dt.datetime.now(dt.UTC)).errors["QQQ"]
                    if "Authentication failed" in err.detail:
                        refusals.append(err)
                return bool(refusals)

            assert _until(refused)
            # Meanwhile never "auth": a cycle whose every outcome is "auth" stops the poll.
            assert refusals[0].error_class == "connection", refusals[0]
            gw.state.key = KEY

            def served() -> bool:
                with contextlib.suppress(SourceError):  # before the fix: the refusal is raised every cycle
                    return bool(src.fetch(["AAA"], dt.datetime.now(dt.UTC)).quotes)
                return False

            assert _until(served), "one refusal mid-run ended the source"
            assert src.refused() is None
        finally:
            src.close()


def test_a_dataset_from_a_sources_file_cannot_inject_auth_fields(tmp_path, monkeypatch):
    """The dataset travels in the CRAM auth line (``...|dataset=X|encoding=dbn|...``) and names the gateway host: a
    sources file (which may come from anyone) must not add fields or lines to it."""
    monkeypatch.setenv("DATABENTO_API_KEY", KEY)
    monkeypatch.setenv("MICROSTRUCTURE_DATABENTO_LIVE_GATEWAY", "127.0.0.1:1")  # nothing listens: never reached
    for bad in ("XNAS.ITCH|ts_out=1", "XNAS.ITCH\\nstart_session=0", "XNAS.ITCH.lsg.evil", "XNAS ITCH"):
        cfg = tmp_path / "sources.toml"
        cfg.write_text(f'[sources.db]\nkind = "databento"\ndataset = "{bad}"\n'
                       '[groups.stocks]\nchain = ["db"]\nsymbols = ["AAPL"]\n')
        with pytest.raises(ConfigError, match="dataset must be"):
            build_chain(cfg)


@pytest.mark.integration  # the SDK against the stand-in, in process (about 4 s)
def test_a_gateway_that_hangs_up_after_every_record_is_retried_with_growing_back_off(monkeypatch):
    """Each session streams a moment and is hung up: a source that resets its back-off whenever a session started
    would reconnect every second for ever. The wait must grow (1, 2, 4 s ...) until a session is stable."""
    with DatabentoGateway(KEY, ["AAA"], period_s=0.05) as gw:
        gw.state.hang_up_after_s = 0.1
        src = _source(monkeypatch, gw, ["AAA"])
        waits: set[str] = set()
        try:
            def grown() -> bool:
                detail = src.fetch(["AAA"], dt.datetime.now(dt.UTC)).errors.get("AAA")
                if detail is not None:
                    waits.update(w for w in ("1 s", "2 s", "4 s") if f"next try in {w}" in detail.detail)
                return "4 s" in waits

            assert _until(grown), f"the back-off did not grow: {waits}"
        finally:
            src.close()
    assert gw.state.sessions <= 4


@pytest.mark.integration  # the SDK against the stand-in, in process (about 1 s)
def test_a_book_in_the_middle_of_an_event_is_never_served(monkeypatch):
    """A record without ``F_LAST`` is the book part-way through one venue event (a sweep is several records): not a
    state the venue ever showed. Only the event's last record may be served."""
    with DatabentoGateway(KEY, ["AAA", "MID"], period_s=0.05) as gw:
        gw.state.no_last = {"MID"}
        src = _source(monkeypatch, gw, ["AAA", "MID"])
        served: set[str] = set()
        try:
            def enough() -> bool:
                got = src.fetch(["AAA", "MID"], dt.datetime.now(dt.UTC))
                served.update(q.symbol for q in got.quotes)
                return sum(1 for s, _ in gw.state.sent if s == "MID") >= 5 and "AAA" in served

            assert _until(enough)
            err = src.fetch(["MID"], dt.datetime.now(dt.UTC)).errors.get("MID")
        finally:
            src.close()
    assert served == {"AAA"} and err is not None and err.error_class == "unavailable", (served, err)
