"""One fallback chain per symbol group, configured in one TOML file (see ``sources.example.toml``).

Each cycle, each group's symbols go to its first source; the symbols it did not serve with a valid book go
to the next, and so on until the chain or the cycle's deadline runs out. A symbol nobody served is
recorded as missing, with the reason from the last source tried. Groups are polled in parallel, so a
stalled stock vendor cannot starve the crypto group. The simulated source is never part of a chain.

Faults are isolated per symbol (:class:`Isolation`): a batched call that hangs or fails in a way one symbol
can cause is split in halves, in the same cycle while the deadline allows and otherwise in the next, until
the culprits stand alone behind breakers of their own; the healthy symbols keep riding one batch call.
The source's own breaker only counts cycles in which none of its calls worked.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import tomllib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from microstructure.contract.book import QUARANTINE_SCHEMA, RAW_SCHEMA, malformed_record, to_utc_us, validate
from microstructure.contract.outcomes import OUTCOMES_SCHEMA
from microstructure.sources.base import PollResult
from microstructure.sources.guard import (
    AUTH,
    BREAKER_OPEN,
    CONNECTION,
    DEADLINE,
    INVALID_BOOK,
    NOT_CONFIGURED,
    SPLITTABLE,
    CircuitBreaker,
    Limits,
    SourceError,
)
from microstructure.sources.secrets import scrub
from microstructure.sources.vendor import ConfigError, Fetched, VendorSource

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

SOURCE_KEYS = {"kind", "asset", "feed", "lot_size", "retries", *Limits.__dataclass_fields__}
# Where a source's key is sent is the environment's choice only (see vendor.base_url_from_env): a sources file,
# above all one inside a data dir, may come from anyone.
BASE_URL_ENV = {"polygon": "MICROSTRUCTURE_POLYGON_BASE_URL", "alpaca": "MICROSTRUCTURE_ALPACA_DATA_URL"}


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


# An explicit symbol list: a few thousand at most in practice (the whole US market, ~10,000 tickers, comes from
# `--source polygon-market`, which builds its own list). Vendors take a batch of symbols as one comma-separated
# parameter, so a symbol sent to one holds no separator, space or control character.
MAX_SYMBOLS = 20_000
MAX_SYMBOL_CHARS = 32  # OCC option tickers, the longest a vendor spells, have 21
SYMBOLS_FILE_BYTES = 4 << 20  # 20,000 symbols with room for comments
_VENDOR_SYMBOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9./:_-]*")  # AAPL, BRK.B, BTC/USD, X:BTCUSD, O:SPY...


def check_symbols(symbols: Sequence[str], what: str = "symbol list", vendor: bool = True) -> list[str]:
    """``symbols`` without repeats, or ConfigError (one line) when there are more than ``MAX_SYMBOLS``, one is
    empty or longer than ``MAX_SYMBOL_CHARS``, or (``vendor``: the list goes to a vendor) one holds a character
    no vendor symbol has."""
    out = list(dict.fromkeys(symbols))
    if len(out) > MAX_SYMBOLS:
        raise ConfigError(f"{what}: {len(out):,} symbols; an explicit list holds at most {MAX_SYMBOLS:,} "
                          "(for every US stock use --source polygon-market)")
    for s in out:
        if not s or len(s) > MAX_SYMBOL_CHARS:
            shown = repr(s) if len(s) <= 40 else f"{s[:37]!r}..."
            raise ConfigError(f"{what}: symbol {shown} is {len(s)} characters long; a symbol has 1 to "
                              f"{MAX_SYMBOL_CHARS}")
        if vendor and not _VENDOR_SYMBOL.fullmatch(s):
            raise ConfigError(f"{what}: symbol {s!r} holds a character no vendor symbol has (letters, digits and "
                              ". / : _ - only)")
    return out


def read_symbols_file(path: Path, vendor: bool = True) -> list[str]:
    """One symbol per line (or comma-separated); ``#`` starts a comment. Read line by line within
    ``SYMBOLS_FILE_BYTES``; the symbols are checked by :func:`check_symbols`."""
    if not path.is_file():
        raise ConfigError(f"symbols file not found: {path}")
    what = f"symbols file {path}"
    if path.stat().st_size > SYMBOLS_FILE_BYTES:
        raise ConfigError(f"{what} is larger than {SYMBOLS_FILE_BYTES >> 20} MiB; an explicit list holds at most "
                          f"{MAX_SYMBOLS:,} symbols (for every US stock use --source polygon-market)")
    out: dict[str, None] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.split("#", 1)[0]
                out.update((s, None) for s in line.replace(",", " ").split())
                if len(out) > MAX_SYMBOLS:
                    break  # check_symbols names the cap
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text") from None
    return check_symbols(list(out), what, vendor)


def build_source(name: str, spec: dict[str, Any]) -> VendorSource:
    if "base_url" in spec:
        var = BASE_URL_ENV.get(str(spec.get("kind")), "MICROSTRUCTURE_POLYGON_BASE_URL or "
                                                           "MICROSTRUCTURE_ALPACA_DATA_URL")
        raise ConfigError(f"source {name!r}: base_url cannot be set in a sources file (it decides where the API "
                          f"key is sent); set {var} in the environment for a local stand-in")
    unknown = set(spec) - SOURCE_KEYS
    if unknown:
        raise ConfigError(f"source {name!r}: unknown option(s) {sorted(unknown)}")
    limits = Limits(**{k: spec[k] for k in Limits.__dataclass_fields__ if k in spec})
    kind = spec.get("kind")
    common = {"name": name, "asset": spec.get("asset", "stocks"), "limits": limits,
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


class Isolation:
    """One source's memory of which sub-batches of its symbols hold a failing symbol.

    Hand-written because it is specific to batched market-data calls (no breaker library splits a batch):
    ``suspects`` are disjoint sub-batches that failed; a suspect of one symbol has its own circuit breaker.
    Each cycle the symbols outside every suspect ride one batch call and every suspect gets its own call.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.suspects: list[tuple[str, ...]] = []
        self.breakers: dict[str, CircuitBreaker] = {}
        self.last: dict[str, SourceError] = {}

    def plan(self, symbols: Sequence[str]) -> tuple[list[tuple[str, ...]], dict[str, SourceError]]:
        """This cycle's calls (healthy batch first) and the symbols not called (their breaker is open)."""
        want = set(symbols)
        held: set[str] = set()
        calls: list[tuple[str, ...]] = []
        skipped: dict[str, SourceError] = {}
        for g in self.suspects:
            held.update(g)
            part = tuple(s for s in g if s in want)
            if not part:
                continue
            br = self.breakers.get(part[0]) if len(part) == 1 else None
            if br is not None and not br.allow():
                last = self.last.get(part[0])
                skipped[part[0]] = SourceError(
                    last.error_class if last else BREAKER_OPEN,
                    f"not called: {part[0]} failed {br.consecutive} times in a row"
                    + (f" (last: {last.detail})" if last and last.detail else ""))
                continue
            calls.append(part)
        healthy = tuple(s for s in symbols if s not in held)
        return ([healthy] if healthy else []) + calls, skipped

    def _regroup(self, batch: tuple[str, ...], into: list[tuple[str, ...]]) -> None:
        gone = set(batch)
        self.suspects = [g for g in (tuple(s for s in g if s not in gone) for g in self.suspects) if g] + into

    def succeeded(self, batch: tuple[str, ...]) -> None:
        for s in batch:
            br = self.breakers.pop(s, None)
            if br is not None:
                br.record(True)
            self.last.pop(s, None)
        self._regroup(batch, [])

    def failed(self, batch: tuple[str, ...], err: SourceError) -> list[tuple[str, ...]]:
        """Record a failed call; return the halves to call next (none once the culprit stands alone)."""
        if len(batch) == 1:
            s = batch[0]
            br = self.breakers.setdefault(s, CircuitBreaker(self.limits.breaker_failures,
                                                            self.limits.breaker_cooldown_s))
            br.record(False)
            self.last[s] = err
            self._regroup(batch, [batch])
            return []
        halves = [batch[: len(batch) // 2], batch[len(batch) // 2:]]
        self._regroup(batch, halves)
        return halves


class ChainSource:
    name = "chain"

    def __init__(self, sources: dict[str, VendorSource], groups: list[Group], cycle_deadline_s: float = 2.5) -> None:
        self.sources = sources
        self.groups = groups
        self.cycle_deadline_s = cycle_deadline_s
        self.isolation = {n: Isolation(getattr(s, "limits", Limits())) for n, s in sources.items()}
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(groups)), thread_name_prefix="chain")
        # The calls of one source in one cycle run side by side (a suspect sub-batch must not wait for the
        # healthy batch). Each waits at most until the cycle's deadline, so these threads never outlive it.
        self._calls = ThreadPoolExecutor(max_workers=32, thread_name_prefix="chain-call")

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
            got, latency = self._fetch(name, src, remaining, at, deadline)
            for sym, body in got.malformed:
                rejected.append(malformed_record(sym, name, dt.datetime.now(dt.UTC), "malformed", scrub(body)))
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
                    outcomes.append(_outcome(at, s, name, int(lv), latency.get(s), None, "; ".join(tried[s])))
                done = set(clean.column("symbol").to_pylist())
                remaining = [s for s in remaining if s not in done]
        for s in remaining:
            cls, detail = last.get(s, (NOT_CONFIGURED, "empty chain"))
            outcomes.append(_outcome(at, s, None, 0, None, cls, "; ".join(tried[s]) + (f" | {detail}" if detail
                                                                                         else "")))
        return (pa.concat_tables([RAW_SCHEMA.empty_table(), *raw]),
                pa.concat_tables([QUARANTINE_SCHEMA.empty_table(), *rejected]), outcomes)

    def _fetch(self, name: str, src: VendorSource, symbols: list[str], at: dt.datetime,
               deadline: float) -> tuple[Fetched, dict[str, float]]:
        """Everything ``src`` can serve of ``symbols`` this cycle, isolating failing symbols (see Isolation)."""
        guard = getattr(src, "guard", None)
        if guard is not None and not guard.breaker.allow():
            err = SourceError(BREAKER_OPEN, f"{name} had no working call in {guard.breaker.consecutive} cycles")
            return Fetched(errors=dict.fromkeys(symbols, err), calls_ok=0), {}
        iso = self.isolation[name]
        calls, skipped = iso.plan(symbols)
        out = Fetched(errors=dict(skipped), calls_ok=0)
        latency: dict[str, float] = {}
        worked = failed = False
        while calls:
            futs = [(b, self._calls.submit(_timed_fetch, src, b, at, deadline)) for b in calls]
            calls = []
            for batch, fut in futs:
                got, err, ms = fut.result()
                latency.update(dict.fromkeys(batch, ms))
                if got is not None:
                    for s in batch:
                        out.errors.pop(s, None)
                    out.merge(got)
                    if got.calls_ok:
                        worked = True
                        iso.succeeded(batch)
                    elif got.errors:
                        failed = True
                    continue
                assert err is not None
                out.errors.update(dict.fromkeys(batch, err))
                if err.error_class in SPLITTABLE:
                    failed = True
                    calls += iso.failed(batch, err)
                elif err.error_class in (AUTH, CONNECTION):
                    failed = True
            if time.monotonic() >= deadline:
                break  # unsplit halves stay suspects: the next cycle goes on from here
        if guard is not None and (worked or failed):
            guard.breaker.record(worked)
        return out, latency

    def close(self) -> None:
        for s in self.sources.values():
            guard = getattr(s, "guard", None)
            if guard is not None:
                guard.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._calls.shutdown(wait=False, cancel_futures=True)


