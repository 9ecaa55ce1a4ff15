"""What a batch must satisfy: the Great Expectations suites for snapshots and features.

The features' ranges and not-null checks are not written here: they are declared beside each feature in
``transforms/features.sql`` and derived below.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microstructure.contract.catalogue import Column

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

MAX_LAG_S = 300.0  # received_ts - event_ts beyond this: the vendor handed us an old book
# received_ts before event_ts means the two clocks disagree. Up to 5 s is tolerated: a recorder or vendor clock
# without tight NTP drifts by seconds (the shared Binance recordings run 1.3 s behind the exchange's E); beyond
# that neither timestamp can be trusted to order books against each other.
MIN_LAG_S = -5.0
FLOAT_MAX = sys.float_info.max  # the largest finite float: a bound that only the infinities exceed


def _float_features() -> list[str]:
    import pyarrow as pa

    from microstructure.contract.schemas import FEATURES_SCHEMA

    return [f.name for f in FEATURES_SCHEMA if pa.types.is_floating(f.type)]


FLOAT_FEATURES = _float_features()


def _bounds(c: Column) -> dict[str, Any]:
    """GE's between-arguments for one declared feature: its range (``[`` inclusive, ``(`` strict); a float's
    unbounded side (or both, without a range) at the largest finite float, so the infinities fail."""
    big = FLOAT_MAX if c.name in FLOAT_FEATURES else None

    def num(v: float | None, default: float | None) -> float | None:
        return default if v is None else int(v) if v.is_integer() else v

    r = c.range
    if r is None:
        return {"min_value": -FLOAT_MAX, "max_value": FLOAT_MAX}
    out: dict[str, Any] = {"min_value": num(r.lo, big and -big), "max_value": num(r.hi, big)}
    if r.lo is not None and not r.lo_closed:
        out["strict_min"] = True
    if r.hi is not None and not r.hi_closed:
        out["strict_max"] = True
    return out


def _feature_expectations(E: Any) -> list[Any]:
    """The expectations the declaration in features.sql implies: each feature's range (a float without one:
    finite), then each ``not_null`` feature's not-null check."""
    from microstructure.contract.schemas import DECLARATION

    feats = DECLARATION.features
    ranged = [E.ExpectColumnValuesToBeBetween(column=c.name, **_bounds(c))
              for c in feats if c.range is not None or c.name in FLOAT_FEATURES]
    return [*ranged, *(E.ExpectColumnValuesToNotBeNull(column=c.name) for c in feats if c.not_null)]


def _expectations(kind: str) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    common = [
        E.ExpectColumnValuesToNotBeNull(column="symbol"),
        E.ExpectColumnValuesToNotBeNull(column="event_ts"),
        E.ExpectColumnValuesToNotBeNull(column="received_ts"),
        E.ExpectColumnValuesToNotBeNull(column="source"),
        E.ExpectColumnValuesToBeBetween(column="book_levels", min_value=1, max_value=10),
        # Freshness: how old the book was when it reached us (negative = clocks disagree).
        E.ExpectColumnValuesToBeBetween(column="lag_s", min_value=MIN_LAG_S, max_value=MAX_LAG_S),
    ]
    if kind == "snapshots":
        return [
            *common,
            E.ExpectCompoundColumnsToBeUnique(column_list=["symbol", "event_ts", "source"]),
            E.ExpectColumnValuesToBeBetween(column="bid_px_1", min_value=0, strict_min=True),
            E.ExpectColumnValuesToBeBetween(column="ask_px_1", min_value=0, strict_min=True),
            E.ExpectColumnValuesToBeBetween(column="bid_sz_1", min_value=0),
            E.ExpectColumnValuesToBeBetween(column="ask_sz_1", min_value=0),
            # Ordered levels: bids fall and asks rise away from the touch; the touch is not crossed.
            E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="bid_px_1", column_B="bid_px_2",
                                                       ignore_row_if="either_value_is_missing"),
            E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="ask_px_2", column_B="ask_px_1",
                                                       ignore_row_if="either_value_is_missing"),
            E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="ask_px_1", column_B="bid_px_1", or_equal=True,
                                                       ignore_row_if="either_value_is_missing"),
        ]
    # Every float feature is finite (a 1e308 price made mid = inf, which was published and passed SAFE). GE has no
    # finiteness expectation; a range with finite bounds on both sides excludes +-inf (NaN is GE's "missing", left
    # to the not-null expectations). So a float's unbounded side is bounded at FLOAT_MAX, and a float feature
    # declared without a range gets [-FLOAT_MAX, FLOAT_MAX]: a feature added to features.sql is covered as declared.
    return [
        *common,
        E.ExpectCompoundColumnsToBeUnique(column_list=["symbol", "event_ts"]),
        *_feature_expectations(E),
    ]


@dataclass
class CheckResult:
    suite: str
    success: bool
    rows: int
    failures: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return "; ".join(self.failures) if self.failures else "ok"
