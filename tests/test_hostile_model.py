"""No code is loaded from data: the entry model is numbers in JSON, and a planted or tampered model file is
refused with one line (exit 2), never unpickled.

The data dir is real: the recorded Binance spot streams (BTCUSDT, ETHUSDT) backfilled and built into features
by the CLI. The model is fitted on those rows by ``evaluate``'s own fitting function.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from microstructure.contract.schemas import ML_FEATURES
from microstructure.features.model_inputs import BASE_FEATURES, base_feature_rows
from microstructure.lake.paths import LakePaths
from microstructure.lake.views import connect
from microstructure.research.ml import fit_entry_model
from microstructure.store.repo import FEATURE_REPO, registry_dir
from microstructure.trading.scoring import (
    MAX_MODEL_BYTES,
    MODEL_PATH,
    OLD_PICKLE,
    ModelError,
    dump_model,
    export_model,
    load_model,
    p_up,
)

SPOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "binance" / "spot"
AS_OF = "2024-08-09T00:04:00Z"
COLS = [*BASE_FEATURES, *ML_FEATURES]

pytestmark = [pytest.mark.integration,  # the data dir is built by the CLI, in subprocesses
              pytest.mark.skipif(not SPOT.exists(), reason="shared Binance sample not present")]


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=os.environ)


@pytest.fixture(scope="module")
def binance_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("binance") / "data"
    for s in ("btcusdt", "ethusdt"):
        r = cli("backfill", SPOT / f"{s}_20240808.gz", SPOT / f"{s}_20240809.gz", "--format", "binance-depth",
                "--cadence", "0.5", "--data-dir", d, "--json")
        assert r.returncode == 0, r.stderr
    r = cli("build-features", "--data-dir", d, "--json")
    assert r.returncode == 0, r.stderr
    r = cli("online", "BTCUSDT", "--data-dir", d, "--json")  # opens (applies) the Feast store of the data dir
    assert r.returncode == 1 and json.loads(r.stdout)[0]["found"] is False, r.stderr  # a backfill is offline only
    assert (registry_dir(d) / "registry.db").exists() and (d / "feast" / "feature_store.yaml").exists()
    assert not (d / "feast" / "registry.db").exists()  # derived state lives in the user's cache, not in data
    return d


@pytest.fixture(scope="module")
def real_rows(binance_dir) -> pd.DataFrame:
    """Every feature row with its base features and a label: did the mid move up over the next 60 s?"""
    con = connect(LakePaths(binance_dir))
    base = base_feature_rows(con, "features")
    feats = con.sql("SELECT symbol, event_ts, " + ", ".join(ML_FEATURES) + " FROM features").df()
    d = base.merge(feats, on=["symbol", "event_ts"]).sort_values(["symbol", "event_ts"]).reset_index(drop=True)
    fwd = d.groupby("symbol")["mid"].shift(-120)  # 0.5 s cadence: 120 rows ahead = 60 s
    d = d[fwd.notna() & (fwd != d["mid"])].copy()
    d["label"] = (fwd[d.index] > d["mid"]).astype(int)
    d = d.dropna(subset=COLS).reset_index(drop=True)
    assert len(d) > 1000 and d["label"].nunique() == 2 and d["symbol"].nunique() == 2
    return d


@pytest.fixture(scope="module")
def fitted(real_rows):
    return fit_entry_model(real_rows, COLS)


def exported(fitted) -> dict:
    return export_model(fitted, COLS, 60, "real binance-spot: 2 symbols", 0.55, "2026-01-01T00:00:00+00:00")


def plant(data_dir: Path, model: dict | bytes | str) -> Path:
    f = data_dir / MODEL_PATH
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(model if isinstance(model, bytes) else
                  (model if isinstance(model, str) else json.dumps(model)).encode())
    return f


def picks_file(tmp_path: Path) -> Path:
    p = tmp_path / "picks.csv"
    pd.DataFrame({"symbol": ["BTCUSDT", "BTCUSDT", "ETHUSDT"], "side": ["buy", "sell", "buy"], "score": [1, 1, 1],
                  "mode": ["SAFE"] * 3, "as_of": [AS_OF] * 3}).to_csv(p, index=False)
    return p


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


class Planted:
    """A pickle whose loading runs a shell command (what `picks --score` used to do with entry_model.pkl)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


