"""`evaluate`: the bootstrap and its verdict rules, and the command end to end (report, plots, headline, the
exported model `picks --score` uses, real LOBSTER data, and its refusals). The fill simulator it builds on is in
test_fill_simulator.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from microstructure.research.stats import Boot, verdict, wmean


def test_bootstrap_interval_covers_truth_and_verdicts():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.0, 4000)
    clusters = np.repeat(np.arange(200), 20)
    lo, hi = Boot(clusters, rng).ci(wmean(x))
    assert lo < x.mean() < hi and hi - lo < 0.3
    assert Boot(np.zeros(50), rng).by_row  # one cluster: rows are resampled instead
    assert verdict((0.35, 0.5), 0.3) == "met"
    assert verdict((0.1, 0.25), 0.3) == "not met"
    assert verdict((0.2, 0.4), 0.3) == "inconclusive"
    assert verdict((0.4, 0.5), 0.3, enough=False) == "insufficient data"
    assert verdict(None, 0.3) == "insufficient data"


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval") / "data"
    cli("run", "--data-dir", d, "--cycles", 450, "--symbols", 40, "--json")
    out = d / "rep"
    res = json.loads(cli("evaluate", "--data-dir", d, "--out", out, "--json").stdout)
    return d, out, res


@pytest.mark.integration  # the CLI's run and evaluate in subprocesses
def test_run_then_evaluate_writes_report_plots_and_headline(evaluated):
    _d, out, res = evaluated
    for f in ("report.md", "results.json", "imbalance_vs_return.png", "bad_fills_by_tier.png", "spread_depth.png",
              "coverage.png"):
        assert (out / f).stat().st_size > 1000, f
    claims = [h["claim"] for h in res["headline"]]
    assert len(claims) == 9 and res["data"].startswith("simulated simulated: 40 symbols")
    assert all(h["verdict"] in ("met", "not met", "inconclusive", "insufficient data") for h in res["headline"])
    by = {h["claim"]: h for h in res["headline"]}
    nxt = by["order imbalance sign predicts next move"]
    # The simulator's queue race makes imbalance informative (~70% on the next move per price change):
    assert nxt["verdict"] == "met" and 0.55 < nxt["measured"] < 0.8
    cov = by["50-150 symbols with L2 data"]
    assert cov["measured"] == 40 and cov["verdict"] == "not met"
    text = (out / "report.md").read_text()
    assert "## Headline" in text and "simulated order books" in text and "![bad fills](bad_fills_by_tier.png)" in text
    full = json.loads((out / "results.json").read_text())
    # The fill study by delay: decided on the book at T, filled at T + delay against the decision mid.
    assert [e["delay_s"] for e in full["bad_fills"]["by_delay"]] == [1, 5, 30, 60]
    assert "implementation shortfall by delay" in text
    ml = full["ml"]
    assert ml["label"].startswith("up vs down") and ml["split"].startswith("walk-forward")
    assert (out / "reliability.png").stat().st_size > 1000 and ml["base_rate_entropy"] > 0.6


@pytest.mark.integration  # the CLI's run and evaluate in subprocesses
def test_two_identical_evaluate_runs_give_identical_results(evaluated, tmp_path):
    d, out, _ = evaluated
    cli("evaluate", "--data-dir", d, "--out", tmp_path / "again", "--json")
    a = json.loads((out / "results.json").read_text())
    b = json.loads((tmp_path / "again" / "results.json").read_text())
    a.pop("generated")
    b.pop("generated")
    assert a == b


@pytest.mark.integration  # the CLI's run and evaluate in subprocesses
def test_picks_score_uses_the_evaluate_model(evaluated, tmp_path):
    d, _, _ = evaluated
    assert (d / "models" / "entry_model.json").exists() and not (d / "models" / "entry_model.pkl").exists()
    picks = tmp_path / "p.csv"
    pd.DataFrame({"symbol": ["MEGA01", "MEGA01", "NOPE"], "side": ["buy", "sell", "buy"], "score": [1, 1, 1],
                  "mode": ["SAFE"] * 3}).to_csv(picks, index=False)
    p = cli("picks", "--in", picks, "--data-dir", d, "--score", "--json", check=False)
    assert p.returncode == 1 and p.stderr.startswith("not found: NOPE"), p.stderr  # NOPE has no data: exit 1
    rows = json.loads(p.stdout)["picks"]
    a, b, c = rows
    assert 0 < a["model_p_up"] < 1 and a["model_p_up"] == b["model_p_up"]
    assert a["model_score"] == pytest.approx(1 - b["model_score"])
    assert c["model_p_up"] is None


@pytest.mark.integration  # the CLI's run and evaluate in subprocesses
def test_evaluate_on_real_lobster_says_insufficient_data(tmp_path, lobster_dir):
    d = tmp_path / "lob"
    cli("backfill", lobster_dir, "--format", "lobster", "--cadence", "0.1", "--data-dir", d, "--json")
    cli("build-features", "--data-dir", d, "--json")

    def strict(text: str) -> object:  # json.loads accepts bare NaN; real JSON parsers do not
        def refuse(c: str) -> None:
            raise ValueError(f"not JSON: {c}")

        return json.loads(text, parse_constant=refuse)

    res = strict(cli("evaluate", "--data-dir", d, "--json").stdout)
    strict((d / "report" / "results.json").read_text())
    assert res["data"].startswith("real lobster: 1 symbols")
    assert {h["verdict"] for h in res["headline"][:-1]} == {"insufficient data"}
    assert (d / "report" / "report.md").exists()


@pytest.mark.integration  # the CLI's run and evaluate in subprocesses
def test_evaluate_without_features_is_a_one_line_error(tmp_path):
    r = cli("evaluate", "--data-dir", tmp_path / "nowhere", check=False)
    assert r.returncode == 2 and "not a data dir" in r.stderr and r.stderr.count("\n") == 1
    (tmp_path / "empty" / "lake").mkdir(parents=True)
    r = cli("evaluate", "--data-dir", tmp_path / "empty", check=False)
    assert r.returncode == 2 and "no published features" in r.stderr and r.stderr.count("\n") == 1
