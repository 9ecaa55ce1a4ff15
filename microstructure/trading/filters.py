"""Execution-quality filters and the "microstructure risky" marking.

Each filter looks at one feature row (a dict from the online or offline store) and either passes or drops
the pick with a reason a person can read. Filters compose: ``apply_filters`` runs them in order and
reports the first that drops. Thresholds come from ``trading.thresholds.Thresholds``; nothing here hard-codes one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from microstructure.contract.catalogue import say
from microstructure.contract.schemas import GAP_WINDOW, HALT_WINDOW
from microstructure.trading.thresholds import Thresholds, ThresholdSet, resolve


@dataclass(frozen=True)
class Verdict:
    kept: bool
    filter: str | None = None
    reason: str = "passed all filters"


Filter = Callable[[Mapping[str, Any], str, Thresholds], Verdict | None]


def spread_filter(f: Mapping[str, Any], mode: str, t: Thresholds) -> Verdict | None:
    limit = t.max_spread(mode)
    if f["spread_bps"] > limit:
        return Verdict(False, "spread", f"spread {f['spread_bps']:.1f} bps > {limit:g} bps ({mode})")
    return None


def depth_filter(f: Mapping[str, Any], mode: str, t: Thresholds) -> Verdict | None:
    limit = t.min_depth(mode)
    if f["depth_dollars"] < limit:
        return Verdict(False, "depth", f"top-5 depth ${f['depth_dollars']:,.0f} < ${limit:,.0f} ({mode})")
    return None


def gap_filter(f: Mapping[str, Any], mode: str, t: Thresholds) -> Verdict | None:
    if (f.get("gap_pct") or 0.0) > t.max_gap_pct:
        return Verdict(False, "gap",
                       f"mid moved {f['gap_pct']:.1%} in the last {say(GAP_WINDOW)} (> {t.max_gap_pct:.0%})")
    return None


def halt_filter(f: Mapping[str, Any], mode: str, t: Thresholds) -> Verdict | None:
    if f.get("halted"):
        return Verdict(False, "halt", "trading is halted")
    if f.get("has_recent_halt"):
        return Verdict(False, "halt", f"trading was halted in the last {say(HALT_WINDOW)}")
    return None


DEFAULT_FILTERS: tuple[Filter, ...] = (halt_filter, gap_filter, spread_filter, depth_filter)


def apply_filters(f: Mapping[str, Any], mode: str, t: Thresholds | ThresholdSet,
                  filters: tuple[Filter, ...] = DEFAULT_FILTERS) -> Verdict:
    t = resolve(t, f.get("symbol"))  # the symbol's asset-class profile
    for flt in filters:
        v = flt(f, mode, t)
        if v is not None:
            return v
    return Verdict(True)


@dataclass(frozen=True)
class Risk:
    risky: bool
    reasons: list[str] = field(default_factory=list)


def risk_marking(f: Mapping[str, Any], side: str, t: Thresholds | ThresholdSet, stale: bool) -> Risk:
    """Why a pick that passed the filters still deserves care."""
    t = resolve(t, f.get("symbol"))
    reasons = []
    if f["depth_dollars"] < t.safe_min_depth_usd:
        reasons.append(f"depth ${f['depth_dollars']:,.0f} below the SAFE ${t.safe_min_depth_usd:,.0f}")
    if (f.get("book_levels") or 0) <= 1:
        reasons.append("L1 quote only: depth beyond the top of book is unknown")
    if stale:
        reasons.append("book is stale")
    imb = f.get("order_imbalance") or 0.0
    against = -imb if side == "buy" else imb
    if against >= t.risky_imbalance:
        reasons.append(f"order imbalance {imb:+.2f} is strongly against a {side}")
    gap = f.get("gap_pct") or 0.0
    if t.risky_gap_pct <= gap <= t.max_gap_pct:
        reasons.append(f"mid moved {gap:.1%} in the last {say(GAP_WINDOW)}")
    return Risk(bool(reasons), reasons)
