"""LOBSTER message + orderbook files, sampled into snapshots at a chosen cadence.

Orderbook rows hold, per level, ask price, ask size, bid price, bid size (prices in dollars x 10 000);
empty levels carry the dummy prices 9999999999 / -9999999999 with size 0 and become NULL here. Times are
seconds after midnight, exchange time (America/New_York). A snapshot at grid time t is the book after the
last message at or before t: ``event_ts`` is that message's time, ``received_ts`` is t. Trading halts
(event type 7, price -1 = halted, other = resumed) are carried into ``halted``.

The two files are streamed side by side in chunks (a day of any size loads in bounded memory). Times are
integer nanoseconds, so grid times are exact. A message whose time is not a number (``unparseable_time``) or
not plausible (``implausible_time``, ``book.EARLIEST`` .. a day ahead) is quarantined with its row and never
moves the grid; the bounds of ``recorded.bounds`` (cadence, grid points, messages per instant, line length,
decompressed size) apply. A malformed row stops the read with its file and row number.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from microstructure.contract.book import EARLIEST, MAX_LEVELS, TS_TYPE, latest_plausible, plausible_us, raw_table
from microstructure.recorded.batch import Batch, file_time, rejected_table
from microstructure.recorded.bounds import (
    BATCH_ROWS,
    MAX_LINE_BYTES,
    FileFormatError,
    GridBudget,
    InstantCounter,
    check_cadence,
    snippet,
)
from microstructure.recorded.streams import BoundedStream, line_chunks

SOURCE_NAME = "lobster"
NY = ZoneInfo("America/New_York")
_NAME = re.compile(r"(?P<sym>[^_/]+)_(?P<date>\d{4}-\d{2}-\d{2})_\d+_\d+_(?:message|orderbook)_(?P<lv>\d+)\.csv$")
CHUNK_ROWS = 50_000  # rows of both files parsed at a time
CHUNK_BYTES = 32 * 2**20  # ... or fewer, when the lines are long


def find_pair(path: Path) -> tuple[Path, Path, str, dt.date]:
    """Given a message file, an orderbook file or their folder, return (message, orderbook, symbol, date)."""
    files = sorted(path.glob("*_message_*.csv")) if path.is_dir() else [path]
    if not files:
        raise FileFormatError(f"no LOBSTER *_message_*.csv file in {path}")
    m = _NAME.search(files[0].name)
    if not m:
        raise FileFormatError(f"{files[0].name}: not a LOBSTER file name "
                              "(SYMBOL_DATE_START_END_message_LEVELS.csv)")
    msg = files[0].with_name(files[0].name.replace("_orderbook_", "_message_"))
    book = files[0].with_name(files[0].name.replace("_message_", "_orderbook_"))
    for f in (msg, book):
        if not f.exists():
            raise FileFormatError(f"missing LOBSTER file {f.name}")
    try:
        day = dt.date.fromisoformat(m["date"])
    except ValueError:
        raise FileFormatError(f"{files[0].name}: {m['date']} is not a date") from None
    return msg, book, m["sym"], day


class _Lines:
    """The lines of one file, taken in chunks (bounded by rows and bytes), numbered."""

    def __init__(self, stream: BoundedStream, name: str) -> None:
        self.name = name
        self._chunks = line_chunks(stream, name)
        self._q: deque[bytes] = deque()
        self.next_no = 1  # number of the next line taken
        self._done = False

    def _fill(self) -> bool:
        if self._done:
            return False
        got = next(self._chunks, None)
        if got is None:
            self._done = True
            return False
        self._q.extend(got[1])
        return True

    def take(self, k: int, budget: int = CHUNK_BYTES) -> list[bytes]:
        out: list[bytes] = []
        size = 0
        while len(out) < k and size < budget:
            if not self._q and not self._fill():
                break
            line = self._q.popleft()
            out.append(line)
            size += len(line)
        self.next_no += len(out)
        return out

    def give_back(self, lines: list[bytes]) -> None:
        self._q.extendleft(reversed(lines))
        self.next_no -= len(lines)


def _parse(lines: list[bytes], first_no: int, name: str, width: int) -> np.ndarray:
    """Numeric CSV lines (no header) as a float array (rows, width); a bad line is named."""
    data = b"\n".join(lines)
    names = [f"f{i}" for i in range(width)]
    try:
        t = pacsv.read_csv(io.BytesIO(data),
                           read_options=pacsv.ReadOptions(column_names=names, block_size=MAX_LINE_BYTES + 1),
                           parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
                           convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.float64())))
        if t.num_rows == len(lines):
            return np.column_stack([t.column(n).to_numpy(zero_copy_only=False) for n in names]) if lines else \
                np.empty((0, width))
    except pa.ArrowException:
        pass
    for i, line in enumerate(lines):
        fields = line.rstrip(b"\r").split(b",")
        if len(fields) != width:
            raise FileFormatError(f"{name} row {first_no + i}: {len(fields)} fields where the file's rows have "
                                  f"{width}") from None
        for j, f in enumerate(fields):
            try:
                float(f)
            except ValueError:
                raise FileFormatError(f"{name} row {first_no + i}: field {j + 1} is not a number: {snippet(f)}"
                                      ) from None
    raise FileFormatError(f"{name} rows {first_no}..{first_no + len(lines) - 1}: cannot read them as numbers")


def _row_names(name: str, rows: np.ndarray) -> Callable[[int], str]:
    """``where(i)`` for a check: the i-th message's file and row."""
    return lambda i: f"{name} row {int(rows[i])}"