# ---- the model as numbers ------------------------------------------------------------------------
def test_json_model_recomputes_predict_proba_to_1e12_on_real_binance_rows(fitted, real_rows, tmp_path):
    plant(tmp_path, dump_model(exported(fitted)).decode())
    model = load_model(tmp_path)  # through the file and the strict loader, as `picks --score` reads it
    assert model["features"] == COLS and model["log1p"] == ["bid_depth", "ask_depth"]
    want = fitted.predict_proba(real_rows[COLS])[:, 1]
    got = p_up(model, real_rows)
    assert len(got) == len(real_rows) > 1000
    assert np.max(np.abs(got - want)) <= 1e-12
    assert np.ptp(want) > 1e-3  # a fitted model, not a constant


def test_picks_score_over_the_cli_equals_predict_proba_and_ignores_a_planted_pickle(fitted, binance_dir, tmp_path):
    """A valid JSON model beside a planted pickle: the JSON scores, the pickle is never touched."""
    d = tmp_path / "data"
    import shutil

    shutil.copytree(binance_dir, d)
    marker = tmp_path / "pwned"
    (d / OLD_PICKLE).parent.mkdir(parents=True, exist_ok=True)
    (d / OLD_PICKLE).write_bytes(pickle.dumps(Planted(marker)))
    plant(d, dump_model(exported(fitted)).decode())
    r = cli("picks", "--in", picks_file(tmp_path), "--data-dir", d, "--score", "--json")
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    rows = json.loads(r.stdout)["picks"]
    a, b, c = rows
    assert a["status"] == "kept" and a["model_p_up"] == b["model_p_up"] and c["model_p_up"] is not None
    assert b["model_score"] == pytest.approx(1 - a["model_score"], abs=1e-15)
    # The same number the fitted scikit-learn model gives for the pick's row (base features at as_of).
    con = connect(LakePaths(d))
    base = base_feature_rows(con, "features")
    for row in (a, c):
        last = base[(base["symbol"] == row["symbol"]) & (base["event_ts"] <= pd.Timestamp(AS_OF))].dropna().iloc[-1]
        x = pd.DataFrame([{**{k: last[k] for k in BASE_FEATURES}, **{k: row[k] for k in ML_FEATURES}}])
        assert abs(fitted.predict_proba(x[COLS])[0, 1] - row["model_p_up"]) <= 1e-12


# ---- a planted pickle ----------------------------------------------------------------------------
def test_planted_pickle_payload_is_live(tmp_path):
    """The attack file below really runs a command when unpickled (so the next test can fail)."""
    marker = tmp_path / "control"
    blob = tmp_path / "evil.pkl"
    blob.write_bytes(pickle.dumps(Planted(marker)))
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.loads(open({str(blob)!r}, 'rb').read())"],
                   check=True, timeout=60)
    assert marker.exists()


def test_planted_entry_model_pkl_never_runs_on_picks_score(binance_dir, tmp_path):
    marker = tmp_path / "pwned"
    pkl = binance_dir / OLD_PICKLE
    pkl.parent.mkdir(parents=True, exist_ok=True)
    assert not (binance_dir / MODEL_PATH).exists()
    pkl.write_bytes(pickle.dumps(Planted(marker)))
    try:
        line = one_error_line(cli("picks", "--in", picks_file(tmp_path), "--data-dir", binance_dir, "--score"))
    finally:
        pkl.unlink()
    assert not marker.exists()
    assert "entry_model.pkl" in line and "never loaded" in line and "re-run `microstructure evaluate`" in line


# ---- tampered JSON models ------------------------------------------------------------------------
def _tampered(base: dict) -> dict[str, str | bytes]:
    nan_coef = json.dumps(base).replace(json.dumps(base["coef"][0]), "NaN", 1)
    assert "NaN" in nan_coef
    out: dict[str, str | bytes] = {
        "nan_coef": nan_coef,
        "infinite_coef": json.dumps(base).replace(json.dumps(base["coef"][0]), "1e999", 1),
        "coef_wrong_length": json.dumps({**base, "coef": base["coef"][:-1]}),
        "huge_file": json.dumps({**base, "data": "x" * (MAX_MODEL_BYTES + 10)}),
        "huge_whitespace": json.dumps(base) + " " * MAX_MODEL_BYTES,
        "unknown_feature": json.dumps({**base, "features": [*base["features"][:-1], "__import__('os')"]}),
        "bool_coef": json.dumps({**base, "coef": [True] * len(base["coef"])}),
        "zero_scale": json.dumps({**base, "scale": [0.0] * len(base["scale"])}),
        "string_intercept": json.dumps({**base, "intercept": "0.1"}),
        "extra_key": json.dumps({**base, "py/object": "os.system"}),
        "log1p_of_a_return": json.dumps({**base, "log1p": ["ret_60s_bps"]}),
        "wrong_format": json.dumps({**base, "version": 99}),
        "not_an_object": json.dumps([base]),
        "deep_nesting": "[" * 50_000 + "]" * 50_000,
        "not_utf8": b"\xff\xfe" + json.dumps(base).encode(),
        "pickle_bytes_named_json": pickle.dumps({"coef": [1.0]}),
    }
    assert sorted(out) == sorted(TAMPERED)
    return out


