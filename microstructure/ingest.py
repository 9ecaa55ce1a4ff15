"""The one way a source's answer enters the lake: validate, quarantine the bad rows, write the good ones.

Live polling, the service's one-shot refresh and file backfill all go through :class:`Ingestor`, so a row
is judged by the same rules whichever door it came in by.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from microstructure import lake
from microstructure.book import KEY, QUARANTINE_SCHEMA, SNAPSHOT_SCHEMA, validate

QUARANTINE_KEY = ("symbol", "received_ts", "source", "reason")


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

    def __init__(self, paths: lake.LakePaths) -> None:
        self.snapshots = lake.PartitionWriter(paths, lake.SNAPSHOTS, KEY, SNAPSHOT_SCHEMA)
        self.quarantine = lake.PartitionWriter(paths, lake.QUARANTINE, QUARANTINE_KEY, QUARANTINE_SCHEMA)

    def ingest(self, raw: pa.Table, rejected: pa.Table | None = None) -> Ingested:
        """Validate ``raw``; write rejects (plus ``rejected``, rows a source could not even shape) to
        quarantine first, then the clean rows to snapshots."""
        checked = validate(raw)
        bad = checked.quarantine if rejected is None else pa.concat_tables([checked.quarantine, rejected])
        self.quarantine.write(bad)
        written = self.snapshots.write(checked.clean)
        return Ingested(written, checked.clean, bad)