def _width(line: bytes) -> int:
    return len(line.rstrip(b"\r").split(b","))


def iter_lobster(path: Path, cadence_s: float = 1.0, symbol: str | None = None) -> Iterator[Batch]:
    """The files' sampled snapshots and quarantined messages, in ``Batch``es of about BATCH_ROWS rows."""
    check_cadence(cadence_s)
    msg_f, book_f, sym, day = find_pair(path)
    sym = symbol or sym
    if not (EARLIEST.date() <= day <= latest_plausible().date()):
        raise FileFormatError(f"{msg_f.name}: the date in its name, {day}, is not plausible "
                              f"({EARLIEST.date()} .. tomorrow)")
    midnight = dt.datetime.combine(day, dt.time(), NY).astimezone(dt.UTC)
    midnight_us = (midnight - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
    step = round(cadence_s * 1e9)  # ns; cadence >= 1 ms, so exact enough
    loaded = file_time(msg_f)
    budget = GridBudget(cadence_s)
    instant = InstantCounter()
    midnight_s = midnight.timestamp()
    # The last plausible message seen (its time in ns and in seconds after midnight, book row, halted state, row
    # number): the book that holds until the next message.
    carry: tuple[int, float, np.ndarray, bool, int] | None = None
    next_k: int | None = None  # index of the next grid time (k x step ns after midnight)
    widths: tuple[int, int] | None = None
    out: list[pa.Table] = []
    origins: list[pa.Array] = []
    rejected: list[dict[str, object]] = []
    pending_rows = 0

    def flush() -> Batch:
        nonlocal pending_rows
        raw = pa.concat_tables(out) if out else raw_table({"symbol": pa.array([], pa.string())})
        org = pa.concat_arrays(origins) if origins else pa.array([], pa.string())
        b = Batch(raw, rejected_table(rejected), org, loaded)
        out.clear()
        origins.clear()
        rejected.clear()
        pending_rows = 0
        return b

    def emit(times: np.ndarray, secs: np.ndarray, books: np.ndarray, halted: np.ndarray, rows: np.ndarray,
             upto: int, inclusive: bool) -> Iterator[Batch]:
        """Grid times from next_k up to ``upto`` ns (strictly before it, or at it when ``inclusive``)."""
        nonlocal next_k, pending_rows
        assert next_k is not None
        last_k = upto // step if inclusive else -(-upto // step) - 1
        n = last_k - next_k + 1
        if n <= 0:
            return
        budget.take(n, f"{msg_f.name} row {int(rows[-1])}")  # before a single grid time is allocated
        levels = min(books.shape[1] // 4, MAX_LEVELS)
        for k0 in range(next_k, last_k + 1, BATCH_ROWS):
            g = np.arange(k0, min(k0 + BATCH_ROWS, last_k + 1), dtype=np.int64) * step
            idx = np.searchsorted(times, g, side="right") - 1
            b = books[idx]
            cols: dict[str, object] = {
                "symbol": [sym] * len(idx),
                # As the reader always computed it (float seconds since the epoch, floored to µs), so the
                # snapshot keys of a lake backfilled before stay the same (a re-run adds nothing).
                "event_ts": pa.array(np.floor((midnight_s + secs[idx]) * 1e6).astype(np.int64)).cast(TS_TYPE),
                "received_ts": pa.array(midnight_us + g // 1000).cast(TS_TYPE),
                "source": [SOURCE_NAME] * len(idx),
                "halted": halted[idx],
            }
            for lv in range(levels):
                for side, off in (("ask", 0), ("bid", 2)):
                    px, sz = b[:, 4 * lv + off], b[:, 4 * lv + off + 1]
                    empty = (np.abs(px) >= 9_999_999_999) | (sz == 0)
                    cols[f"{side}_px_{lv + 1}"] = pa.array(px / 10_000, mask=empty)
                    cols[f"{side}_sz_{lv + 1}"] = pa.array(sz, mask=empty)
            out.append(raw_table(cols))
            origins.append(pa.array([f"{msg_f.name} row {r}" for r in rows[idx]], pa.string()))
            pending_rows += len(idx)
            if pending_rows >= BATCH_ROWS:
                yield flush()
        next_k = last_k + 1

    with BoundedStream(msg_f) as mfh, BoundedStream(book_f) as bfh:
        msgs, books_in = _Lines(mfh, msg_f.name), _Lines(bfh, book_f.name)
        while True:
            first_no = msgs.next_no
            ml = msgs.take(CHUNK_ROWS)
            if not ml:
                if books_in.take(1):
                    raise FileFormatError(f"{book_f.name} has more rows than {msg_f.name} ({first_no - 1:,}): "
                                          "they must be one row per message")
                if first_no == 1:
                    raise FileFormatError(f"{msg_f.name}: no messages")
                break
            bl = books_in.take(len(ml))
            if not bl:  # the orderbook file ended first
                raise FileFormatError(f"{msg_f.name} has more rows than {book_f.name} ({books_in.next_no - 1:,}): "
                                      "they must be one row per message")
            if len(bl) < len(ml):  # long orderbook lines: fewer rows this time
                msgs.give_back(ml[len(bl):])
                ml = ml[:len(bl)]
            if widths is None:
                widths = (_width(ml[0]), _width(bl[0]))
                if widths[0] < 6:
                    raise FileFormatError(f"{msg_f.name} row 1: {widths[0]} fields; a message row has 6 (time, "
                                          "type, order id, size, price, direction)")
                if widths[1] < 4 or widths[1] % 4:
                    raise FileFormatError(f"{book_f.name} row 1: {widths[1]} fields; an orderbook row has 4 per "
                                          "level")
            m = _parse(ml, first_no, msg_f.name, widths[0])
            b = _parse(bl, first_no, book_f.name, widths[1])
            rows = np.arange(first_no, first_no + len(ml), dtype=np.int64)
            t = m[:, 0]
            finite = np.isfinite(t)
            with np.errstate(invalid="ignore", over="ignore"):
                ok = finite & plausible_us(midnight_us + t * 1e6)
            for i in np.flatnonzero(~ok):
                rejected.append({"symbol": sym, "received_ts": loaded, "source": SOURCE_NAME,
                                 "reason": "implausible_time" if finite[i] else "unparseable_time",
                                 "detail": f"time={snippet(ml[i].split(b',')[0], 40)} s after midnight {day}",
                                 "origin": f"{msg_f.name} row {int(rows[i])}"})
            t_ns = np.round(t[ok] * 1e9).astype(np.int64)
            m, b, rows, secs = m[ok], b[ok], rows[ok], t[ok]
            if len(t_ns) == 0:
                continue
            prev = np.concatenate([[carry[0]], t_ns]) if carry else t_ns
            back = np.flatnonzero(np.diff(prev) < 0)
            if len(back):
                at = int(back[0]) + (0 if carry else 1)
                before = carry[0] if carry and at == 0 else t_ns[at - 1]
                raise FileFormatError(f"{msg_f.name} row {int(rows[at])}: times go backwards ({before / 1e9} then "
                                      f"{t_ns[at] / 1e9} s after midnight); a LOBSTER message file is in time order")
            instant.add_many(t_ns, _row_names(msg_f.name, rows))
            halt = m[:, 1] == 7
            last_halt = np.maximum.accumulate(np.where(halt, np.arange(len(t_ns)), -1))
            was = carry[3] if carry else False
            halted = np.where(last_halt >= 0, m[np.maximum(last_halt, 0), 4] == -1, was)
            if carry:
                times = np.concatenate([[carry[0]], t_ns])
                secs = np.concatenate([[carry[1]], secs])
                books = np.vstack([carry[2][None, :], b])
                halted = np.concatenate([[carry[3]], halted])
                rows = np.concatenate([[carry[4]], rows])
            else:
                times, books = t_ns, b
                next_k = -(-int(t_ns[0]) // step)  # the first grid time at or after the first message
            yield from emit(times, secs, books, halted, rows, int(times[-1]), inclusive=False)
            carry = (int(times[-1]), float(secs[-1]), books[-1].copy(), bool(halted[-1]), int(rows[-1]))
    if carry is not None:
        yield from emit(np.array([carry[0]]), np.array([carry[1]]), carry[2][None, :], np.array([carry[3]]),
                        np.array([carry[4]]), carry[0], inclusive=True)
    if out or rejected:
        yield flush()


def read_lobster(path: Path, cadence_s: float = 1.0, symbol: str | None = None) -> pa.Table:
    """All sampled snapshots as one raw table (small files and tests; backfill streams ``iter_lobster``)."""
    tables = [b.raw for b in iter_lobster(path, cadence_s, symbol)]
    return pa.concat_tables(tables) if tables else raw_table({"symbol": pa.array([], pa.string())})
