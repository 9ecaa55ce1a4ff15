"""LOBSTER message + orderbook files, sampled into snapshots at a chosen cadence.

Orderbook rows hold, per level, ask price, ask size, bid price, bid size (prices in dollars x 10 000);
empty levels carry the dummy prices 9999999999 / -9999999999 with size 0 and become NULL here. Times are
seconds after midnight, exchange time (America/New_York). A snapshot at grid time t is the book after the
last message at or before t: ``event_ts`` is that message's time, ``received_ts`` is t. Trading halts
(event type 7, price -1 = halted, other = resumed) are carried into ``halted``.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow as pa

from microstructure.book import MAX_LEVELS, TS_TYPE, raw_table

SOURCE_NAME = "lobster"
NY = ZoneInfo("America/New_York")
_NAME = re.compile(r"(?P<sym>[^_/]+)_(?P<date>\d{4}-\d{2}-\d{2})_\d+_\d+_(?:message|orderbook)_(?P<lv>\d+)\.csv$")


def find_pair(path: Path) -> tuple[Path, Path, str, dt.date]:
    """Given a message file, an orderbook file or their folder, return (message, orderbook, symbol, date)."""
    files = sorted(path.glob("*_message_*.csv")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no LOBSTER *_message_*.csv file in {path}")
    m = _NAME.search(files[0].name)
    if not m:
        raise ValueError(f"{files[0].name}: not a LOBSTER file name (SYMBOL_DATE_START_END_message_LEVELS.csv)")
    msg = files[0].with_name(files[0].name.replace("_orderbook_", "_message_"))
    book = files[0].with_name(files[0].name.replace("_message_", "_orderbook_"))
    for f in (msg, book):
        if not f.exists():
            raise FileNotFoundError(f"missing LOBSTER file {f}")
    return msg, book, m["sym"], dt.date.fromisoformat(m["date"])


def read_lobster(path: Path, cadence_s: float = 1.0, symbol: str | None = None) -> pa.Table:
    msg_f, book_f, sym, day = find_pair(path)
    msgs = pd.read_csv(msg_f, header=None, usecols=range(6), names=["time", "type", "id", "size", "price", "dir"])
    books = pd.read_csv(book_f, header=None).to_numpy(dtype=float)
    if len(msgs) != len(books):
        raise ValueError(f"{msg_f.name} has {len(msgs)} rows but {book_f.name} has {len(books)}")
    levels = min(books.shape[1] // 4, MAX_LEVELS)
    midnight = dt.datetime.combine(day, dt.time(), NY).astimezone(dt.UTC)
    t = msgs["time"].to_numpy()
    back = np.flatnonzero(np.diff(t) < 0)
    if len(back):
        i = int(back[0]) + 1
        raise ValueError(f"{msg_f.name}: times go backwards at row {i + 1} ({t[i - 1]} then {t[i]}); a LOBSTER "
                         "message file is in time order")
    if len(t) == 0:
        raise ValueError(f"{msg_f.name}: no messages")
    halt_msgs = msgs["type"].to_numpy() == 7
    halted_state = np.zeros(len(msgs), dtype=bool)
    state = False
    for i in range(len(msgs)):
        if halt_msgs[i]:
            state = msgs["price"].iat[i] == -1
        halted_state[i] = state
    grid = np.arange(np.ceil(t[0] / cadence_s) * cadence_s, t[-1] + 1e-9, cadence_s)
    idx = np.searchsorted(t, grid, side="right") - 1
    idx = idx[idx >= 0]
    grid = grid[-len(idx):] if len(idx) else grid[:0]
    b = books[idx]
    to_us = lambda secs: (midnight.timestamp() + secs) * 1e6  # noqa: E731
    cols: dict[str, object] = {
        "symbol": [symbol or sym] * len(idx),
        "event_ts": pa.array(np.floor(to_us(t[idx])).astype(np.int64)).cast(TS_TYPE),
        "received_ts": pa.array(np.floor(to_us(grid)).astype(np.int64)).cast(TS_TYPE),
        "source": [SOURCE_NAME] * len(idx),
        "halted": halted_state[idx],
    }
    for lv in range(MAX_LEVELS):
        for side, off in (("ask", 0), ("bid", 2)):
            if lv < levels:
                px, sz = b[:, 4 * lv + off], b[:, 4 * lv + off + 1]
                empty = (np.abs(px) >= 9_999_999_999) | (sz == 0)
                cols[f"{side}_px_{lv + 1}"] = pa.array(px / 10_000, mask=empty)
                cols[f"{side}_sz_{lv + 1}"] = pa.array(sz, mask=empty)
    return raw_table(cols)
