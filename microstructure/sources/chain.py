"""One fallback chain per symbol group, run each cycle (configured in one TOML file, read by ``chain_config``).

Each cycle, each group's symbols go to its first source; the symbols it did not serve with a valid book go
to the next, and so on until the chain or the cycle's deadline runs out. A symbol nobody served is
recorded as missing, with the reason from the last source tried. Groups are polled in parallel, so a
stalled stock vendor cannot starve the crypto group. The simulated source is never part of a chain.

Faults are isolated per symbol (``sources.isolation``): a batched call that hangs or fails in a way one symbol
can cause is split in halves, in the same cycle while the deadline allows and otherwise in the next, until
the culprits stand alone behind breakers of their own; the healthy symbols keep riding one batch call.
The source's own breaker only counts cycles in which none of its calls worked.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
    Limits,
    SourceError,
)
from microstructure.sources.isolation import Isolation
from microstructure.sources.secrets import scrub
from microstructure.sources.vendor import ConfigError, Fetched, VendorSource


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
                               "APCA_API_KEY_ID, APCA_API_SECRET_KEY and DATABENTO_API_KEY")
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
            for sym, reason, body in got.rejected:
                rejected.append(malformed_record(sym, name, dt.datetime.now(dt.UTC), reason, scrub(body)))
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
            shut = SourceError(BREAKER_OPEN, f"{name} had no working call in {guard.breaker.consecutive} cycles")
            return Fetched(errors=dict.fromkeys(symbols, shut), calls_ok=0), {}
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
            closer = getattr(s, "close", None)  # a streaming source ends its connection; ccxt its loop and session
            if closer is not None:
                closer()
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

