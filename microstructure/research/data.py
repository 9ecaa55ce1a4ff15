"""The evaluation's inputs: the lake's features by symbol tier, and the clusters the bootstrap resamples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from microstructure.lake.paths import LakePaths
from microstructure.lake.views import connect

MIN_PICKS = 200
MIN_BAD = 20
MIN_OBS = 200
MIN_POINT = 30  # below this not even a point estimate is shown


# ---- data ------------------------------------------------------------------------------------
def tier_label(symbol: str, source: str) -> str:
    from microstructure.sources.simulated import tier_of

    return (tier_of(symbol) or symbol) if source == "simulated" else f"{source}:{symbol}"


def tier_rank(label: str) -> tuple[int, str]:
    """Liquidity order (mega-caps first, then large, mid, small, micro; real symbols after, by name)."""
    from microstructure.sources.simulated import TIERS

    names = [t.name for t in TIERS]
    return (names.index(label), "") if label in names else (len(names), label)


def load(paths: LakePaths, source: str | None, symbols: list[str] | None = None
         ) -> tuple[Any, pd.DataFrame, dict[str, Any]]:
    con = connect(paths)
    # The source and symbols are user input: bound as parameters (NULL means "any"), never SQL text.
    where = "WHERE ($source IS NULL OR source = $source) AND ($symbols IS NULL OR list_contains($symbols, symbol))"
    params = {"source": source, "symbols": list(symbols) if symbols else None}
    con.execute(f"CREATE TEMP TABLE f AS SELECT * FROM features {where}", params)
    con.execute(f"CREATE TEMP TABLE s AS SELECT * FROM snapshots {where}", params)
    feats = con.sql("SELECT * FROM f ORDER BY symbol, event_ts").df()
    label = con.sql("SELECT source, count(*) AS n, count(DISTINCT symbol) AS symbols, min(event_ts) AS first, "
                    "max(event_ts) AS last FROM s GROUP BY source ORDER BY source").df()
    info = {"sources": label.to_dict("records"), "snapshots": int(label["n"].sum()) if len(label) else 0,
            "features": len(feats), "symbols": int(feats["symbol"].nunique()) if len(feats) else 0}
    info["real"] = bool(len(label)) and not (label["source"] == "simulated").all()
    info["label"] = "; ".join(
        f"{'simulated' if r['source'] == 'simulated' else 'real'} {r['source']}: {r['symbols']} symbols, "
        f"{r['n']:,} snapshots, {r['first']:%Y-%m-%d %H:%M:%S}–{r['last']:%H:%M:%S} UTC"
        for r in info["sources"]) or "empty lake"
    return con, feats, info


def clusters_of(df: pd.DataFrame, ts: str = "event_ts") -> np.ndarray:
    block = (pd.to_datetime(df[ts]).astype("int64") // (300 * 10**9)).astype(str)
    return (df["symbol"].astype(str) + "|" + block).to_numpy()
