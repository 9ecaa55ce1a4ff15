"""One fallback chain per symbol group, configured in one TOML file (see ``sources.example.toml``).

Each cycle, each group's symbols go to its first source; the symbols it did not serve with a valid book go
to the next, and so on until the chain or the cycle's deadline runs out. A symbol nobody served is
recorded as missing, with the reason from the last source tried. Groups are polled in parallel, so a
stalled stock vendor cannot starve the crypto group. The simulated source is never part of a chain.
"""

from __future__ import annotations

import datetime as dt
import time
import tomllib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from microstructure.book import QUARANTINE_SCHEMA, RAW_SCHEMA, malformed_record, to_utc_us, validate
from microstructure.sources.base import OUTCOMES_SCHEMA, PollResult
from microstructure.sources.guard import AUTH, DEADLINE, INVALID_BOOK, NOT_CONFIGURED, Limits, SourceError
from microstructure.sources.vendor import ConfigError, VendorSource

# Used when no sources file is given: the roadmap's order (Polygon primary, Alpaca fallback for stocks;
# Alpaca's real L2 first for crypto, Polygon's deprecated book behind it).
DEFAULT_CONFIG = """
cycle_deadline_s = 2.5

[sources.polygon_stocks]
kind = "polygon"
asset = "stocks"

[sources.alpaca_stocks]
kind = "alpaca"
asset = "stocks"
feed = "iex"

[sources.alpaca_crypto]
kind = "alpaca"
asset = "crypto"

[sources.polygon_crypto]
kind = "polygon"
asset = "crypto"

[groups.stocks]
chain = ["polygon_stocks", "alpaca_stocks"]

[groups.crypto]
chain = ["alpaca_crypto", "polygon_crypto"]
"""

SOURCE_KEYS = {"kind", "asset", "feed", "base_url", "lot_size", "retries", *Limits.__dataclass_fields__}


class AuthRejected(ConfigError):
    """Every source tried this cycle refused our credentials."""


def asset_of(symbol: str) -> str:
    """``BTC/USD`` style symbols are crypto; everything else is a US stock ticker."""
    return "crypto" if "/" in symbol else "stocks"


@dataclass
class Group:
    name: str
    chain: list[str]
    asset: str
    symbols: list[str]


def read_symbols_file(path: Path) -> list[str]:
    """One symbol per line (or comma-separated); ``#`` starts a comment."""
    if not path.exists():
        raise ConfigError(f"symbols file not found: {path}")
    out: list[str] = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0]
        out += [s.strip() for s in line.replace(",", " ").split() if s.strip()]
    return list(dict.fromkeys(out))


def build_source(name: str, spec: dict[str, Any]) -> VendorSource:
    unknown = set(spec) - SOURCE_KEYS
    if unknown:
        raise ConfigError(f"source {name!r}: unknown option(s) {sorted(unknown)}")
    limits = Limits(**{k: spec[k] for k in Limits.__dataclass_fields__ if k in spec})
    kind = spec.get("kind")
    common = {"name": name, "asset": spec.get("asset", "stocks"), "limits": limits, "base_url": spec.get("base_url"),
              "lot_size": float(spec.get("lot_size", 1.0))}
    if kind == "polygon":
        from microstructure.sources.polygon import PolygonSource

        return PolygonSource(retries=int(spec.get("retries", 1)), **common)
    if kind == "alpaca":
        from microstructure.sources.alpaca import AlpacaSource

        return AlpacaSource(feed=spec.get("feed", "iex"), **common)
    if kind == "simulated":
        raise ConfigError(f"source {name!r}: the simulated source is never part of a vendor chain; "
                          "use `poll --source simulated`")
    raise ConfigError(f"source {name!r}: kind must be polygon or alpaca, not {kind!r}")


