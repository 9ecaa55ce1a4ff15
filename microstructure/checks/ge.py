"""Running the suites with Great Expectations, and its Data Docs, on the offline (per-date) path.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from microstructure.checks.sql import _whole_batch
from microstructure.checks.suites import CheckResult, _expectations

if TYPE_CHECKING:
    from great_expectations.data_context import AbstractDataContext, FileDataContext


def _frame(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["lag_s"] = (df["received_ts"] - df["event_ts"]).dt.total_seconds()
    return df


_SITE = "uncommitted/data_docs/local_site/"  # relative to the GE project folder (<docs-dir>/gx)


def _docs_context(docs_dir: Path) -> FileDataContext:
    """A file-backed GE context under ``docs_dir`` (a data dir's ``gx/``) whose configuration is ours alone.

    GE imports the ``module_name`` of every store, site and plugin its ``great_expectations.yml`` names, puts the
    ``plugins_directory`` on ``sys.path``, and substitutes ``${VAR}`` from the environment and a variables file.
    A data dir is untrusted data, so the file is rewritten from this configuration before GE opens the project
    and handed to GE as an object too: whatever was planted there is never read. No plugins folder and no
    variables file. Suites, validation definitions and checkpoints live in memory (re-added on every start), so
    their JSON files in the folder are never read either; only validation results (data) and the Data Docs site
    are files, for the docs' history."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import DataContextConfig, InMemoryStoreBackendDefaults

    from microstructure.contract.atomic import atomic_write_bytes

    def files(base: str) -> dict[str, str]:
        return {"class_name": "TupleFilesystemStoreBackend", "base_directory": base}

    stores = InMemoryStoreBackendDefaults()
    stores.stores[stores.validation_results_store_name] = {"class_name": "ValidationResultsStore",
                                                            "store_backend": files("uncommitted/validations/")}
    stores.data_docs_sites = {"local_site": {"class_name": "SiteBuilder", "show_how_to_buttons": True,
                                             "store_backend": files(_SITE),
                                             "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}}}
    config = DataContextConfig(store_backend_defaults=stores, plugins_directory=None,
                               config_variables_file_path=None, analytics_enabled=False)
    project = docs_dir / "gx"  # GE's context folder inside the project root
    atomic_write_bytes(config.to_yaml_str().encode(), project / "great_expectations.yml")
    return gx.get_context(mode="file", project_root_dir=str(docs_dir), project_config=config)


class Checker:
    """Holds a GE context and one validation definition per suite; reuse it across cycles."""

    def __init__(self, docs_dir: Path | None = None) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        logging.getLogger("great_expectations").setLevel(logging.ERROR)
        self.ctx: AbstractDataContext
        if docs_dir is None:
            self.ctx = gx.get_context(mode="ephemeral")
        else:
            self.ctx = _docs_context(docs_dir)
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        self.docs = docs_dir is not None
        ds = self.ctx.data_sources.add_or_update_pandas("microstructure")
        self._defs: dict[str, Any] = {}
        for kind in ("snapshots", "features"):
            asset = ds.add_dataframe_asset(kind)
            batch = asset.add_batch_definition_whole_dataframe(f"{kind}_batch")
            suite = self.ctx.suites.add_or_update(gx.ExpectationSuite(name=f"{kind}_suite",
                                                                      expectations=_expectations(kind)))
            vd = gx.ValidationDefinition(data=batch, suite=suite, name=f"{kind}_validation")
            vd = self.ctx.validation_definitions.add_or_update(vd)
            self._defs[kind] = vd

    def check(self, kind: str, df: Any, batch: str | None = None) -> CheckResult:
        """Validate ``df`` (a pandas frame or an Arrow table) against the ``kind`` suite. ``batch`` names what
        was validated (e.g. "snapshots 2026-11-25"): it is the run name Data Docs list the validation under."""
        if not isinstance(df, pd.DataFrame):  # an Arrow table
            df = df.to_pandas()
        if df.empty:
            return CheckResult(kind, True, 0)
        runner = self._defs[kind]
        run_id = None
        if batch is not None or self.docs:
            from great_expectations.core.run_identifier import RunIdentifier

            run_id = RunIdentifier(run_name=batch, run_time=dt.datetime.now(dt.UTC))
        res = runner.run(batch_parameters={"dataframe": _frame(df)}, run_id=run_id)
        if self.docs:
            self._publish(res, run_id, batch or kind)
        failures = []
        for r in res.results:
            if not r.success:
                cfg = r.expectation_config
                col = cfg.kwargs.get("column") or cfg.kwargs.get("column_list") or (
                    f"{cfg.kwargs.get('column_A')}>{cfg.kwargs.get('column_B')}")
                n = (r.result or {}).get("unexpected_count")
                failures.append(f"{cfg.type}({col})" + (f": {n} rows" if n is not None else ""))
        return CheckResult(kind, res.success, len(df), failures)

    def split(self, kind: str, table: Any) -> tuple[CheckResult, Any, Any]:
        """(verdict, rows to serve, rows to quarantine with a ``reason``): GE judges the batch as a whole, so
        a failing batch is quarantined entire (``SqlChecker.split`` separates the rows)."""
        return _whole_batch(self.check(kind, table), table)

    def _publish(self, res: Any, run_id: Any, batch: str) -> None:
        """Store the result under the batch's name and rebuild Data Docs for offline reading.

        A dataframe batch carries no ``data_asset_name`` in its batch spec, so GE's validation page says
        "Data asset: None"; we name the batch (dataset and date) before storing the result."""
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        from microstructure.checks.datadocs import make_offline

        res.meta.setdefault("batch_spec", {})["data_asset_name"] = batch
        key = ValidationResultIdentifier(expectation_suite_identifier=ExpectationSuiteIdentifier(name=res.suite_name),
                                         run_id=run_id, batch_identifier=res.batch_id)
        self.ctx.validation_results_store.set(key, res)
        self.ctx.build_data_docs()
        make_offline(self.site())

    def site(self) -> Path:
        root = self.ctx.root_directory
        assert root is not None  # called with docs only: a file context, which has a folder
        return Path(root) / _SITE

    def docs_index(self) -> Path | None:
        if not self.docs:
            return None
        idx = self.site() / "index.html"
        return idx if idx.exists() else None