TAMPERED = ["nan_coef", "infinite_coef", "coef_wrong_length", "huge_file", "huge_whitespace", "unknown_feature",
            "bool_coef", "zero_scale", "string_intercept", "extra_key", "log1p_of_a_return", "wrong_format",
            "not_an_object", "deep_nesting", "not_utf8", "pickle_bytes_named_json"]


@pytest.mark.parametrize("attack", TAMPERED)
def test_tampered_json_model_is_refused_by_the_loader(attack, fitted, tmp_path):
    base = exported(fitted)
    load_model(plant(tmp_path, dump_model(base)).parent.parent)  # the untampered file loads
    plant(tmp_path, _tampered(base)[attack])
    with pytest.raises(ModelError, match="re-run `microstructure evaluate`") as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("attack", ["nan_coef", "huge_file"])  # every attack is refused by the loader above
def test_tampered_json_model_makes_picks_score_exit_2_with_one_line(attack, fitted, binance_dir, tmp_path):
    f = plant(binance_dir, _tampered(exported(fitted))[attack])
    try:
        line = one_error_line(cli("picks", "--in", picks_file(tmp_path), "--data-dir", binance_dir, "--score"))
    finally:
        f.unlink()
    assert "entry_model.json" in line and "re-run `microstructure evaluate`" in line


def test_export_refuses_a_model_that_is_not_the_entry_pipeline(real_rows):
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression().fit(real_rows[COLS], real_rows["label"])
    with pytest.raises(ValueError, match="must be log-depth"):
        export_model(lr, COLS, 60, "x", 0.5, "t")  # a bare regression: no scaler, no log-depth step
    with pytest.raises(ValueError, match="binary"):
        export_model(fit_entry_model(real_rows, COLS), COLS[:-1], 60, "x", 0.5, "t")  # one name short
    with pytest.raises(ValueError, match="in that order"):
        export_model(fit_entry_model(real_rows, COLS), COLS[::-1], 60, "x", 0.5, "t")  # same names, wrong order
    assert math.isfinite(exported(fit_entry_model(real_rows, COLS))["intercept"])


# ---- other files of a data dir that a library would turn into code ----------------------------------------
def _copy(binance_dir: Path, tmp_path: Path) -> Path:
    import shutil

    d = tmp_path / "data"
    shutil.copytree(binance_dir, d)
    return d


def test_planted_feature_store_yaml_type_path_is_never_imported(binance_dir, tmp_path):
    """Feast imports the dotted path in a store's ``type:``. A data dir's feature_store.yaml is regenerated from
    the package's own file on every open, so a planted one never reaches Feast."""
    d = _copy(binance_dir, tmp_path)
    marker, cwd = tmp_path / "pwned", tmp_path / "cwd"  # `python -m` puts the cwd on sys.path: the module is found
    cwd.mkdir()
    (cwd / "evil_feast_store.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig as EvilOnlineStoreConfig\n")
    yml = d / "feast" / "feature_store.yaml"
    yml.write_text(re.sub(r"(online_store:\n\s+type: )\S+", r"\1evil_feast_store.EvilOnlineStore", yml.read_text()))
    assert "evil_feast_store" in yml.read_text()
    control = subprocess.run([sys.executable, "-c", f"from feast.repo_config import load_repo_config; from pathlib "
                              f"import Path; load_repo_config(Path('.'), Path({str(yml)!r})).online_store"],
                             cwd=cwd, capture_output=True, text=True, timeout=120)
    assert marker.exists(), control.stderr[-500:]  # the planted file is live: reading it imports the module
    marker.unlink()
    r = subprocess.run([sys.executable, "-m", "microstructure", "online", "BTCUSDT", "--data-dir", str(d), "--json"],
                       cwd=cwd, capture_output=True, text=True, timeout=300, env=os.environ)
    assert r.returncode == 1 and json.loads(r.stdout)[0]["found"] is False, r.stderr  # answered: no online row
    assert not marker.exists() and "evil_feast_store" not in yml.read_text()


