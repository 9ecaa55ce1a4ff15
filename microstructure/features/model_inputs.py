"""The inputs of the entry model beyond the served features: recent return and volatility, and the depth transform.

The evaluation trains the model on these rows and the scorer computes the same rows at pick time, both with
``transforms/base_features.sql``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

BASE_FEATURES = ["ret_60s_bps", "vol_5m_bps"]  # the columns of base_features.sql the model takes
LOG1P_FEATURES = ("bid_depth", "ask_depth")  # the model sees these as log(1 + x): see _log_depth


def base_feature_rows(con: Any, table: str = "f") -> pd.DataFrame:
    """``base_features.sql`` over the relation ``table`` of connection ``con`` (feature rows), as a frame."""
    from microstructure.contract.schemas import sql

    # The relation is handed over by name (con.table), never spliced into the SQL's text.
    return con.table(table).query("features", sql("base_features")).df()


def _log_depth(x: pd.DataFrame) -> pd.DataFrame:
    """Depths (shares) span orders of magnitude across symbols: the model sees log(1 + depth)."""
    import numpy as np

    x = x.copy()
    for c in LOG1P_FEATURES:
        if c in x:
            x[c] = np.log1p(x[c].clip(lower=0))
    return x
