"""What a vendor source gives the fallback chain: shaped rows for the symbols it answered, an error for the rest."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from microstructure.book import BookQuote, table_from_quotes
from microstructure.sources.guard import SourceError


class ConfigError(Exception):
    """A source cannot be built as configured (missing key, bad option): a one-line message for the user."""


@dataclass
class Fetched:
    quotes: list[BookQuote] = field(default_factory=list)
    errors: dict[str, SourceError] = field(default_factory=dict)  # symbol -> why it got no book
    malformed: list[tuple[str, str]] = field(default_factory=list)  # (symbol, body) kept for quarantine
    calls_ok: int = 1  # vendor calls behind this answer that got an answer (per-symbol sources count each)

    def merge(self, other: Fetched) -> None:
        self.quotes += other.quotes
        self.errors.update(other.errors)
        self.malformed += other.malformed
        self.calls_ok += other.calls_ok

    def table(self) -> pa.Table:
        return table_from_quotes(self.quotes)


class VendorSource(Protocol):
    name: str
    asset: str  # "stocks" or "crypto"
    max_levels: int  # the depth this source can give at most (1 = L1/NBBO only)

    def fetch(self, symbols: Sequence[str], at: dt.datetime, deadline: float | None) -> Fetched:
        """Raise SourceError if the whole call failed; otherwise per-symbol errors go in ``Fetched.errors``."""
        ...


def env_key(name: str, required: bool, why: str) -> str | None:
    """A secret from the environment only; never logged, never written."""
    v = os.environ.get(name) or None
    if v is None and required:
        raise ConfigError(f"{name} is not set: {why}")
    return v


def parse_json(body: bytes | str, source: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError("malformed", f"{source}: response is not JSON ({e.__class__.__name__})") from e


def http_error_class(status: int) -> str:
    if status in (401, 403):
        return "auth"
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "server_error"
    return "client_error"


def ns_to_dt(ns: int | None, fallback: dt.datetime) -> dt.datetime:
    if not ns:
        return fallback
    # Polygon stamps in ns (sometimes ms); take whatever magnitude it is.
    if ns > 10**17:
        return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC)
    if ns > 10**14:
        return dt.datetime.fromtimestamp(ns / 1e6, dt.UTC)
    return dt.datetime.fromtimestamp(ns / 1e3, dt.UTC)
