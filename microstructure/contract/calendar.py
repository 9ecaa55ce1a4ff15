"""Trading sessions from a maintained exchange calendar (``exchange_calendars``), not a cycle count.

A US-stock poll runs from the session's open to its close as the calendar gives them: holidays have no
session, half days close early (13:00 New York). Crypto trades around the clock: a poll of crypto symbols
only is bounded by ``--until`` or ``--cycles``, never by an exchange calendar.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

CALENDAR = "XNYS"  # NYSE; Nasdaq keeps the same sessions
EXCHANGE_TZ = ZoneInfo("America/New_York")


@dataclass(frozen=True)
class Session:
    day: dt.date
    open: dt.datetime | None  # UTC; None when the exchange does not trade that day
    close: dt.datetime | None
    reason: str  # why there is no session, or the hours in exchange time

    @property
    def trading(self) -> bool:
        return self.open is not None


def session_for(day: dt.date, calendar: str = CALENDAR) -> Session:
    """The exchange session of ``day`` (exchange date)."""
    import exchange_calendars as xc

    cal = xc.get_calendar(calendar)
    if not cal.is_session(day.isoformat()):
        why = "weekend" if day.weekday() >= 5 else "exchange holiday"
        return Session(day, None, None, f"{day.isoformat()} is not a {calendar} trading day ({why})")
    o = cal.session_open(day.isoformat()).to_pydatetime()
    c = cal.session_close(day.isoformat()).to_pydatetime()
    early = " (half day)" if c.astimezone(EXCHANGE_TZ).time() < dt.time(16, 0) else ""
    return Session(day, o, c, f"{calendar} {day.isoformat()} {o.astimezone(EXCHANGE_TZ):%H:%M}-"
                              f"{c.astimezone(EXCHANGE_TZ):%H:%M} New York{early}")


def today_session(now: dt.datetime | None = None, calendar: str = CALENDAR) -> Session:
    now = now or dt.datetime.now(dt.UTC)
    return session_for(now.astimezone(EXCHANGE_TZ).date(), calendar)


def until_today(hhmm: str, now: dt.datetime | None = None) -> dt.datetime:
    """``HH:MM`` in exchange time today, as UTC. ValueError with a plain message if it is not a time."""
    try:
        t = dt.time.fromisoformat(hhmm)
    except ValueError:
        raise ValueError(f"--until wants HH:MM in New York time, not {hhmm!r}") from None
    now = now or dt.datetime.now(dt.UTC)
    local = dt.datetime.combine(now.astimezone(EXCHANGE_TZ).date(), t, EXCHANGE_TZ)
    return local.astimezone(dt.UTC)


def poll_window(now: dt.datetime | None = None, calendar: str = CALENDAR) -> tuple[dt.datetime, dt.datetime] | str:
    """When a session poll started at ``now`` should run: (start, end) in UTC, start being ``now`` or the
    open if it is still to come; or, when there is nothing to poll today, the reason in plain words."""
    now = now or dt.datetime.now(dt.UTC)
    today = today_session(now, calendar)
    if today.open is None or today.close is None:
        return today.reason
    if today.close <= now:
        return f"today's session is over ({today.reason})"
    return max(now, today.open), today.close


def await_session(now: dt.datetime | None = None, calendar: str = CALENDAR,
                  sleep: Callable[[float], None] = time.sleep,
                  on_wait: Callable[[dt.datetime], None] | None = None) -> dt.datetime | str:
    """Start a session poll: wait for the open if it is still to come, and return the close (UTC); or,
    when there is nothing to poll today, return the reason (no wait). The CLI and the flow both use it."""
    now = now or dt.datetime.now(dt.UTC)
    window = poll_window(now, calendar)
    if isinstance(window, str):
        return window
    start, end = window
    if start > now:
        if on_wait is not None:
            on_wait(start)
        sleep((start - now).total_seconds())
    return end
