"""Render an ``evaluate`` result: report.md, PNG plots and the headline table."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from microstructure.contract.text import visible
from microstructure.research.ml import MIN_ML_ROWS
from microstructure.trading.thresholds import Thresholds


def _fmt(v: Any, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if unit == "fraction":
        return f"{v:.1%}"
    if unit in ("bps",):
        return f"{v:+.2f} bps"
    if unit == "AUC":
        return f"{v:+.4f}"
    if unit == "ratio":
        return f"{v:.2f}×"
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def _ci(ci: Any, unit: str) -> str:
    if not ci:
        return "–"
    return f"[{_fmt(ci[0], unit)}, {_fmt(ci[1], unit)}]"


# Data (source names, symbols, profile names) is printed as data. Markdown: backslash-escape what Markdown or
# inline HTML would act on (``|`` ends a table cell, ``[x](...)`` is a link, ``<img onerror=...>`` is HTML); matplotlib:
# an unescaped ``$`` starts math text, and a malformed one fails the whole figure. Control characters are shown
# escaped in both.
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|~&$])")  # $: GitHub renders $...$ as math


def _md(v: Any) -> str:
    return _MD_SPECIAL.sub(r"\\\1", visible(str(v)))


def _code(v: Any) -> str:
    """``v`` as a Markdown code span: fenced by one more backtick than its longest run (CommonMark)."""
    text = visible(str(v))
    fence = "`" * (max((len(r) for r in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _mpl(v: Any) -> str:
    return visible(str(v)).replace("$", r"\$")


def headline_rows(res: dict[str, Any]) -> list[list[str]]:
    return [[h["claim"], h["target"], _fmt(h["measured"], h["unit"]), _ci(h["ci"], h["unit"]), h["verdict"]]
            for h in res["headline"]]


def plots(res: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    made = []
    fr: pd.DataFrame = res["_frames"]["fr"]
    feats: pd.DataFrame = res["_frames"]["feats"]
    d = res["data"]
    # Every figure names its data: simulated or real, and which.
    data_name = _mpl(f"{'real' if d['real'] else 'SIMULATED'} data: {d['label']}")

    def stamp(fig: Any) -> None:
        fig.text(0.995, 0.005, data_name, ha="right", va="bottom", fontsize=7, color="dimgrey")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, sig in zip(axes, ("order_imbalance", "depth_imbalance"), strict=True):
        for h in (10, 30, 60):
            d = fr[[sig, f"ret_{h}"]].dropna()
            if len(d) < 20:
                continue
            bins = pd.cut(d[sig], np.linspace(-1, 1, 11), include_lowest=True)
            g = d.groupby(bins, observed=True)[f"ret_{h}"]
            m, se, n = g.mean(), g.sem(), g.size()
            ax.errorbar([b.mid for b in m.index], m.to_numpy(), yerr=1.96 * se.fillna(0).to_numpy(), marker="o",
                        capsize=2, label=f"{h} s (n={int(n.sum()):,})")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel(f"{sig} (bins of 0.2)")
        ax.set_ylabel("mean forward mid return (bps), ±95% (rows)")
        ax.legend(fontsize=8)
    fig.suptitle("Imbalance against forward return")
    stamp(fig)
    fig.tight_layout()
    fig.savefig(out / "imbalance_vs_return.png", dpi=110)
    plt.close(fig)
    made.append("imbalance_vs_return.png")

    size = res["params"]["order_notional"]
    tiers = res["bad_fills"].get("sizes", {}).get(str(int(size)), {}).get("by_tier", [])
    fig, ax = plt.subplots(figsize=(11, 4))
    if tiers:
        x = np.arange(len(tiers))
        for i, (k, lab) in enumerate((("bad_rate_all", "all picks"), ("bad_rate_aggressive", "AGGRESSIVE kept"),
                                      ("bad_rate_safe", "SAFE kept"))):
            xs = x + (i - 1) * 0.27
            vals = [t[k] for t in tiers]
            bars = ax.bar(xs, [v if v is not None else 0 for v in vals], 0.27, label=lab)
            for xi, v, b in zip(xs, vals, bars, strict=True):
                if v is None:  # no pick kept: not a 0% rate, say so
                    b.set_alpha(0)
                    ax.text(xi, 0.01, "no\ndata", ha="center", va="bottom", fontsize=6, color="dimgrey")
                elif v == 0:
                    ax.text(xi, 0.005, "0%", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(x, [f"{_mpl(t['tier'])}\n(n={t['n']})" for t in tiers], fontsize=8)
        ax.legend()
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_ylabel("bad-fill rate (tiers in liquidity order)")
    ax.set_title(f"Bad fills (${size:,.0f} marketable orders, slippage > 20 bps or unfillable) by tier")
    stamp(fig)
    fig.tight_layout()
    fig.savefig(out / "bad_fills_by_tier.png", dpi=110)
    plt.close(fig)
    made.append("bad_fills_by_tier.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if len(feats):
        sp = feats["spread_bps"].clip(lower=1e-2)
        axes[0].hist(sp, bins=np.logspace(np.log10(sp.min()), np.log10(sp.max()) + 1e-9, 60))
        axes[0].set_xscale("log")
        axes[0].set_xlabel("spread (bps, log scale)")
        axes[0].set_ylabel(f"feature rows (of {len(sp):,})")
        t = Thresholds()  # the default (equity) limits the lines mark
        axes[0].axvline(t.safe_max_spread_bps, color="g", ls="--", label=f"SAFE {t.safe_max_spread_bps:g} bps")
        axes[0].axvline(t.aggressive_max_spread_bps, color="r", ls="--",
                        label=f"AGGRESSIVE {t.aggressive_max_spread_bps:g} bps")
        axes[0].legend(fontsize=8)
        dd = feats["depth_dollars"].clip(lower=1)
        axes[1].hist(dd, bins=np.logspace(np.log10(dd.min()), np.log10(dd.max()) + 1e-9, 60))
        axes[1].set_xscale("log")
        axes[1].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"${v / 1e6:g}M" if v >= 1e6 else f"${v / 1e3:g}k" if v >= 1e3 else f"${v:g}"))
        axes[1].set_xlabel("top-5 depth, both sides (USD, log scale)")
        axes[1].set_ylabel(f"feature rows (of {len(dd):,})")
        axes[1].axvline(t.safe_min_depth_usd, color="g", ls="--", label=f"SAFE ${t.safe_min_depth_usd / 1e3:g}k")
        axes[1].axvline(t.aggressive_min_depth_usd, color="r", ls="--",
                        label=f"AGGRESSIVE ${t.aggressive_min_depth_usd / 1e3:g}k")
        axes[1].legend(fontsize=8)
    fig.suptitle("Spread and depth distributions (all feature rows)")
    stamp(fig)
    fig.tight_layout()
    fig.savefig(out / "spread_depth.png", dpi=110)
    plt.close(fig)
    made.append("spread_depth.png")

    cov = res["coverage"]["sources"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    if cov:
        x = np.arange(len(cov))
        bottom = np.zeros(len(cov))
        for k in ("l2", "shallow", "l1_only"):
            v = np.array([c[k] for c in cov], dtype=float)
            ax.bar(x, v, bottom=bottom, label=k)
            bottom += v
        ax.set_xticks(x, [_mpl(c["source"]) for c in cov])
        ax.legend()
    ax.set_ylabel("symbols")
    ax.set_title(f"Coverage by source and depth (none: {res['coverage']['overall']['none']} symbols)")
    stamp(fig)
    fig.tight_layout()
    fig.savefig(out / "coverage.png", dpi=110)
    plt.close(fig)
    made.append("coverage.png")

    ml = res.get("ml", {})
    if ml.get("enough"):
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, label="perfect calibration")
        for name in ("base", "base+micro"):
            rel = ml[name]["reliability"]
            ax.plot([r["predicted"] for r in rel], [r["observed"] for r in rel], marker="o",
                    label=f"{name} (log-loss {ml[name]['log_loss']:.3f})")
        ax.axhline(ml["test_up_rate"], color="grey", ls=":", lw=0.8,
                   label=f"base rate {ml['test_up_rate']:.2f} (entropy {ml['base_rate_entropy']:.3f})")
        ax.set_xlabel("predicted P(up), bins of 0.1")
        ax.set_ylabel("observed up-rate")
        ax.set_title(f"Reliability, walk-forward out-of-sample (n={ml['n_test']:,})")
        ax.legend(fontsize=7)
        stamp(fig)
        fig.tight_layout()
        fig.savefig(out / "reliability.png", dpi=110)
        plt.close(fig)
        made.append("reliability.png")
    return made


def write_report(res: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    images = plots(res, out)
    d = res["data"]
    lines = ["# microstructure: do the roadmap's claims hold?", "",
             f"**Data:** {_md(d['label'])} ({'real order-book data' if d['real'] else 'simulated order books'}; "
             f"{d['features']:,} feature rows). Generated {res['generated']}; parameters "
             f"{_code(json.dumps(res['params']))}.", "",
             "## Headline", "", "| claim | target | measured | 95% CI | verdict |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(_md(c) for c in r) + " |" for r in headline_rows(res)]
    if d["real"] and d["symbols"] < 20:
        lines += ["", "With fewer than 20 symbol × 5-minute clusters the intervals resample rows, which treats "
                  "serially correlated snapshots as independent: read them as too narrow."]
    lines += ["", "Verdicts: *met* = the whole interval clears the target; *not met* = it lies below; "
              "*inconclusive* = it straddles; *insufficient data* = too few observations for an interval. "
              "Intervals are cluster bootstraps (symbol × 5-minute blocks, 1,000 replicates; rows when fewer than "
              "20 clusters; the ML interval resamples test rows).", ""]
    bf = res["bad_fills"]
    lines += ["## Bad fills", ""]
    if bf.get("n"):
        lines += [f"{bf['n']:,} liquidity-blind random picks (random symbol, time and side); each marketable order "
                  f"walks the book of the first snapshot {bf['latency_s']:g} s after the decision. Bad = slippage "
                  f"vs mid > {bf['bad_bps']:g} bps or not fillable from the visible book. Filter pass rates: "
                  + ", ".join(f"{m} {v:.0%}" for m, v in bf["pass_rate"].items()) + ".", "",
                  "| order | bad (all) | SAFE kept: bad | SAFE reduction [CI] | AGGRESSIVE kept: bad | "
                  "AGGRESSIVE reduction [CI] | risky vs not: bad |", "|---|---|---|---|---|---|---|"]
        for size, e in bf["sizes"].items():
            rk = e["risky"]
            lines.append(
                f"| ${int(size):,} | {_fmt(e['bad_rate_all'], 'fraction')} | "
                f"{_fmt(e['SAFE']['bad_rate_kept'], 'fraction')} | {_fmt(e['SAFE']['reduction'], 'fraction')} "
                f"{_ci(e['SAFE']['ci'], 'fraction')} | {_fmt(e['AGGRESSIVE']['bad_rate_kept'], 'fraction')} | "
                f"{_fmt(e['AGGRESSIVE']['reduction'], 'fraction')} {_ci(e['AGGRESSIVE']['ci'], 'fraction')} | "
                f"{_fmt(rk['bad_rate_risky'], 'fraction')} vs {_fmt(rk['bad_rate_not_risky'], 'fraction')} |")
        lines += ["", "Caveat: the filters read the same book the order then walks (one snapshot later), so on any "
                  "data where books persist for seconds the reduction is largely mechanical: it shows the filters "
                  "do what they say, not that they pick better trades.", ""]
        if bf.get("by_delay"):
            lines += [f"**Not mechanical: implementation shortfall by delay** (${bf['delay_size']:,.0f} orders). The "
                      "pick is decided on its book at T (the filters read that book); the order reaches the market "
                      "at T + Δ and walks the book it finds there; bad = slippage against the mid *at decision* "
                      f"above {bf['bad_bps']:g} bps, or unfillable.", "",
                      "| Δ | picks | bad (all) | median shortfall | SAFE kept: bad | SAFE reduction [CI] | "
                      "AGGRESSIVE kept: bad | AGGRESSIVE reduction [CI] |", "|---|---|---|---|---|---|---|---|"]
            for e in bf["by_delay"]:
                if "SAFE" not in e:
                    lines.append(f"| {e['delay_s']} s | {e['n']:,} | insufficient data | | | | | |")
                    continue
                lines.append(
                    f"| {e['delay_s']} s | {e['n']:,} | {_fmt(e['bad_rate_all'], 'fraction')} | "
                    f"{e['median_shortfall_bps']:.2f} bps | {_fmt(e['SAFE']['bad_rate_kept'], 'fraction')} | "
                    f"{_fmt(e['SAFE']['reduction'], 'fraction')} {_ci(e['SAFE']['ci'], 'fraction')} | "
                    f"{_fmt(e['AGGRESSIVE']['bad_rate_kept'], 'fraction')} | "
                    f"{_fmt(e['AGGRESSIVE']['reduction'], 'fraction')} {_ci(e['AGGRESSIVE']['ci'], 'fraction')} |")
            lines.append("")
        if bf.get("profiles"):
            lines += ["Thresholds by asset class: "
                      + ", ".join(f"{_md(k)} {v:,} picks" for k, v in bf["profiles"].items())
                      + " (the crypto profile: docs/evaluation.md, \"Thresholds per asset class\").", ""]
        lines += ["![bad fills](bad_fills_by_tier.png)", ""]
    else:
        lines += ["insufficient data: no feature rows.", ""]
    lines += ["## Entry timing", "", "| signal | target | n | hit rate [CI] | rank corr [CI] |",
              "|---|---|---|---|---|"]
    for sig, targets in res["signals"].items():
        for tgt, e in targets.items():
            if "hit_rate" in e:
                few = "" if e["enough"] else " (too few for a verdict)"
                lines.append(f"| {sig} | {tgt} | {e['n']:,} | {_fmt(e['hit_rate'], 'fraction')} "
                             f"{_ci(e['hit_ci'], 'fraction')}{few} | {e['rank_corr']:+.3f} "
                             f"[{e['rank_corr_ci'][0]:+.3f}, {e['rank_corr_ci'][1]:+.3f}] |")
            else:
                lines.append(f"| {sig} | {tgt} | {e['n']:,} | insufficient data | – |")
    t = res["timing"]
    if "saving_bps" in t:
        lines += ["", f"Timing rule: wait up to {t['k_s']} s for side × order_imbalance > {t['threshold']}, else enter "
                  f"at the deadline ({t['n']:,} random picks; agreement came in {t['agreed_within_k']:.0%}). Entry at "
                  f"the touch; cost vs the mid at signal time: at once {t['cost_now_bps']:.2f} bps, with the rule "
                  f"{t['cost_rule_bps']:.2f} bps; saving {_fmt(t['saving_bps'], 'bps')} "
                  f"{_ci(t['saving_ci'], 'bps')}" + ("." if t["enough"] else " (too few picks for a verdict).")]
    else:
        lines += ["", f"Timing rule: insufficient data ({t.get('n', 0)} picks with a full window)."]
    lines += ["", "![imbalance vs return](imbalance_vs_return.png)", "", "## ML scoring", ""]
    ml = res["ml"]
    if ml.get("enough"):
        lines += [f"{ml['n']:,} rows joined point-in-time through Feast (`training-set` path); label: {ml['label']} "
                  f"({ml['flat_dropped']:,} flat rows dropped); {ml['split']}, {ml['n_test']:,} out-of-sample "
                  f"predictions pooled ({ml['test_up_rate']:.0%} up); {ml['model']}.", "",
                  "| features | AUC | log-loss |", "|---|---|---|",
                  f"| base rate (predict the training up-rate) | 0.5 | {ml['base_rate_log_loss']:.4f} |",
                  f"| base (60 s return, 5 min volatility) | {ml['base']['auc']:.4f} | {ml['base']['log_loss']:.4f} |",
                  f"| base + five microstructure | {ml['base+micro']['auc']:.4f} | "
                  f"{ml['base+micro']['log_loss']:.4f} |", "",
                  f"AUC gain {ml['auc_gain']:+.4f} [{ml['auc_gain_ci'][0]:+.4f}, {ml['auc_gain_ci'][1]:+.4f}] (cluster "
                  f"bootstrap of the out-of-sample rows); log-loss gain {ml['log_loss_gain']:+.4f}. The entropy of "
                  f"the test base rate is {ml['base_rate_entropy']:.4f}: a calibrated model scores below it.", "",
                  "![reliability](reliability.png)"]
    else:
        lines += [f"insufficient data ({ml.get('n', 0)} labelled rows; need {MIN_ML_ROWS}+ with both outcomes in the "
                  "out-of-sample folds)."]
    cov = res["coverage"]["overall"]
    lines += ["", "## Data and coverage", "", f"Symbols: {cov['symbols']} — L2 (≥ 5 levels) {cov['l2']}, shallow "
              f"{cov['shallow']}, L1 only {cov['l1_only']}, none {cov['none']}.", "", "![coverage](coverage.png)", "",
              "![spread and depth](spread_depth.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    public = {k: v for k, v in res.items() if not k.startswith("_")}
    from microstructure.contract.text import dumps

    (out / "results.json").write_text(dumps(public))  # strict JSON: NaN is null
    missing = [i for i in images if not (out / i).exists()]
    if missing:
        raise RuntimeError(f"plots not written: {missing}")
    return path
