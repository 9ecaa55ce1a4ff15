"""Sessions from the exchange calendar: holidays, half days, the poll window, and a session poll on a day
without a session."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest


def cli(*args: object, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_calendar_knows_holidays_and_half_days():
    from microstructure.contract.calendar import session_for

    thanksgiving = session_for(dt.date(2026, 11, 26))
    assert not thanksgiving.trading and "holiday" in thanksgiving.reason
    half = session_for(dt.date(2026, 11, 27))
    assert half.close == dt.datetime(2026, 11, 27, 18, 0, tzinfo=dt.UTC) and "half day" in half.reason
    normal = session_for(dt.date(2026, 11, 25))
    assert (normal.open, normal.close) == (dt.datetime(2026, 11, 25, 14, 30, tzinfo=dt.UTC),
                                           dt.datetime(2026, 11, 25, 21, 0, tzinfo=dt.UTC))
    assert not session_for(dt.date(2026, 11, 28)).trading  # a Saturday


def test_session_window_from_the_calendar():
    from microstructure.contract.calendar import poll_window

    utc = dt.UTC
    assert "holiday" in poll_window(dt.datetime(2026, 11, 26, 15, 0, tzinfo=utc))
    assert "over" in poll_window(dt.datetime(2026, 11, 27, 18, 30, tzinfo=utc))  # half day: closed at 13:00 NY
    assert poll_window(dt.datetime(2026, 11, 27, 12, 0, tzinfo=utc)) == (
        dt.datetime(2026, 11, 27, 14, 30, tzinfo=utc), dt.datetime(2026, 11, 27, 18, 0, tzinfo=utc))  # waits
    late = dt.datetime(2026, 11, 25, 16, 0, tzinfo=utc)  # a late start still stops at the close
    assert poll_window(late) == (late, dt.datetime(2026, 11, 25, 21, 0, tzinfo=utc))


@pytest.mark.integration
def test_session_poll_on_a_day_without_one_exits_at_once(tmp_path):
    from microstructure.contract.calendar import poll_window

    window = poll_window()
    if not isinstance(window, str):
        pytest.skip("the exchange trades later today: a session poll would run until the close")
    r = cli("poll", "--data-dir", tmp_path / "d", "--session", "--interval", "1", "--symbols", "3", "--no-online",
            "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"polled": False, "reason": window}
    r = cli("poll", "--data-dir", tmp_path / "d", "--until", "25:00", "--interval", "1")
    assert r.returncode == 2 and "HH:MM" in r.stderr
