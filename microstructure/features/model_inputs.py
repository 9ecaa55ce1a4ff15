"""The inputs of the entry model beyond the served features: recent return and volatility, and the depth transform.

The evaluation trains the model on these rows and the scorer computes the same rows at pick time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

# ---- 3. ML scoring ---------------------------------------------------------------------------
BASE_FEATURES = ["ret_60s_bps", "vol_5m_bps"]


def base_feature_rows(con: Any, table: str = "f") -> pd.DataFrame:
    """Base features from the mid series, point in time (only rows at or before each row's event_ts)."""
    return con.sql(f"""
        WITH f AS (SELECT * FROM {table}),
        r AS (SELECT symbol, event_ts, received_ts, mid,
                          ln(mid / lag(mid) OVER (PARTITION BY symbol ORDER BY event_ts)) * 1e4 AS r1
                   FROM f),
        w AS (SELECT *, stddev_samp(r1) OVER (PARTITION BY symbol ORDER BY event_ts
                        RANGE BETWEEN INTERVAL 300 SECOND PRECEDING AND CURRENT ROW) AS vol_5m_bps FROM r)
        SELECT w.symbol, w.event_ts, w.received_ts, w.mid, w.vol_5m_bps,
               ln(w.mid / p.mid) * 1e4 AS ret_60s_bps
        FROM w ASOF JOIN f p ON p.symbol = w.symbol AND p.event_ts <= w.event_ts - INTERVAL 60 SECOND
    """).df()


def _log_depth(x: pd.DataFrame) -> pd.DataFrame:
    """Depths (shares) span orders of magnitude across symbols: the model sees log(1 + depth)."""
    x = x.copy()
    for c in ("bid_depth", "ask_depth"):
        if c in x:
            x[c] = np.log1p(x[c].clip(lower=0))
    return x
