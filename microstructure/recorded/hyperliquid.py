"""Recorded Hyperliquid ``l2Book`` streams (full 20-level snapshots, in the recorder's line format of
``recorded.json_lines``), sampled into our snapshots.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from microstructure.contract.book import MAX_LEVELS, BookQuote
from microstructure.recorded.batch import Batch, take_batch
from microstructure.recorded.bounds import check_cadence, snippet
from microstructure.recorded.json_lines import (
    BATCH,
    EPOCH,
    implausible_row,
    int_field,
    malformed,
    read_lines,
    symbol_field,
    times_ok,
    ts_from_ns,
)


def _l2_levels(v: Any, where: str, levels: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(s, list) for s in v)):
        raise malformed(where, "'levels' is not [bids, asks]")
    out = []
    for side in v:
        rows = []
        for x in side[:levels]:
            if not isinstance(x, dict):
                raise malformed(where, f"a level is {snippet(x, 30)}, not {{px, sz}}")
            try:
                p, q = float(x["px"]), float(x["sz"])
            except (KeyError, TypeError, ValueError):
                raise malformed(where, f"a level is {snippet(x, 40)}, not {{px, sz}} numbers") from None
            if not (math.isfinite(p) and math.isfinite(q)):
                raise malformed(where, f"a level holds a non-finite number: {snippet(x, 40)}")
            rows.append((p, q))
        out.append(rows)
    return out[0], out[1]


def read_hyperliquid_l2(files: list[Path], cadence: float = 1.0, symbol: str | None = None,
                        levels: int = MAX_LEVELS) -> Iterator[Batch]:
    """Hyperliquid ``l2Book`` recordings (full 20-level snapshots, same line format): the last snapshot of each
    ``cadence`` slot, top 10 levels; ``event_ts`` = Hyperliquid's ``time``, ``received_ts`` = the recorder's.
    Symbols are ``<coin>-PERP`` (Hyperliquid's books are perpetuals), source ``hyperliquid``. A snapshot whose
    times are not plausible is quarantined (``implausible_time``); a malformed one stops the read."""
    check_cadence(cadence)
    slot_ms = cadence * 1000
    quotes: list[BookQuote] = []
    origins: list[str] = []
    rejected: list[dict[str, Any]] = []
    last: tuple[int, BookQuote, str] | None = None
    loaded: dt.datetime | None = None

    def flush() -> Batch:
        return take_batch(quotes, origins, rejected, loaded)

    for line in read_lines(sorted(files)):
        msg = line.msg
        if msg.get("channel") != "l2Book":
            continue
        d = msg.get("data")
        if not isinstance(d, dict):
            raise malformed(line.where, "an l2Book message without a 'data' object")
        loaded = line.loaded
        bids, asks = _l2_levels(d.get("levels"), line.where, levels)
        e_ms = int_field(d, "time", line.where)
        sym = symbol or f"{symbol_field(d.get('coin'), line.where, 'coin')}-PERP"
        if not times_ok(e_ms, line.recv):
            rejected.append(implausible_row(sym, "hyperliquid", d.get("time"), line.recv, line.where, line.loaded))
        else:
            q = BookQuote(sym, EPOCH + dt.timedelta(milliseconds=e_ms), ts_from_ns(line.recv), "hyperliquid",
                          bids, asks)
            slot = int(e_ms // slot_ms)
            if last is not None and slot != last[0]:
                quotes.append(last[1])
                origins.append(last[2])
            last = (slot, q, line.where)
        if len(quotes) + len(rejected) >= BATCH:
            yield flush()
    if last is not None:
        quotes.append(last[1])
        origins.append(last[2])
    if quotes or rejected:
        yield flush()
