"""The crypto recorders' files: gzip text, one message a line, ``<local receive time, ns> <websocket JSON>``
(Binance depth streams, Hyperliquid ``l2Book``), and the checks of the fields both readers take from a message.
A malformed line or field stops the read with its file and line (a FileFormatError).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microstructure.contract.book import plausible_ns
from microstructure.recorded.batch import file_time
from microstructure.recorded.bounds import MAX_FIELD_BYTES, FileFormatError, snippet, why
from microstructure.recorded.streams import iter_lines

BATCH = 10_000  # rows (books and rejected) per Batch


@dataclass
class Line:
    """One message of a recording: its receive time (ns), its JSON object, where it is, its file's time."""

    recv: int
    msg: dict[str, Any]
    where: str
    loaded: dt.datetime
    size: int  # bytes of the line (what a reader buffers)


def read_lines(files: list[Path]) -> Iterator[Line]:
    """Each file's ``<receive ns> <json object>`` lines, bounded (``streams.iter_lines``); a malformed one stops
    the read with its file and line."""
    for f in files:
        loaded = file_time(f)
        for n, raw in iter_lines(f):
            line = raw.strip()
            if not line:
                continue
            where = f"{f.name} line {n}"
            stamp, _, body = line.partition(b" ")
            try:
                recv = int(stamp)
            except ValueError:
                raise FileFormatError(f"{where}: not '<receive ns> <json>' (the receive time {snippet(stamp, 30)} "
                                      "is not an integer)") from None
            try:
                msg = json.loads(body)
            except RecursionError:
                raise FileFormatError(f"{where}: the JSON is nested too deeply") from None
            except ValueError as e:
                raise FileFormatError(f"{where}: not '<receive ns> <json>' ({why(e)})") from None
            if not isinstance(msg, dict):
                raise FileFormatError(f"{where}: the message is not a JSON object")
            yield Line(recv, msg, where, loaded, len(line))


def malformed(where: str, what: str) -> FileFormatError:
    return FileFormatError(f"{where}: malformed message ({what})")


def int_field(d: dict[str, Any], key: str, where: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise malformed(where, f"{key!r} is {'missing' if v is None else 'not an integer'}")
    try:
        return int(v)
    except ValueError:
        raise malformed(where, f"{key!r} is not an integer: {snippet(v, 30)}") from None


def symbol_field(v: Any, where: str, key: str) -> str:
    if not isinstance(v, str) or not v:
        raise malformed(where, f"{key!r} is {'missing' if v is None else 'not a symbol'}")
    if len(v.encode()) > MAX_FIELD_BYTES:
        raise malformed(where, f"{key!r} is longer than {MAX_FIELD_BYTES:,} bytes (MAX_FIELD_BYTES)")
    return v


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def ts_from_ns(ns: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=ns // 1000)


def implausible_row(symbol: str, source: str, e_ms: Any, recv: int, where: str, loaded: dt.datetime | None
                    ) -> dict[str, Any]:
    """The quarantine row of a message whose exchange or receive time is not plausible: its times as text, its
    file's time as ``received_ts`` (the same on every run, so a re-run finds the same key)."""
    return {"symbol": symbol, "event_ts": None, "received_ts": loaded or EPOCH, "source": source,
            "reason": "implausible_time", "detail": f"E={snippet(e_ms, 30)} ms, received={recv} ns", "origin": where}


def times_ok(e_ms: int, recv: int) -> bool:
    return plausible_ns(e_ms * 1_000_000) and plausible_ns(recv)
