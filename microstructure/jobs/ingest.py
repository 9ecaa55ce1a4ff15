"""The one way a source's answer enters the lake: validate, quarantine the bad rows, write the good ones.

Live polling, the service's one-shot refresh and file backfill all go through :class:`Ingestor`, so a row
is judged by the same rules whichever door it came in by.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from microstructure.contract.book import KEY, QUARANTINE_SCHEMA, SNAPSHOT_SCHEMA, to_utc_us, validate
from microstructure.contract.inputs import InputError
from microstructure.contract.outcomes import OUTCOMES_KEY, OUTCOMES_SCHEMA
from microstructure.lake.paths import OUTCOMES, QUARANTINE, SNAPSHOTS, LakePaths
from microstructure.lake.writer import PartitionWriter

# ``origin`` (a recorded row's file and position; NULL for live rows) keeps rejected rows that share a time, or
# have none, apart: every rejected row is stored, and a re-run of the same file finds the same keys.
QUARANTINE_KEY = ("symbol", "received_ts", "source", "reason", "origin")


@dataclass
class Ingested:
    written: pa.Table  # rows new to the lake (acknowledged: renamed into place)
    clean: pa.Table  # rows that passed validation (written + duplicates already in the lake)
    quarantined: pa.Table  # rows rejected, with their reasons

    @property
    def duplicates(self) -> int:
        return self.clean.num_rows - self.written.num_rows

    def reasons(self) -> Counter[str]:
        return Counter(self.quarantined.column("reason").to_pylist())


class Ingestor:
    """Holds the lake writers (and their per-partition dedup sets) across calls."""

    def __init__(self, paths: LakePaths) -> None:
        self.snapshots = PartitionWriter(paths, SNAPSHOTS, KEY, SNAPSHOT_SCHEMA)
        self.quarantine = PartitionWriter(paths, QUARANTINE, QUARANTINE_KEY, QUARANTINE_SCHEMA)
        self.outcomes = PartitionWriter(paths, OUTCOMES, OUTCOMES_KEY, OUTCOMES_SCHEMA)

    def ingest(self, raw: pa.Table, rejected: pa.Table | None = None, origin: pa.Array | None = None,
               fallback_ts: dt.datetime | None = None) -> Ingested:
        """Validate ``raw``; write rejects (plus ``rejected``, rows a source could not even shape) to
        quarantine first, then the clean rows to snapshots. ``origin`` and ``fallback_ts``: see ``validate``."""
        checked = validate(raw, origin, fallback_ts)
        bad = checked.quarantine if rejected is None else pa.concat_tables([checked.quarantine, rejected])
        self.quarantine.write(bad)
        written = self.snapshots.write(checked.clean)
        return Ingested(written, checked.clean, bad)

    def record(self, outcomes: pa.Table) -> None:
        """Append a cycle's per-symbol outcomes (who served each symbol, or why nobody did)."""
        self.outcomes.write(outcomes.cast(OUTCOMES_SCHEMA))


def outcomes_from(symbols: Sequence[str], at: dt.datetime, source: str, got: Ingested) -> pa.Table:
    """Outcomes for a source that does not report its own (the simulated one): a symbol is served when a
    clean row came back for it, else its first quarantine reason is the error."""
    at = to_utc_us(at)
    levels = dict(zip(got.clean.column("symbol").to_pylist(), got.clean.column("book_levels").to_pylist(),
                      strict=True))
    why: dict[str, str] = {}
    for sym, r in zip(got.quarantined.column("symbol").to_pylist(), got.quarantined.column("reason").to_pylist(),
                      strict=True):
        why.setdefault(sym, r)
    rows = []
    for s in symbols:
        ok = s in levels
        rows.append({"cycle_ts": at, "symbol": s, "source": source if ok else None,
                     "book_levels": int(levels[s]) if ok else 0, "latency_ms": None,
                     "error_class": None if ok else ("invalid_book" if s in why else "no_answer"),
                     "detail": f"{source}: ok" if ok else f"{source}: {why.get(s, 'no answer')}"})
    return pa.Table.from_pylist(rows, schema=OUTCOMES_SCHEMA)


@dataclass
class BackfillStats:
    sampled: int = 0
    written: int = 0
    duplicates: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    symbols: set[str] = field(default_factory=set)
    dates: set[str] = field(default_factory=set)


class BackfillError(InputError):
    """A recorded file failed part-way: the message says where, and what the lake kept from before it."""


def backfill(paths: LakePaths, batches: Iterable[Any], on_batch: Callable[[BackfillStats], None] | None = None
             ) -> BackfillStats:
    """Load a recorded file's batches (``recorded.batch.Batch``: shaped rows + rows already rejected) through
    the one ingest path. Batch by batch, so memory is bounded by a batch, not the file; idempotent (keys the
    lake holds are skipped, checked on disk for rows older than the writer's memory).

    Each batch is committed as it comes (a file of any size fits in memory). When the reader stops part-way
    (a malformed message, a bound passed) the error says where it stopped and how many rows the lake kept from
    before it: a re-run after the fix skips those (they are keyed) and loads the rest."""
    ingestor = Ingestor(paths)
    st = BackfillStats()
    try:
        for b in batches:
            got = ingestor.ingest(b.raw, b.rejected, getattr(b, "origin", None), getattr(b, "loaded_ts", None))
            st.sampled += b.raw.num_rows + b.rejected.num_rows
            st.written += got.written.num_rows
            st.duplicates += got.duplicates
            st.quarantined.update(got.reasons())
            st.symbols.update(pc.unique(got.written.column("symbol")).to_pylist())
            st.dates.update(pc.unique(pc.strftime(got.written.column("event_ts"), "%Y-%m-%d")).to_pylist())
            if on_batch is not None:
                on_batch(st)
    except InputError as e:
        if st.sampled == 0:
            raise BackfillError(f"{e} (nothing was loaded)") from None
        q = sum(st.quarantined.values())
        raise BackfillError(
            f"{e}; stopped there: the lake kept the {st.sampled:,} rows before it ({st.written:,} new snapshots, "
            f"{st.duplicates:,} already in the lake, {q:,} quarantined); once it is fixed, a re-run skips them"
        ) from None
    return st
