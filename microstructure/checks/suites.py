"""What a batch must satisfy: the Great Expectations suites for snapshots and features.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

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
    # to the not-null expectations). So every range below has an upper bound, and each float feature without a
    # range of its own gets [-FLOAT_MAX, FLOAT_MAX]: a feature added later is covered without an edit here.
    ranged = [
        E.ExpectColumnValuesToBeBetween(column="order_imbalance", min_value=-1, max_value=1),
        E.ExpectColumnValuesToBeBetween(column="depth_imbalance", min_value=-1, max_value=1),
        E.ExpectColumnValuesToBeBetween(column="spread_bps", min_value=0, max_value=FLOAT_MAX),
        E.ExpectColumnValuesToBeBetween(column="bid_depth", min_value=0, max_value=FLOAT_MAX),
        E.ExpectColumnValuesToBeBetween(column="ask_depth", min_value=0, max_value=FLOAT_MAX),
        E.ExpectColumnValuesToBeBetween(column="depth_dollars", min_value=0, max_value=FLOAT_MAX),
        E.ExpectColumnValuesToBeBetween(column="gap_pct", min_value=0, max_value=FLOAT_MAX),
        E.ExpectColumnValuesToBeBetween(column="best_bid", min_value=0, strict_min=True, max_value=FLOAT_MAX),
        E.ExpectColumnValuesToBeBetween(column="best_ask", min_value=0, strict_min=True, max_value=FLOAT_MAX),
        E.ExpectColumnValuesToBeBetween(column="mid", min_value=0, strict_min=True, max_value=FLOAT_MAX),
    ]
    have = {e.column for e in ranged}
    finite = [E.ExpectColumnValuesToBeBetween(column=c, min_value=-FLOAT_MAX, max_value=FLOAT_MAX)
              for c in FLOAT_FEATURES if c not in have]
    return [
        *common,
        E.ExpectCompoundColumnsToBeUnique(column_list=["symbol", "event_ts"]),
        *ranged,
        *finite,
        E.ExpectColumnValuesToNotBeNull(column="spread_bps"),
        E.ExpectColumnValuesToNotBeNull(column="order_imbalance"),
        E.ExpectColumnValuesToNotBeNull(column="has_recent_halt"),
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
