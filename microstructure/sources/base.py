"""What every order-book source returns, so the poller can treat them alike."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa

from microstructure.contract.book import QUARANTINE_SCHEMA, RAW_SCHEMA


@dataclass
class PollResult:
    """One source's answer for one cycle.

    ``raw`` holds shaped but unvalidated snapshots; ``rejected`` holds answers that could not even be
    shaped (unknown symbol, malformed payload) as quarantine rows, so nothing is dropped silently.
    ``outcomes`` (OUTCOMES_SCHEMA) says per symbol who answered; sources that do not say are given one
    by the poller from what validation kept.
    """

    raw: pa.Table = field(default_factory=RAW_SCHEMA.empty_table)
    rejected: pa.Table = field(default_factory=QUARANTINE_SCHEMA.empty_table)
    outcomes: pa.Table | None = None


class Source(Protocol):
    name: str

    def poll(self, symbols: Sequence[str], at: dt.datetime) -> PollResult:
        """Fetch the current book for ``symbols``; ``at`` is our receive time for this cycle."""
        ...
