"""Entry timing: forward returns after a signal, and whether the filters' timing beats entering at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from microstructure.research.data import MIN_OBS, MIN_POINT, clusters_of
from microstructure.research.stats import Boot, ranks, wcorr, wmean


# ---- 2. entry timing -------------------------------------------------------------------------
def forward_returns(con: Any, horizons: list[int]) -> pd.DataFrame:
    # One ASOF join per horizon; the aliases are numbered by position and the horizons bound as parameters.
    cols = ", ".join(f"ln(f{i}.mid / f.mid) * 1e4 AS ret{i}" for i in range(len(horizons)))
    joins = " ".join(f"ASOF LEFT JOIN f f{i} ON f{i}.symbol = f.symbol AND f{i}.event_ts >= f.event_ts + "
                     f"to_seconds(${i + 1}::DOUBLE)" for i in range(len(horizons)))
    df = con.execute(f"SELECT f.symbol, f.event_ts, f.received_ts, f.mid, f.order_imbalance, f.depth_imbalance, "
                     f"f.halted, {cols} FROM f {joins} ORDER BY f.symbol, f.event_ts", list(horizons)).df()
    df = df.rename(columns={f"ret{i}": f"ret_{h}" for i, h in enumerate(horizons)})
    # Next mid *move*: the first later mid that differs from this one.
    moves = con.sql("WITH x AS (SELECT symbol, event_ts, mid, CASE WHEN mid <> lag(mid) OVER w THEN 1 END AS ch "
                    "FROM f WINDOW w AS (PARTITION BY symbol ORDER BY event_ts)), "
                    "c AS (SELECT symbol, event_ts, mid FROM x WHERE ch = 1) "
                    "SELECT f.symbol, f.event_ts, sign(c.mid - f.mid) AS next_move FROM f ASOF LEFT JOIN c "
                    "ON c.symbol = f.symbol AND c.event_ts > f.event_ts").df()
    return df.merge(moves, on=["symbol", "event_ts"], how="left")


def signal_study(fr: pd.DataFrame, horizons: list[int], rng: np.random.Generator) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fr = fr[~fr["halted"].fillna(False).astype(bool)]
    for sig in ("order_imbalance", "depth_imbalance"):
        res: dict[str, dict[str, float | bool | tuple[float, float]]] = {}  # target -> its statistics
        for target in ["next_move", *[f"ret_{h}" for h in horizons]]:
            d = fr[[sig, target, "symbol", "event_ts"]].dropna()
            s, y = np.sign(d[sig].to_numpy()), np.sign(d[target].to_numpy())
            m = (s != 0) & (y != 0)
            if m.sum() < MIN_POINT:
                res[target] = {"n": int(m.sum()), "enough": False}
                continue
            # Point estimates and intervals from MIN_POINT rows; a verdict only from MIN_OBS rows.
            hit = (s[m] == y[m]).astype(float)
            boot = Boot(clusters_of(d[m]), rng)
            ra, rb = ranks(d[sig].to_numpy()[m]), ranks(d[target].to_numpy()[m])
            res[target] = {"n": int(m.sum()), "enough": bool(m.sum() >= MIN_OBS), "hit_rate": float(hit.mean()),
                           "hit_ci": boot.ci(wmean(hit)),
                           "rank_corr": float(np.corrcoef(ra, rb)[0, 1]), "rank_corr_ci": boot.ci(wcorr(ra, rb)),
                           "by_row_bootstrap": boot.by_row}
        out[sig] = res
    return out


def timing_study(con: Any, feats: pd.DataFrame, k_s: int, threshold: float, n: int,
                 rng: np.random.Generator) -> dict[str, Any]:
    """Wait up to ``k_s`` for ``side * order_imbalance > threshold``, else enter at the deadline; vs now.
    Cost = (entry price - mid at signal) / mid at signal, signed against the trader, in bps; the entry price
    is the touch (ask for a buy, bid for a sell)."""
    if len(feats) == 0:
        return {"n": 0, "enough": False}
    idx = rng.choice(len(feats), size=min(n, len(feats)), replace=False)
    p = feats.iloc[idx][["symbol", "event_ts", "mid", "best_bid", "best_ask", "halted"]].reset_index(drop=True)
    p = p[~p["halted"].fillna(False).astype(bool)].copy()
    p["sgn"] = np.where(rng.random(len(p)) < 0.5, 1.0, -1.0)
    p["pick_id"] = np.arange(len(p))
    con.register("tp", p)
    # Ordered by pick: a GROUP BY's output order varies run to run, and the means and bootstrap below follow it.
    df = con.execute("""
        SELECT tp.pick_id, any_value(tp.sgn) AS sgn, any_value(tp.mid) AS mid0, any_value(tp.symbol) AS symbol,
               any_value(tp.event_ts) AS event_ts,
               any_value(CASE WHEN tp.sgn > 0 THEN tp.best_ask ELSE tp.best_bid END) AS now_px,
               arg_min(CASE WHEN tp.sgn > 0 THEN f.best_ask ELSE f.best_bid END, f.event_ts)
                   FILTER (WHERE tp.sgn * f.order_imbalance > $threshold) AS agree_px,
               arg_max(CASE WHEN tp.sgn > 0 THEN f.best_ask ELSE f.best_bid END, f.event_ts) AS deadline_px,
               max(f.event_ts) AS last_ts
        FROM tp JOIN f ON f.symbol = tp.symbol AND f.event_ts > tp.event_ts
             AND f.event_ts <= tp.event_ts + to_seconds($k_s::DOUBLE)
        GROUP BY tp.pick_id
        ORDER BY tp.pick_id""", {"threshold": float(threshold), "k_s": float(k_s)}).df()
    # Only picks whose K-second window is fully observed (the data goes on past the deadline).
    ends = feats.groupby("symbol")["event_ts"].max()
    df = df[df["event_ts"] + pd.Timedelta(seconds=k_s) <= df["symbol"].map(ends)]
    if len(df) < MIN_POINT:
        return {"n": len(df), "enough": False, "k_s": k_s, "threshold": threshold}
    rule_px = df["agree_px"].fillna(df["deadline_px"]).to_numpy(float)
    cost = lambda px: df["sgn"].to_numpy() * (px - df["mid0"].to_numpy()) / df["mid0"].to_numpy() * 1e4  # noqa: E731
    c_now, c_rule = cost(df["now_px"].to_numpy(float)), cost(rule_px)
    saving = c_now - c_rule  # positive = the rule entered cheaper
    boot = Boot(clusters_of(df), rng)
    return {"n": len(df), "enough": len(df) >= MIN_OBS, "k_s": k_s, "threshold": threshold,
            "agreed_within_k": float(df["agree_px"].notna().mean()),
            "cost_now_bps": float(c_now.mean()), "cost_rule_bps": float(c_rule.mean()),
            "saving_bps": float(saving.mean()), "saving_ci": boot.ci(wmean(saving)), "by_row_bootstrap": boot.by_row}
