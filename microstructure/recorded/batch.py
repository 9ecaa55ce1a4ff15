"""What every recorded reader yields: ``Batch``es of shaped rows and the rows it rejected itself, each row with its
``origin`` (``<file> line 12``, ``<file> row 12``, ``<file> packet 3 message 9``).

A row rejected for its time carries its file's modification time as ``received_ts``: the same file gives the
same quarantine keys on every run, so a re-run adds nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from microstructure.contract.book import EARLIEST, QUARANTINE_SCHEMA, BookQuote, plausible_us, table_from_quotes


@dataclass
class Batch:
    """One step of a recorded file: what a reader hands the lake (``jobs.ingest.backfill``)."""

    raw: pa.Table  # shaped rows (validation judges the book and the times)
    rejected: pa.Table  # QUARANTINE_SCHEMA rows the reader rejected itself (unreadable or implausible time, gaps)
    origin: pa.Array | None = None  # per raw row: where it came from (kept on the row if validation rejects it)
    loaded_ts: dt.datetime | None = None  # received_ts of raw rows validation rejects for their time


def rejected_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA) if rows else QUARANTINE_SCHEMA.empty_table()


def take_batch(quotes: list[BookQuote], origins: list[str], rejected: list[dict[str, Any]],
               loaded: dt.datetime | None) -> Batch:
    """The streaming readers' pending books, their origins and rejected rows as one Batch; the lists are emptied
    for the next one."""
    b = Batch(table_from_quotes(quotes), rejected_table(rejected), pa.array(origins, pa.string()), loaded)
    quotes.clear()
    origins.clear()
    rejected.clear()
    return b


def positions(name: str, unit: str, nos: np.ndarray) -> pa.Array:
    """``<name> <unit> <n>`` per number, built in Arrow (a million origins cost milliseconds, not seconds)."""
    return pc.binary_join_element_wise(f"{name} {unit} ", pc.cast(pa.array(nos, pa.int64()), pa.string()), "")


def origin_at(origins: pa.Array) -> Callable[[int], str]:
    """``where(i)`` for a check that names a row: the i-th row's origin."""
    return lambda i: str(origins[i].as_py())


def file_time(path: Path) -> dt.datetime:
    """The file's modification time (UTC, µs): the ``received_ts`` of its rows quarantined for their time. A
    file says when it was last written, the latest its rows were in hand; and it is the same on every run, so
    the quarantine's keys are. An implausible mtime (a tarball's 1970) becomes ``book.EARLIEST``."""
    try:
        us = int(path.stat().st_mtime_ns // 1000)
    except OSError:
        us = 0
    if not plausible_us(np.array([us]))[0]:
        return EARLIEST
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)
