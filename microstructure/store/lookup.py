"""The online read a scorer makes: each symbol's served features, its age, and whether it may be trusted.

Age is ``now - `` the book's time, to the microsecond: Feast keeps a timestamp feature online to the whole second
(``event_ts`` comes back floored), so the book's time is read from ``event_ts_us``, the same instant as an integer
(``transforms/features.sql``). A row written before that feature existed has none: its age falls back to the
floored ``event_ts`` and errs old by up to 1 s (its ``event_ts_us`` reads null, which says so).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from microstructure.contract.book import AHEAD as _AHEAD
from microstructure.contract.book import EARLIEST as _EARLIEST
from microstructure.contract.catalogue import FRESHNESS_S

if TYPE_CHECKING:

    from feast import FeatureStore


@dataclass(frozen=True)
class OnlineRow:
    symbol: str
    found: bool
    features: dict[str, Any]
    event_ts: dt.datetime | None  # exact (from event_ts_us), or floored to the second for a row without it
    age_s: float | None
    stale: bool
    error: str | None = None  # "bad online row: ...": a stored row that cannot be served (found False, stale)

    def as_dict(self) -> dict[str, Any]:
        d = {"symbol": self.symbol, "found": self.found,
             "event_ts": self.event_ts.isoformat() if self.event_ts else None,
             "age_s": None if self.age_s is None else round(self.age_s, 6), "stale": self.stale,
             **{k: v for k, v in self.features.items() if k != "event_ts"}}
        if self.error is not None:
            d["error"] = self.error
        return d


# Any process that can reach the online store can write a row (``feast serve``'s push endpoint, a Redis client):
# a reader judges each row on its own. A row whose values are not of the view's types, whose floats are not
# finite, whose book time is impossible, or that lacks what every served book has, is reported bad for its
# symbol: found False, stale, and an ``error`` saying why. Its values are never served and the other symbols
# are read as usual.
NEEDED = ("spread_bps", "order_imbalance", "depth_dollars", "has_recent_halt")  # never null in a served book
EXACT_TS = "event_ts_us"  # the book's time in epoch microseconds: what the age is computed from
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _finite_number(v: Any) -> str | None:
    t = type(v)
    if t is float:  # the common case first: this runs for every value of every read
        return None if -_INF < v < _INF else "not finite"
    if t is bool or not isinstance(v, int | float | np.integer | np.floating):
        return "not a number"
    return None if -_INF < v < _INF else "not finite"


def _of(*kinds: type) -> Any:
    def check(v: Any) -> str | None:
        return None if isinstance(v, kinds) and (bool in kinds or type(v) is not bool) else "of the wrong type"

    return check


_INF = float("inf")
_CHECKS = {"DOUBLE": _finite_number, "FLOAT": _finite_number, "INT32": _of(int, np.integer),
           "INT64": _of(int, np.integer), "BOOL": _of(bool, np.bool_), "STRING": _of(str),
           "UNIX_TIMESTAMP": _of(dt.datetime)}


def _types(fields: Any, names: Any) -> tuple[tuple[str, ...], tuple[tuple[str, Any], ...]]:
    """How to check ``names``: (the float features, (name, check) of the others) by their Feast types (a type this
    project does not serve is not checked). Floats apart: they are most values, and checked inline."""
    kinds = {f.name: f.dtype.to_value_type().name for f in fields}
    floats = tuple(n for n in names if kinds.get(n) in ("DOUBLE", "FLOAT"))
    others = tuple((n, _CHECKS[kinds[n]]) for n in names if n not in floats and kinds.get(n) in _CHECKS)
    return floats, others


def _problem(feats: dict[str, Any], ev: dt.datetime | None, checks: Any, with_ts: bool, latest: dt.datetime
             ) -> str | None:
    floats, others = checks
    for name in floats:
        v = feats.get(name)
        if v is None or (type(v) is float and -_INF < v < _INF):  # every read runs this: the common case inline
            continue
        why = _finite_number(v)
        if why:
            return f"{name} {repr(v)[:40]} is {why}"
    for name, check in others:
        v = feats.get(name)
        why = None if v is None else check(v)
        if why:
            return f"{name} {repr(v)[:40]} is {why}"
    if with_ts and ev is None:
        return "no event_ts"
    if ev is not None and not _EARLIEST <= ev <= latest:
        return f"event_ts {ev.isoformat()} is impossible"
    if None in feats.values():
        missing = [n for n in NEEDED if n in feats and feats[n] is None]
        return f"{', '.join(missing)} missing" if missing else None
    return None


def _bad(sym: str, names: Any, why: str) -> OnlineRow:
    return OnlineRow(sym, False, {n: None for n in names}, None, None, True, f"bad online row: {why}")


def _exact(us: Any, ev: dt.datetime | None) -> dt.datetime | str:
    """The book's time from ``event_ts_us``, or why the row is bad: not an integer, impossible, or not the
    instant ``event_ts`` (which Feast floors to the second) says."""
    if type(us) is not int and not isinstance(us, np.integer):
        return f"{EXACT_TS} {repr(us)[:40]} is not an integer"
    try:
        exact = _EPOCH + dt.timedelta(microseconds=int(us))
    except OverflowError:
        return f"impossible {EXACT_TS} {us!r}"
    if ev is not None and not dt.timedelta(0) <= exact - ev < dt.timedelta(seconds=1):
        return f"{EXACT_TS} {us} is not event_ts {ev.isoformat()}"
    return exact


def _row(sym: str, feats: dict[str, Any], ev: Any, now: dt.datetime, freshness_s: float,
         types: Any = None, with_ts: bool = False, latest: dt.datetime | None = None, us: Any = None
         ) -> OnlineRow:
    if isinstance(ev, int | float) and not isinstance(ev, bool):
        try:
            ev = dt.datetime.fromtimestamp(ev, dt.UTC)
        except (OverflowError, OSError, ValueError):
            return _bad(sym, feats, f"impossible event_ts {ev!r}")
    if isinstance(ev, pd.Timestamp):
        ev = ev.to_pydatetime()
    if ev is not None and not isinstance(ev, dt.datetime):
        return _bad(sym, feats, f"event_ts {repr(ev)[:40]} is not a time")
    if ev is not None and ev.tzinfo is None:
        ev = ev.replace(tzinfo=dt.UTC)
    if us is not None:  # the exact time; None: a row written before event_ts_us existed (ev, to the second)
        if with_ts and ev is None:  # every book has both: an exact time alone is a time nothing vouches for
            return _bad(sym, feats, f"{EXACT_TS} without event_ts")
        exact = _exact(us, ev)
        if isinstance(exact, str):
            return _bad(sym, feats, exact)
        ev = exact
    found = ev is not None or any(v is not None for k, v in feats.items() if k != "event_ts")
    if found:
        why = _problem(feats, ev, types or ((), ()), with_ts, latest or dt.datetime.now(dt.UTC) + _AHEAD)
        if why:
            return _bad(sym, feats, why)
    age = (now - ev).total_seconds() if ev is not None else None
    return OnlineRow(sym, found, feats, ev, age, stale=age is None or age > freshness_s)


_plans: dict[tuple[int, str], tuple[float, Any]] = {}  # (store, service) -> (when read, plan)


def _plain_view(store: FeatureStore, name: str) -> Any:
    """The (cached) regular feature view ``name``, or None for an on-demand view."""
    from feast.errors import FeatureViewNotFoundException

    try:
        return store.get_feature_view(name)
    except FeatureViewNotFoundException:
        return None


def _read_plan(store: FeatureStore, service: str) -> tuple[Any, list[str], list[str], Any] | None:
    """(feature view, its requested names, names to read, their value types) for a one-view service, else None.
    Kept for the registry's cache TTL: Feast's registry lookups are type-checked call by call (~3 ms of a
    150-symbol read)."""
    import time

    key = (id(store), service)
    hit = _plans.get(key)
    if hit and time.monotonic() - hit[0] < store.config.registry.cache_ttl_seconds:
        return hit[1]
    projections = store.get_feature_service(service).feature_view_projections
    fv = _plain_view(store, projections[0].name) if len(projections) == 1 else None
    plan = None
    if fv is not None:
        names = [f.name for f in projections[0].features]
        # The book's time is always read, whatever the service holds: event_ts and (if the view has it, as
        # every view built from features.sql does) its exact twin.
        times = ["event_ts", *([EXACT_TS] if any(f.name == EXACT_TS for f in fv.features) else [])]
        plan = (fv, names, [*names, *(t for t in times if t not in names)], _types(fv.features, names))
    _plans[key] = (time.monotonic(), plan)
    return plan


def read_online(store: FeatureStore, symbols: list[str], freshness_s: float = FRESHNESS_S,
                now: dt.datetime | None = None, service: str = "order_book_all",
                fast: bool = True) -> list[OnlineRow]:
    """Online features per symbol with their age and stale flag (Feast ignores TTL online, so staleness is
    judged here, on every row, whatever the service: the book's ``event_ts`` and ``event_ts_us`` are always
    read; the age is exact to the microsecond, see the module's docstring).

    ``fast`` reads Feast's stored rows directly (``microstructure.store.online_read``; same values as
    ``get_online_features``, ~10x less time); services with on-demand views go through Feast."""
    from microstructure.store import online_read

    plan = _read_plan(store, service) if fast and online_read.supported(store) else None
    # The real clock bounds a plausible book time (a day ahead, as the lake's implausible_time), whatever ``now``
    # says: a row stamped in the year 9999 would otherwise be fresh for ever.
    real_now = dt.datetime.now(dt.UTC)
    latest = real_now + _AHEAD
    now = now or real_now
    if plan is not None:
        fv, names, read, types = plan
        rows = []
        for sym, got in zip(symbols, online_read.read(store, fv, symbols, read), strict=True):
            if isinstance(got, online_read.BadRow):
                rows.append(_bad(sym, names, got.reason))
                continue
            got = got or {}
            rows.append(_row(sym, {n: got.get(n) for n in names}, got.get("event_ts"), now, freshness_s, types,
                             with_ts=True, latest=latest, us=got.get(EXACT_TS)))
        return rows
    svc = store.get_feature_service(service)
    fields = [f for p in svc.feature_view_projections for f in p.features]
    types = _types(fields, [f.name for f in fields])
    return _read_through_feast(store, svc, symbols, now, freshness_s, types, latest)


def _read_through_feast(store: FeatureStore, svc: Any, symbols: list[str], now: dt.datetime, freshness_s: float,
                        types: Any, latest: dt.datetime) -> list[OnlineRow]:
    """``get_online_features`` for ``symbols``. Feast decodes every row of the batch in one go, so one row it
    cannot decode fails them all: then each symbol is read alone and only the failing ones are reported bad."""
    import errno

    from google.protobuf.message import DecodeError

    try:
        resp = store.get_online_features(features=svc, entity_rows=[{"symbol": s} for s in symbols]).to_dict()
    except (DecodeError, ValueError, TypeError, OverflowError, KeyError, AttributeError, OSError) as e:
        # (OSError: what fromtimestamp raises on an impossible timestamp; any other OSError is the store's own.)
        if isinstance(e, OSError) and e.errno != errno.EOVERFLOW:
            raise
        if len(symbols) == 1:
            names = [f.name for p in svc.feature_view_projections for f in p.features]
            return [_bad(symbols[0], names, f"{type(e).__name__}: {str(e)[:80]}")]
        return [r for s in symbols for r in _read_through_feast(store, svc, [s], now, freshness_s, types, latest)]
    names = [k for k in resp if k != "symbol"]
    with_ts = "event_ts" in resp
    none = [None] * len(symbols)
    return [_row(sym, {k: resp[k][i] for k in names}, resp.get("event_ts", none)[i], now, freshness_s, types,
                 with_ts=with_ts, latest=latest, us=resp.get(EXACT_TS, none)[i]) for i, sym in enumerate(symbols)]
