"""Measure the roadmap's claims on whatever is in the lake, with confidence intervals, and say what we find.

Studies (each on the lake's published features and snapshots, optionally one source only):

1. Bad fills: liquidity-blind random picks (symbol, time, side); each order is filled by ``fills.walk`` on
   the first snapshot at least ``latency_s`` after the decision; bad-fill rate of all picks vs picks that
   pass the SAFE / AGGRESSIVE filters, relative reduction, by tier and order size; risky vs not risky.
2. Entry timing: sign of ``order_imbalance`` / ``depth_imbalance`` vs the next mid move and the mid return
   over 10/30/60 s (hit rate, rank correlation); and a rule "wait up to K s for imbalance to agree with the
   side, else enter at K" against entering at once (cost vs the mid at signal time, in bps).
3. ML scoring: entity rows joined point-in-time through Feast (the training-set path), label = sign of the
   forward mid return at H; base features (recent return, volatility) vs base + the five features.

Confidence intervals are cluster bootstraps (clusters = symbol x 5-minute block, so serially correlated
snapshots do not pass for independent evidence); with fewer than 20 clusters rows are resampled instead,
and the report says so. Nothing here is tuned to make a claim pass.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from microstructure import lake
from microstructure.book import MAX_LEVELS
from microstructure.config import Thresholds, ThresholdSet, load_threshold_set
from microstructure.fills import BAD_FILL_BPS, walk
from microstructure.filters import apply_filters, risk_marking
from microstructure.transforms import ML_FEATURES

B = 1000  # bootstrap replicates
MIN_PICKS = 200
MIN_BAD = 20
MIN_OBS = 200
MIN_POINT = 30  # below this not even a point estimate is shown
MIN_ML_ROWS = 1000


# ---- bootstrap -------------------------------------------------------------------------------
@dataclass
class Boot:
    clusters: np.ndarray  # cluster id per row
    rng: np.random.Generator
    weights: np.ndarray = field(init=False)  # (B, rows): how often each row is drawn per replicate
    by_row: bool = field(init=False)

    def __post_init__(self) -> None:
        ids, inv = np.unique(self.clusters, return_inverse=True)
        self.by_row = len(ids) < 20
        if self.by_row:
            n = len(self.clusters)
            self.weights = self.rng.multinomial(n, np.full(n, 1 / n), size=B).astype(float) if n else np.zeros((B, 0))
        else:
            w = self.rng.multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=B).astype(float)
            self.weights = w[:, inv]

    def ci(self, stat: Callable[[np.ndarray], np.ndarray], alpha: float = 0.05) -> tuple[float, float]:
        """``stat(weights)`` maps a (B, rows) weight matrix to B values; returns the percentile interval."""
        with np.errstate(divide="ignore", invalid="ignore"):  # a replicate without a group gives inf/NaN
            vals = stat(self.weights)
        vals = vals[np.isfinite(vals)]
        if len(vals) < B // 2:
            return (float("nan"), float("nan"))
        return float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))


def wmean(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda w: (w @ x) / w.sum(axis=1)


def wcorr(a: np.ndarray, b: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def f(w: np.ndarray) -> np.ndarray:
        s = w.sum(axis=1)
        ma, mb = (w @ a) / s, (w @ b) / s
        cov = (w @ (a * b)) / s - ma * mb
        va, vb = (w @ (a * a)) / s - ma**2, (w @ (b * b)) / s - mb**2
        return cov / np.sqrt(va * vb)
    return f


def ranks(x: np.ndarray) -> np.ndarray:
    return pd.Series(x).rank().to_numpy()


# ---- data ------------------------------------------------------------------------------------
def tier_label(symbol: str, source: str) -> str:
    from microstructure.sources.simulated import tier_of

    return (tier_of(symbol) or symbol) if source == "simulated" else f"{source}:{symbol}"


def tier_rank(label: str) -> tuple[int, str]:
    """Liquidity order (mega-caps first, then large, mid, small, micro; real symbols after, by name)."""
    from microstructure.sources.simulated import TIERS

    names = [t.name for t in TIERS]
    return (names.index(label), "") if label in names else (len(names), label)


def load(paths: lake.LakePaths, source: str | None, symbols: list[str] | None = None
         ) -> tuple[Any, pd.DataFrame, dict[str, Any]]:
    con = lake.connect(paths)
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
        res = {}
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


WALK_FOLDS = 5  # walk-forward: the data cut in time into 6 blocks; fold k trains on blocks <= k, tests on k+1


def _log_depth(x: pd.DataFrame) -> pd.DataFrame:
    """Depths (shares) span orders of magnitude across symbols: the model sees log(1 + depth)."""
    x = x.copy()
    for c in ("bid_depth", "ask_depth"):
        if c in x:
            x[c] = np.log1p(x[c].clip(lower=0))
    return x


def _entropy(p: float) -> float:
    return float(-(p * np.log(p) + (1 - p) * np.log(1 - p))) if 0 < p < 1 else 0.0


def fit_entry_model(train: pd.DataFrame, cols: list[str]) -> Any:
    """The entry model fitted on ``train[cols]`` against ``train["label"]``: depths as log(1 + depth), then a
    standardised logistic regression. ``scoring.export_model`` saves exactly these three steps as numbers."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    return make_pipeline(FunctionTransformer(_log_depth), StandardScaler(),
                         LogisticRegression(C=0.05, max_iter=1000)).fit(train[cols], train["label"])