def _planted_registry(binance_dir: Path, marker: Path) -> bytes:
    """The data dir's real registry with its on-demand view's UDF source replaced by one that touches ``marker``."""
    from feast.protos.feast.core.Registry_pb2 import Registry

    r = Registry()
    r.ParseFromString((registry_dir(binance_dir) / "registry.db").read_bytes())
    udf = r.on_demand_feature_views[0].spec.feature_transformation.user_defined_function
    udf.body_text = f"import os\nos.system('touch {marker}')\ndef freshness(inputs):\n    return inputs\n"
    return r.SerializeToString()


def test_planted_feast_registry_udf_never_runs_on_training_set(binance_dir, tmp_path):
    """Feast execs an on-demand view's source (and dill-loads its body) from the registry it is pointed at. The
    registry is derived state kept in the user's cache (``registry_dir``), so a registry.db planted in the data
    dir, with a forged stamp beside it, is never read."""
    import yaml

    d = _copy(binance_dir, tmp_path)
    marker = tmp_path / "pwned"
    planted = _planted_registry(binance_dir, marker)
    # Control: the planted registry is live. Feast pointed at it runs the source on first use.
    live = tmp_path / "live"
    live.mkdir()
    (live / "registry.db").write_bytes(planted)
    cfg = yaml.safe_load((d / "feast" / "feature_store.yaml").read_text())
    cfg["registry"]["path"] = str(live / "registry.db")
    (live / "feature_store.yaml").write_text(yaml.safe_dump(cfg))
    control = subprocess.run([sys.executable, "-c", f"from feast import FeatureStore; FeatureStore(repo_path="
                              f"{str(FEATURE_REPO)!r}, fs_yaml_file={str(live / 'feature_store.yaml')!r})"
                              ".list_on_demand_feature_views()"], capture_output=True, text=True, timeout=300)
    assert marker.exists(), control.stderr[-500:]
    marker.unlink()
    # The attack: the same registry where the data dir's Feast files are, with the stamp the old code trusted.
    (d / "feast" / "registry.db").write_bytes(planted)
    stamp = registry_dir(binance_dir) / "applied.sha256"
    (d / "feast" / "applied.sha256").write_text(stamp.read_text())
    ents = tmp_path / "ents.csv"
    ents.write_text(f"symbol,event_timestamp\nBTCUSDT,{AS_OF}\n")
    out = tmp_path / "out.parquet"
    r = cli("training-set", "--entities", ents, "--out", out, "--data-dir", d)
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), "a planted registry ran code"
    assert len(pd.read_parquet(out)) == 1
    assert (d / "feast" / "registry.db").read_bytes() == planted  # ignored, not even rewritten
    feast_cfg = yaml.safe_load((d / "feast" / "feature_store.yaml").read_text())
    assert feast_cfg["registry"]["path"] == str(registry_dir(d) / "registry.db")


def _plant_gx_plugin(d: Path, marker: Path) -> Path:
    """A store in the data dir's GE config whose module, in the config's plugins folder, touches ``marker``."""
    import yaml

    yml = d / "gx" / "gx" / "great_expectations.yml"
    if not yml.exists():
        pytest.fail("validate wrote no GE project to plant into")
    cfg = yaml.safe_load(yml.read_text())
    (d / "gx" / "gx" / "plugins").mkdir(exist_ok=True)
    (d / "gx" / "gx" / "plugins" / "evil_gx_store.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from great_expectations.data_context.store import ExpectationsStore as EvilStore\n")
    cfg["plugins_directory"] = "plugins/"
    cfg["stores"]["evil"] = {"class_name": "EvilStore", "module_name": "evil_gx_store"}
    yml.write_text(yaml.safe_dump(cfg))
    return yml


def test_planted_great_expectations_yml_plugin_never_runs_on_validate(binance_dir, tmp_path):
    """GE imports the module a store of great_expectations.yml names, from the file's plugins folder. The file is
    rewritten from our own configuration (no plugins folder) before GE opens the project."""
    from microstructure.checks.ge import Checker

    d = _copy(binance_dir, tmp_path)
    Checker(d / "gx")  # the data dir's GE project, as `validate` creates it
    marker = tmp_path / "pwned"
    _plant_gx_plugin(d, marker)
    # Control: the planted file is live. GE opening the project runs the plugin.
    control = subprocess.run([sys.executable, "-c", "import great_expectations as gx; gx.get_context(mode='file', "
                              f"project_root_dir={str(d / 'gx')!r})"], capture_output=True, text=True, timeout=300)
    assert marker.exists(), control.stderr[-500:]
    marker.unlink()
    _plant_gx_plugin(d, marker)
    r = cli("validate", "--data-dir", d, "--json")
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), "a planted GE config ran code"
    text = (d / "gx" / "gx" / "great_expectations.yml").read_text()
    assert "evil" not in text and "plugins/" not in text