def _timed_fetch(src: VendorSource, batch: tuple[str, ...], at: dt.datetime,
                 deadline: float) -> tuple[Fetched | None, SourceError | None, float]:
    t0 = time.monotonic()
    try:
        got = src.fetch(list(batch), at, deadline)
    except SourceError as e:
        return None, e, (time.monotonic() - t0) * 1000
    return got, None, (time.monotonic() - t0) * 1000


def _outcome(at: dt.datetime, symbol: str, source: str | None, levels: int, latency: float | None,
             error_class: str | None, detail: str) -> dict[str, Any]:
    return {"cycle_ts": at, "symbol": symbol, "source": source, "book_levels": levels, "latency_ms": latency,
            "error_class": error_class, "detail": scrub(detail)[:1000]}


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
            # Inside the sources file's own folder only: a data dir's sources.toml must not be able to read any
            # file of the user's (say ~/.aws/credentials) and send its words to a vendor as tickers.
            f = (base / str(g["symbols_file"])).resolve()
            if not f.is_relative_to(base.resolve()):
                raise ConfigError(f"group {gname!r}: symbols_file must be inside the sources file's folder "
                                  f"({base.resolve()}); pass other lists with --symbols-file")
            syms += read_symbols_file(f)
        syms = check_symbols(syms, f"group {gname!r}")
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