def ml_study(con: Any, data_dir: Any, horizon_s: int, n_rows: int, rng: np.random.Generator) -> dict[str, Any]:
    """Does adding the five features to a base model improve out-of-sample scoring?

    Label: sign of the H-second forward mid return; rows whose mid did not move (flat) are dropped, so the
    model answers "up or down, given it moved". Model: standardised logistic regression (its log-loss fit
    gives calibrated probabilities; deterministic: lbfgs, no randomness). Evaluation: walk-forward, the
    out-of-sample predictions of every fold pooled; log-loss is compared with the base-rate entropy (the
    score of always predicting the training up-rate). Rows are chosen and sorted deterministically (the
    Feast join is deterministic: ties on the timestamp are settled by ``event_ts``).
    """
    from sklearn.metrics import log_loss, roc_auc_score

    from microstructure.store import open_store, training_set

    base = base_feature_rows(con)
    fwd = con.execute("SELECT f.symbol, f.event_ts, ln(g.mid / f.mid) AS fwd FROM f ASOF JOIN f g "
                      "ON g.symbol = f.symbol AND g.event_ts >= f.event_ts + to_seconds(?::DOUBLE)",
                      [float(horizon_s)]).df()
    d = base.merge(fwd, on=["symbol", "event_ts"]).dropna(subset=[*BASE_FEATURES, "fwd"])
    flat = int((d["fwd"] == 0).sum())
    d = d[d["fwd"] != 0].sort_values(["event_ts", "symbol"], kind="stable").reset_index(drop=True)
    if len(d) < MIN_ML_ROWS:
        return {"n": len(d), "enough": False, "horizon_s": horizon_s, "flat_dropped": flat}
    d = d.iloc[np.sort(rng.choice(len(d), size=min(n_rows, len(d)), replace=False))].copy()
    d["label"] = (d["fwd"] > 0).astype(int)
    # The five microstructure features come through Feast's point-in-time join, as in training.
    ents = pd.DataFrame({"symbol": d["symbol"].to_numpy(),
                         "event_timestamp": pd.to_datetime(d["received_ts"], utc=True),
                         **{c: d[c].to_numpy() for c in [*BASE_FEATURES, "label"]}})
    joined = training_set(open_store(data_dir), ents).dropna(subset=ML_FEATURES)
    joined = joined.sort_values(["event_timestamp", "symbol"], kind="stable").reset_index(drop=True)
    n = len(joined)
    edges = np.linspace(0, n, WALK_FOLDS + 2).astype(int)
    preds: dict[str, list[np.ndarray]] = {"base": [], "base+micro": []}
    ys, prior, folds, tests = [], [], [], []
    models: dict[str, Any] = {}
    for k in range(1, WALK_FOLDS + 1):
        train, test = joined.iloc[: edges[k]], joined.iloc[edges[k]: edges[k + 1]]
        if train["label"].nunique() < 2 or len(test) == 0:
            continue
        folds.append({"train": len(train), "test": len(test), "from": str(test["event_timestamp"].iloc[0])})
        ys.append(test["label"].to_numpy())
        tests.append(test)
        prior.append(np.full(len(test), train["label"].mean()))
        for name, cols in (("base", BASE_FEATURES), ("base+micro", [*BASE_FEATURES, *ML_FEATURES])):
            m = fit_entry_model(train, cols)
            preds[name].append(m.predict_proba(test[cols])[:, 1])
            models[name] = (m, cols)
    if not ys:
        return {"n": n, "enough": False, "horizon_s": horizon_s, "flat_dropped": flat}
    y = np.concatenate(ys)
    p_prior = np.concatenate(prior)
    probs = {k: np.concatenate(v) for k, v in preds.items()}
    if len(y) < 200 or len(np.unique(y)) < 2:
        return {"n": n, "enough": False, "horizon_s": horizon_s, "flat_dropped": flat}
    res: dict[str, Any] = {"n": n, "n_test": len(y), "enough": True, "horizon_s": horizon_s, "flat_dropped": flat,
                           "label": "up vs down at H; flat (no mid move) rows dropped",
                           "split": f"walk-forward, {len(folds)} folds (expanding window)", "folds": folds,
                           "model": "StandardScaler + LogisticRegression (lbfgs)", "test_up_rate": float(y.mean()),
                           "base_rate_log_loss": float(log_loss(y, np.clip(p_prior, 1e-6, 1 - 1e-6))),
                           "base_rate_entropy": _entropy(float(y.mean()))}
    for name, pr in probs.items():
        res[name] = {"auc": float(roc_auc_score(y, pr)), "log_loss": float(log_loss(y, pr))}
        bins = np.clip((pr * 10).astype(int), 0, 9)
        res[name]["reliability"] = [{"bin": f"{b / 10:.1f}-{(b + 1) / 10:.1f}", "n": int((bins == b).sum()),
                                     "predicted": float(pr[bins == b].mean()), "observed": float(y[bins == b].mean())}
                                    for b in range(10) if (bins == b).any()]
    m, cols = models["base+micro"]
    res["_model"] = {"model": m, "features": cols, "horizon_s": horizon_s,
                     "trained": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    # The gain's interval: a cluster bootstrap over the pooled out-of-sample rows (symbol x 5-minute blocks).
    boot = Boot(clusters_of(pd.concat(tests), ts="event_timestamp"), np.random.default_rng(12345))
    aucs = []
    for w in boot.weights[:200]:
        i = np.repeat(np.arange(len(y)), w.astype(int))
        if len(np.unique(y[i])) == 2:
            aucs.append(roc_auc_score(y[i], probs["base+micro"][i]) - roc_auc_score(y[i], probs["base"][i]))
    res["auc_gain"] = res["base+micro"]["auc"] - res["base"]["auc"]
    res["auc_gain_ci"] = (float(np.quantile(aucs, 0.025)), float(np.quantile(aucs, 0.975)))
    res["log_loss_gain"] = res["base"]["log_loss"] - res["base+micro"]["log_loss"]
    return res


# ---- headline ---------------------------------------------------------------------------------
def verdict(ci: tuple[float, float] | None, target: float, enough: bool = True) -> str:
    if not enough or ci is None or not all(np.isfinite(ci)):
        return "insufficient data"
    if ci[0] >= target:
        return "met"
    if ci[1] < target:
        return "not met"
    return "inconclusive"


def headline(r: dict[str, Any], order_notional: float, coverage: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    size = r["bad_fills"].get("sizes", {}).get(str(int(order_notional)), {})
    for m in ("SAFE", "AGGRESSIVE"):
        e = size.get(m, {})
        rows.append({"claim": f"{m} filters cut bad fills (${order_notional:,.0f} orders)", "target": ">= 30% fewer",
                     "measured": e.get("reduction"), "ci": e.get("ci"),
                     "verdict": verdict(e.get("ci"), 0.30, e.get("enough", False)), "unit": "fraction"})
    rk = size.get("risky", {})
    rows.append({"claim": "'microstructure risky' picks fill worse", "target": "bad-fill ratio > 1",
                 "measured": rk.get("ratio"), "ci": rk.get("ci"), "verdict": verdict(rk.get("ci"), 1.0 + 1e-12,
                                                                                      rk.get("ci") is not None),
                 "unit": "ratio"})
    for h in ("next_move", "ret_10"):
        e = r["signals"].get("order_imbalance", {}).get(h, {})
        rows.append({"claim": f"order imbalance sign predicts {h.replace('ret_10', '10 s return').replace('_', ' ')}",
                     "target": "hit rate > 50%", "measured": e.get("hit_rate"), "ci": e.get("hit_ci"),
                     "verdict": verdict(e.get("hit_ci"), 0.5 + 1e-12, e.get("enough", False)), "unit": "fraction"})
    t = r["timing"]
    rows.append({"claim": f"imbalance timing (wait <= {t.get('k_s')} s) improves entry", "target": "saving > 0 bps",
                 "measured": t.get("saving_bps"), "ci": t.get("saving_ci"),
                 "verdict": verdict(t.get("saving_ci"), 1e-12, t.get("enough", False)), "unit": "bps"})
    for e in r["bad_fills"].get("by_delay", []):
        if e["delay_s"] != 60:
            continue
        s_ = e.get("SAFE", {})
        rows.append({"claim": "SAFE filters cut bad fills, order arriving 60 s after the decision (shortfall)",
                     "target": ">= 30% fewer", "measured": s_.get("reduction"), "ci": s_.get("ci"),
                     "verdict": verdict(s_.get("ci"), 0.30, s_.get("enough", False)), "unit": "fraction"})
    ml = r["ml"]
    rows.append({"claim": f"five features improve ML scoring (H = {ml.get('horizon_s')} s)", "target": "AUC gain > 0",
                 "measured": ml.get("auc_gain"), "ci": ml.get("auc_gain_ci"),
                 "verdict": verdict(ml.get("auc_gain_ci"), 1e-12, ml.get("enough", False)), "unit": "AUC"})
    l2 = coverage["overall"]["l2"]
    rows.append({"claim": "50-150 symbols with L2 data", "target": "50-150 symbols", "measured": l2, "ci": None,
                 "verdict": "met" if 50 <= l2 <= 150 else "not met", "unit": "symbols"})
    return rows


def evaluate(paths: lake.LakePaths, horizon_s: int = 60, order_notional: float = 50_000.0, seed: int = 0,
             source: str | None = None, n_picks: int = 5000, latency_s: float = 1.0, timing_k_s: int = 30,
             ml_rows: int = 100_000, thresholds: Thresholds | ThresholdSet | None = None,
             progress: Callable[[str], None] = lambda s: None, symbols: list[str] | None = None) -> dict[str, Any]:
    from microstructure.coverage import coverage

    t = thresholds or load_threshold_set(paths.data_dir / "microstructure.toml")
    rng = np.random.default_rng(seed)
    con, feats, info = load(paths, source, symbols)
    res: dict[str, Any] = {"data": info, "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                           "params": {"horizon_s": horizon_s, "order_notional": order_notional, "seed": seed,
                                      "source": source, "symbols": symbols, "latency_s": latency_s,
                                      "bootstrap": B}}
    progress("bad fills")
    sizes = sorted({10_000.0, float(order_notional), 250_000.0})
    res["bad_fills"] = bad_fill_study(con, feats, t, sizes, n_picks, seed, latency_s, rng,
                                      delay_size=float(order_notional))
    progress("entry timing")
    horizons = [10, 30, 60]
    fr = forward_returns(con, horizons)
    res["signals"] = signal_study(fr, horizons, rng)
    res["timing"] = timing_study(con, feats, timing_k_s, 0.2, n_picks, rng)
    progress("ML scoring")
    res["ml"] = ml_study(con, paths.data_dir, horizon_s, ml_rows, rng) if len(feats) else {"enough": False, "n": 0}
    model = res["ml"].pop("_model", None)
    if model is not None:
        from microstructure.scoring import export_model

        # Saved as numbers (models/entry_model.json), never as a pickle: see microstructure.scoring.
        res["_model"] = export_model(model["model"], model["features"], model["horizon_s"], info["label"],
                                     res["ml"]["base+micro"]["auc"], model["trained"])
    res["coverage"] = coverage(paths)
    res["headline"] = headline(res, order_notional, res["coverage"])
    res["_frames"] = {"fr": fr, "feats": feats}
    return res
