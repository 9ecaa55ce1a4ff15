"""Bad fills: what a marketable order would have paid after a delay, and how often the filters avoid it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from microstructure.contract.book import MAX_LEVELS
from microstructure.research.data import MIN_BAD, MIN_PICKS, MIN_POINT, clusters_of, tier_label, tier_rank
from microstructure.research.fills import BAD_FILL_BPS, walk
from microstructure.research.stats import Boot
from microstructure.trading.filters import apply_filters, risk_marking
from microstructure.trading.thresholds import Thresholds, ThresholdSet

# ---- 1. bad fills ----------------------------------------------------------------------------
DELAYS_S = (1, 5, 30, 60)  # decision at T, the marketable order reaches the book at T + delay


def _book_side(p: pd.DataFrame, buy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prices, sizes) of the side each order takes (asks for a buy), (n, levels), best first."""
    take = lambda k: np.where(buy[:, None], p[[f"ask_{k}_{i}" for i in range(1, 11)]].to_numpy(float),  # noqa: E731
                              p[[f"bid_{k}_{i}" for i in range(1, 11)]].to_numpy(float))
    return take("px"), np.nan_to_num(take("sz"))


def delay_study(con: Any, p: pd.DataFrame, passes: dict[str, np.ndarray], size: float, lv: str,
                rng: np.random.Generator) -> list[dict[str, Any]]:
    """Implementation shortfall: the pick is decided on its book at T (the filters read that book); the order
    is filled on the first book received at or after T + delay; bad = slippage against the mid *at decision
    time* above the threshold, or unfillable. Not mechanical: the filter and the fill see different books."""
    out = []
    mid0 = p["mid"].to_numpy(float)
    buy = (p["side"] == "buy").to_numpy()
    sign = np.where(buy, 1.0, -1.0)
    for delay in DELAYS_S:
        q = p[["pick_id", "symbol", "received_ts"]].copy()
        q["arrive_at"] = pd.to_datetime(q["received_ts"]) + pd.Timedelta(seconds=delay)
        con.register("delay_df", q[["pick_id", "symbol", "arrive_at"]])
        fills = con.sql(f"SELECT d.pick_id, {lv} FROM delay_df d ASOF JOIN s ON d.symbol = s.symbol "
                        "AND s.received_ts >= d.arrive_at").df()
        m = p[["pick_id"]].merge(fills, on="pick_id", how="left")
        have = m["bid_px_1"].notna().to_numpy() | m["ask_px_1"].notna().to_numpy()
        if have.sum() < MIN_POINT:
            out.append({"delay_s": delay, "n": int(have.sum()), "enough": False})
            continue
        px, sz = _book_side(m, buy)
        r = walk(px, sz, mid0, size, by_notional=True, sign=sign)
        bad = r["bad"].astype(float)[have]
        sub = p[have].reset_index(drop=True)
        boot = Boot(clusters_of(sub), rng)
        row: dict[str, Any] = {"delay_s": delay, "n": int(have.sum()), "bad_rate_all": float(bad.mean()),
                               "median_shortfall_bps": float(np.nanmedian(r["slippage_bps"][have]))}
        for mode, keep_all in passes.items():
            keep = keep_all[have]
            k = keep.astype(float)
            red = lambda w, k=k, bad=bad: 1 - ((w @ (bad * k)) / (w @ k)) / ((w @ bad) / w.sum(axis=1))  # noqa: E731
            enough = bad.sum() >= MIN_BAD and keep.sum() >= MIN_PICKS // 4 and len(sub) >= MIN_PICKS
            row[mode] = {"kept": int(keep.sum()),
                         "bad_rate_kept": float(bad[keep].mean()) if keep.any() else None,
                         "reduction": float(1 - bad[keep].mean() / bad.mean()) if keep.any() and bad.any()
                         else float("nan"), "ci": boot.ci(red) if enough else None, "enough": bool(enough)}
        out.append(row)
    return out