class ChainSource:
    name = "chain"

    def __init__(self, sources: dict[str, VendorSource], groups: list[Group], cycle_deadline_s: float = 2.5) -> None:
        self.sources = sources
        self.groups = groups
        self.cycle_deadline_s = cycle_deadline_s
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(groups)), thread_name_prefix="chain")

    def __repr__(self) -> str:
        return f"ChainSource(groups={[(g.name, g.chain) for g in self.groups]})"

    @property
    def symbols(self) -> list[str]:
        return [s for g in self.groups for s in g.symbols]

    def group_of(self, symbol: str) -> Group | None:
        for g in self.groups:
            if symbol in g.symbols:
                return g
        return next((g for g in self.groups if g.asset == asset_of(symbol)), None)

    def poll(self, symbols: Sequence[str], at: dt.datetime) -> PollResult:
        at = to_utc_us(at)
        deadline = time.monotonic() + self.cycle_deadline_s
        by_group: dict[str, list[str]] = {}
        orphans: list[str] = []
        for s in symbols:
            g = self.group_of(s)
            if g is None:
                orphans.append(s)
            else:
                by_group.setdefault(g.name, []).append(s)
        groups = {g.name: g for g in self.groups}
        futs = [self._pool.submit(self._poll_group, groups[n], syms, at, deadline) for n, syms in by_group.items()]
        parts = [f.result() for f in futs]
        outcomes: list[dict[str, Any]] = [
            _outcome(at, s, None, 0, None, NOT_CONFIGURED, "no group in the sources file takes this symbol")
            for s in orphans]
        raw = [p[0] for p in parts]
        rejected = [p[1] for p in parts]
        for p in parts:
            outcomes += p[2]
        served = sum(1 for o in outcomes if o["error_class"] is None)
        if outcomes and served == 0 and all(o["error_class"] == AUTH for o in outcomes):
            raise AuthRejected("every source refused its API key (HTTP 401/403): check POLYGON_API_KEY, "
                               "APCA_API_KEY_ID and APCA_API_SECRET_KEY")
        return PollResult(raw=pa.concat_tables([RAW_SCHEMA.empty_table(), *raw]),
                          rejected=pa.concat_tables([QUARANTINE_SCHEMA.empty_table(), *rejected]),
                          outcomes=pa.Table.from_pylist(outcomes, schema=OUTCOMES_SCHEMA))

    def _poll_group(self, group: Group, symbols: list[str], at: dt.datetime,
                    deadline: float) -> tuple[pa.Table, pa.Table, list[dict[str, Any]]]:
        remaining = list(symbols)
        tried: dict[str, list[str]] = {s: [] for s in symbols}
        last: dict[str, tuple[str, str]] = {}
        raw: list[pa.Table] = []
        rejected: list[pa.Table] = []
        outcomes: list[dict[str, Any]] = []
        for name in group.chain:
            if not remaining:
                break
            src = self.sources[name]
            if time.monotonic() >= deadline:
                for s in remaining:
                    tried[s].append(f"{name}: {DEADLINE}")
                    last[s] = (DEADLINE, "the cycle deadline passed before this source was tried")
                continue
            t0 = time.monotonic()
            try:
                got = src.fetch(remaining, at, deadline)
            except SourceError as e:
                for s in remaining:
                    tried[s].append(f"{name}: {e.error_class}")
                    last[s] = (e.error_class, e.detail)
                continue
            latency = (time.monotonic() - t0) * 1000
            for sym, body in got.malformed:
                rejected.append(malformed_record(sym, name, at, "malformed", body))
            checked = validate(got.table())
            rejected.append(checked.quarantine)
            for s, e in got.errors.items():
                tried[s].append(f"{name}: {e.error_class}")
                last[s] = (e.error_class, e.detail)
            for s, why in zip(checked.quarantine.column("symbol").to_pylist(),
                              checked.quarantine.column("reason").to_pylist(), strict=True):
                tried[s].append(f"{name}: {INVALID_BOOK} ({why})")
                last[s] = (INVALID_BOOK, why)
            clean = checked.clean
            if clean.num_rows:
                raw.append(clean.cast(RAW_SCHEMA))
                levels = np.asarray(clean.column("book_levels").to_numpy())
                for s, lv in zip(clean.column("symbol").to_pylist(), levels, strict=True):
                    tried[s].append(f"{name}: ok")
                    outcomes.append(_outcome(at, s, name, int(lv), latency, None, "; ".join(tried[s])))
                done = set(clean.column("symbol").to_pylist())
                remaining = [s for s in remaining if s not in done]
        for s in remaining:
            cls, detail = last.get(s, (NOT_CONFIGURED, "empty chain"))
            outcomes.append(_outcome(at, s, None, 0, None, cls, "; ".join(tried[s]) + (f" | {detail}" if detail
                                                                                         else "")))
        return (pa.concat_tables([RAW_SCHEMA.empty_table(), *raw]),
                pa.concat_tables([QUARANTINE_SCHEMA.empty_table(), *rejected]), outcomes)

    def close(self) -> None:
        for s in self.sources.values():
            guard = getattr(s, "guard", None)
            if guard is not None:
                guard.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _outcome(at: dt.datetime, symbol: str, source: str | None, levels: int, latency: float | None,
             error_class: str | None, detail: str) -> dict[str, Any]:
    return {"cycle_ts": at, "symbol": symbol, "source": source, "book_levels": levels, "latency_ms": latency,
            "error_class": error_class, "detail": detail[:1000]}


def load_config(path: Path | None) -> tuple[dict[str, Any], Path]:
    if path is None:
        return tomllib.loads(DEFAULT_CONFIG), Path.cwd()
    if not path.exists():
        raise ConfigError(f"sources file not found: {path}")
    try:
        return tomllib.loads(path.read_text()), path.parent
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def build_chain(config_path: Path | None = None, symbols: Sequence[str] | None = None,
                only: str | None = None) -> ChainSource:
    """The chain from ``config_path`` (or the built-in default). ``symbols`` adds symbols to the groups of
    their asset class. ``only`` ("polygon" or "alpaca") keeps just that vendor's sources in every chain."""
    cfg, base = load_config(config_path)
    specs: dict[str, dict[str, Any]] = cfg.get("sources", {})
    gcfg: dict[str, dict[str, Any]] = cfg.get("groups", {})
    if not gcfg:
        raise ConfigError("the sources file has no [groups.<name>] with a chain")
    groups: list[Group] = []
    for gname, g in gcfg.items():
        chain = list(g.get("chain", []))
        for n in chain:
            if n not in specs:
                raise ConfigError(f"group {gname!r}: chain names unknown source {n!r}")
        if only is not None:
            chain = [n for n in chain if specs[n].get("kind") == only]
        assets = {specs[n].get("asset", "stocks") for n in chain}
        if len(assets) > 1:
            raise ConfigError(f"group {gname!r}: mixes asset classes {sorted(assets)}")
        syms = list(g.get("symbols", []))
        if "symbols_file" in g:
            syms += read_symbols_file(base / g["symbols_file"])
        groups.append(Group(gname, chain, assets.pop() if assets else g.get("asset", "stocks"), syms))
    for s in symbols or []:
        if not any(s in g.symbols for g in groups):
            g = next((g for g in groups if g.asset == asset_of(s) and g.chain), None)
            if g is not None:
                g.symbols.append(s)
    needed = {n for g in groups if g.symbols for n in g.chain}
    if only is not None and not needed:
        raise ConfigError(f"no {only} source covers the requested symbols")
    sources = {n: build_source(n, specs[n]) for n in sorted(needed)}
    return ChainSource(sources, groups, float(cfg.get("cycle_deadline_s", 2.5)))
