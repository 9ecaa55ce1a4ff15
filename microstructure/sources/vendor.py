"""What a vendor source gives the fallback chain: shaped rows for the symbols it answered, an error for the rest."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from microstructure.sources.guard import SourceError

if TYPE_CHECKING:
    import pyarrow as pa

    from microstructure.contract.book import BookQuote


class ConfigError(Exception):
    """A source cannot be built as configured (missing key, bad option): a one-line message for the user."""


@dataclass
class Fetched:
    quotes: list[BookQuote] = field(default_factory=list)
    errors: dict[str, SourceError] = field(default_factory=dict)  # symbol -> why it got no book
    malformed: list[tuple[str, str]] = field(default_factory=list)  # (symbol, body) kept for quarantine
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (symbol, reason, detail) for quarantine
    calls_ok: int = 1  # vendor calls behind this answer that got an answer (per-symbol sources count each)

    def merge(self, other: Fetched) -> None:
        self.quotes += other.quotes
        self.errors.update(other.errors)
        self.malformed += other.malformed
        self.rejected += other.rejected
        self.calls_ok += other.calls_ok

    def table(self) -> pa.Table:
        from microstructure.contract.book import table_from_quotes

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


# ---- where a key may go ------------------------------------------------------------------------------
POLYGON_BASE_ENV = "MICROSTRUCTURE_POLYGON_BASE_URL"
ALPACA_BASE_ENV = "MICROSTRUCTURE_ALPACA_DATA_URL"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or the name ``localhost``: a host where a request never leaves the machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def base_url_from_env(var: str) -> str | None:
    """A vendor's base URL override from the environment variable ``var``; None keeps the SDK's https default.

    Only the environment moves where a key is sent (a stand-in for tests and benchmarks), never a file: a
    data dir's ``sources.toml`` may come from anyone. ``https://`` may point anywhere (TLS authenticates the
    host); plain ``http://`` only to a loopback host, where the key never crosses a network.
    """
    from urllib.parse import urlsplit

    raw = os.environ.get(var, "").strip()
    if not raw:
        return None
    try:
        u = urlsplit(raw)
        host = u.hostname
        _ = u.port  # raises on a port that is not a number
    except ValueError:
        raise ConfigError(f"{var} is not a URL") from None
    if u.scheme not in ("https", "http") or not host:
        raise ConfigError(f"{var} must be an https:// URL (or http:// to a loopback host)")
    if u.username is not None or u.password is not None or u.query or u.fragment:
        raise ConfigError(f"{var} must not hold a user, password, query or fragment")
    if u.scheme == "http" and not is_loopback(host):
        raise ConfigError(f"{var}: plain http is allowed only to a loopback host (127.0.0.1, ::1, localhost), "
                          f"not {host[:100]!r}; use https://")
    return raw.rstrip("/")


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