def bad_fill_study(con: Any, feats: pd.DataFrame, t: Thresholds | ThresholdSet, sizes: list[float], n_picks: int,
                   seed: int, latency_s: float, rng: np.random.Generator,
                   delay_size: float | None = None) -> dict[str, Any]:
    if len(feats) == 0:
        return {"n": 0}
    idx = np.sort(rng.choice(len(feats), size=min(n_picks, len(feats)), replace=False))
    p = feats.iloc[idx].reset_index(drop=True).copy()
    p["side"] = np.where(rng.random(len(p)) < 0.5, "buy", "sell")
    p["pick_id"] = np.arange(len(p))
    p["decide_at"] = pd.to_datetime(p["received_ts"]) + pd.Timedelta(seconds=latency_s)
    con.register("picks_df", p[["pick_id", "symbol", "decide_at"]])
    lv = ", ".join(f"s.{sd}_{k}_{i}" for sd in ("bid", "ask") for k in ("px", "sz") for i in range(1, MAX_LEVELS + 1))
    # The order is filled on the first snapshot received at or after decision time + latency.
    fills = con.sql(f"SELECT p.pick_id, {lv} FROM picks_df p ASOF JOIN s ON p.symbol = s.symbol "
                    "AND s.received_ts >= p.decide_at").df()
    p = p.merge(fills, on="pick_id", how="inner")
    if len(p) == 0:
        return {"n": 0}
    buy = (p["side"] == "buy").to_numpy()
    px, sz = _book_side(p, buy)
    mid = (p["bid_px_1"].to_numpy(float) + p["ask_px_1"].to_numpy(float)) / 2
    sign = np.where(buy, 1.0, -1.0)
    rows = p.to_dict("records")
    passes = {m: np.array([apply_filters(r, m, t).kept for r in rows]) for m in ("SAFE", "AGGRESSIVE")}
    risky = np.array([risk_marking(r, r["side"], t, stale=False).risky for r in rows])
    p["tier"] = [tier_label(s, src) for s, src in zip(p["symbol"], p["source"], strict=True)]
    boot = Boot(clusters_of(p), rng)
    profiles = (p["symbol"].map(t.profile_of) if isinstance(t, ThresholdSet) else pd.Series(["default"] * len(p)))
    out: dict[str, Any] = {"n": len(p), "latency_s": latency_s, "bad_bps": BAD_FILL_BPS,
                           "by_row_bootstrap": boot.by_row, "profiles": profiles.value_counts().to_dict(),
                           "pass_rate": {m: float(v.mean()) for m, v in passes.items()}, "sizes": {}}
    if delay_size is not None:
        out["by_delay"] = delay_study(con, p, passes, delay_size, lv, rng)
        out["delay_size"] = delay_size
    for size in sizes:
        r = walk(px, sz, mid, size, by_notional=True, sign=sign)
        bad = r["bad"].astype(float)
        entry: dict[str, Any] = {"bad_rate_all": float(bad.mean()), "bad_all": int(bad.sum()),
                                 "median_slippage_bps": float(np.nanmedian(r["slippage_bps"]))}
        for m, keep in passes.items():
            k = keep.astype(float)
            red = lambda w, k=k, bad=bad: 1 - ((w @ (bad * k)) / (w @ k)) / ((w @ bad) / w.sum(axis=1))  # noqa: E731
            point = 1 - (bad[keep].mean() / bad.mean()) if keep.any() and bad.any() else float("nan")
            enough = bad.sum() >= MIN_BAD and keep.sum() >= MIN_PICKS // 4 and len(p) >= MIN_PICKS
            entry[m] = {"kept": int(keep.sum()), "bad_rate_kept": float(bad[keep].mean()) if keep.any() else None,
                        "reduction": float(point), "ci": boot.ci(red) if enough else None, "enough": bool(enough)}
        rk = risky.astype(float)
        ratio = lambda w, rk=rk, bad=bad: (  # noqa: E731
            ((w @ (bad * rk)) / (w @ rk)) / ((w @ (bad * (1 - rk))) / (w @ (1 - rk))))
        calm = ~risky
        entry["risky"] = {"n": int(risky.sum()), "bad_rate_risky": float(bad[risky].mean()) if risky.any() else None,
                          "bad_rate_not_risky": float(bad[calm].mean()) if calm.any() else None,
                          "ratio": float(bad[risky].mean() / bad[calm].mean())
                          if risky.any() and calm.any() and bad[calm].any() else float("nan"),
                          "ci": boot.ci(ratio) if risky.sum() >= 30 and calm.sum() >= 30 and bad.sum() >= MIN_BAD
                          else None}
        by_tier = []
        for tier, g in sorted(p.groupby("tier", sort=False), key=lambda kv: tier_rank(kv[0])):
            ix = g.index.to_numpy()
            by_tier.append({"tier": tier, "n": len(ix), "bad_rate_all": float(bad[ix].mean()),
                            **{f"bad_rate_{m.lower()}": float(bad[ix][passes[m][ix]].mean())
                               if passes[m][ix].any() else None for m in passes}})
        entry["by_tier"] = by_tier
        out["sizes"][str(int(size))] = entry
    return out
