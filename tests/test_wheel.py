"""A real, non-editable install: build the wheel, install it with the locked set into a fresh virtual
environment, and run `run` and `sql` from an empty folder (no checkout anywhere on the path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # builds the wheel and installs it into a fresh virtual environment

ROOT = Path(__file__).resolve().parents[1]


def sh(*args: object, cwd: Path | None = None, env: dict | None = None, timeout: float = 900) -> str:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, args))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def sh_all(*args: object) -> str:
    """stdout and stderr together: pip and setuptools print their warnings on stderr."""
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(map(str, args))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


TEST_TOOLS = ("pytest", "pytest-xdist", "pytest-httpserver", "hypothesis", "ruff", "duckdb-cli")


def test_runtime_lock_holds_no_test_tools():
    """A production host installs requirements.lock only: the test tools live in requirements-test.lock."""
    def pinned(lock: str) -> set[str]:
        return {line.split("==")[0].split("[")[0].lower() for line in (ROOT / lock).read_text().splitlines()
                if line and not line[0].isspace() and not line.startswith("#") and "==" in line}
    runtime, test = pinned("requirements.lock"), pinned("requirements-test.lock")
    assert not runtime & set(TEST_TOOLS), runtime & set(TEST_TOOLS)
    assert set(TEST_TOOLS) <= test
    assert {"databento", "databento-dbn", "ccxt", "feast", "prefect"} <= runtime


def test_wheel_installs_and_runs_from_an_empty_folder(tmp_path):
    dist = tmp_path / "dist"
    built = sh_all(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, ROOT)
    # setuptools once printed ~176 lines about undeclared package data; a build says nothing of the kind now.
    assert "warning" not in built.lower(), built[-3000:]
    (wheel,) = dist.glob("microstructure-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for sql in ("features", "views", "base_features"):  # every SQL file the package runs
        assert f"microstructure/transforms/{sql}.sql" in names
    assert "microstructure/checks/datadocs_static/js/bootstrap.min.js" in names  # Data Docs render offline
    assert "microstructure/feature_repo/feature_store.yaml" in names
    assert "microstructure/flows/pipeline.py" in names
    assert {n.split("/")[0] for n in names} <= {"microstructure", wheel.name.split("-")[0] + "-" +
                                                wheel.name.split("-")[1] + ".dist-info"}  # no generic top level
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    sh(py, "-m", "pip", "install", "-q", "-U", "pip")  # as the README's first command does
    sh(py, "-m", "pip", "install", "-q", "--require-hashes", "-r", ROOT / "requirements.lock")
    sh(py, "-m", "pip", "install", "-q", "--no-deps", wheel)
    for tool in ("pytest", "hypothesis", "ruff", "xdist"):  # the runtime set carries no test tools
        assert subprocess.run([py, "-c", f"import {tool}"], capture_output=True).returncode != 0, tool
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MICROSTRUCTURE_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    where = sh(py, "-c", "import microstructure, microstructure.transforms; print(microstructure.__file__)", cwd=empty,
               env=env)
    assert str(venv) in where and str(ROOT) not in where
    out = json.loads(sh(venv / "bin" / "microstructure", "run", "--cycles", 20, "--symbols", 5, "--json",
                        cwd=empty, env=env))
    assert out["poll"]["written"] > 50 and all(b["published"] for b in out["builds"])
    rows = json.loads(sh(venv / "bin" / "microstructure", "sql", "SELECT count(*) AS n FROM features", "--json",
                         cwd=empty, env=env))
    assert rows[0]["n"] > 50
    assert (empty / "data" / "lake").exists()
