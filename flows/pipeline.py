"""Prefect flows: orchestration only. Every step is a plain function in ``microstructure`` (``runner.run_poll``,
``build_and_publish``, ``compact_all``).

* ``poll_flow``: one long-running flow whose inner loop polls every ``interval`` seconds (Prefect cannot
  start a run every 2 s; a run costs ~1 s), scheduled once per US session (``prefect.yaml`` or
  ``flows/serve.py``). It logs progress every few minutes and leaves a markdown artifact with the session's
  summary; it retries after a delay, and its deployments allow one run at a time.
* ``build_features_flow``: the nightly rebuild: build -> check -> publish, then compaction, of the dates changed
  since their last build (a manifest; a night without new data does nothing), or of the dates asked.
* ``main_flow``: what ``microstructure run --prefect`` runs: poll, then build.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import functools
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, task

from microstructure.jobs import runner
from microstructure.jobs.build import build_and_publish, compact_all, rebuild, write_manifest
from microstructure.jobs.poll import PollStats
from microstructure.lake import datadir
from microstructure.lake.paths import LakePaths

PROGRESS_EVERY_S = 300.0  # the run log gets a progress line this often
ARTIFACT_EVERY_S = 30.0  # the live artifacts (progress, health table) are updated this often, or every 5 %
# Notices that libraries give about their own dependencies or about APIs they call (not about our calls): the
# operator can do nothing about them, so they stay out of the run log. Matched by the package the warning comes
# from, so the same category raised by our code (or a library not listed) still reaches the log.
LIBRARY_NOTICES: tuple[tuple[type[Warning], str], ...] = (
    # GE imports sre_parse/sre_constants (deprecated since 3.11) and pydantic v1 shims at import.
    (DeprecationWarning, "great_expectations"),
    # Feast: its own deprecated settings and the pandas/pyarrow behaviour changes it calls into.
    (DeprecationWarning, "feast"),
    (FutureWarning, "feast"),
    # Prefect's own compatibility notices about its internals.
    (DeprecationWarning, "prefect"),
)


@functools.cache
def _package_dir(pkg: str) -> Path | None:
    """Where ``pkg`` is installed (found, not imported), or None."""
    import importlib.util

    spec = importlib.util.find_spec(pkg)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]).resolve() if locations else None


def _library_notice(category: type[Warning], filename: str) -> bool:
    """By where the package is installed, not by a folder's name: a worker's checkout under a folder named
    ``prefect`` (the official image's workdir is /opt/prefect) or ``feast`` must not lose our own notices."""
    path = Path(filename).resolve()
    return any(issubclass(category, cat) and (d := _package_dir(pkg)) is not None and path.is_relative_to(d)
               for cat, pkg in LIBRARY_NOTICES)


@contextmanager
def run_warnings() -> Iterator[None]:
    """Python warnings raised while a flow runs go to its run log (the Prefect UI), once per place and scrubbed,
    instead of only to the worker's stderr; the libraries' own notices (``LIBRARY_NOTICES``) are left out. Scoped
    to the run (``catch_warnings``): nothing is silenced for the rest of the process."""
    import logging

    from prefect import get_run_logger

    from microstructure.sources.secrets import scrub

    log = get_run_logger()

    def to_log(message: Warning | str, category: type[Warning], filename: str, lineno: int,
               file: Any = None, line: str | None = None) -> None:
        # Checked here too, not only by the filters: importing Feast puts `simplefilter("once", DeprecationWarning)`
        # in front of every filter, process-wide (feast/feature_store.py), so its notices pass the filters below.
        if _library_notice(category, filename):
            return
        log.warning("%s", scrub(warnings.formatwarning(message, category, filename, lineno, line).strip()))

    with warnings.catch_warnings():
        warnings.simplefilter("default")  # every warning once per place, whatever the process's filters
        for category, pkg in LIBRARY_NOTICES:
            warnings.filterwarnings("ignore", category=category, module=rf"{pkg}(\.|$)")
        # GE turns on logging.captureWarnings at import, which would replace our showwarning mid-run with one that
        # logs to "py.warnings" (stderr only): turned on first, GE's call changes nothing. catch_warnings restores
        # the showwarning it found when the run ends.
        # Turned off again at the end if it was off: left on, logging would take a later captureWarnings(True) (GE's
        # import, an application's own) for a no-op, and that caller's warnings would never reach its logger.
        was_capturing = getattr(logging, "_warnings_showwarning", None) is not None
        logging.captureWarnings(True)
        warnings.showwarning = to_log
        try:
            yield
        finally:
            if not was_capturing:
                logging.captureWarnings(False)


@task(name="poll-cycles")
def poll_task(data_dir: str, cycles: int | None, interval: float, step: float, symbols: int, seed: int | None,
              fresh: bool, online: bool = True, source: str = "simulated", symbol_list: list[str] | None = None,
              sources_config: str | None = None, until: str | None = None,
              metrics_port: int | None = None, log_format: str | None = None) -> dict[str, Any]:
    # Vendor keys are read from the environment inside the source; they are never task parameters, so
    # they never reach Prefect's stored parameters, results or logs.
    from prefect import get_run_logger

    log = get_run_logger()
    last = [time.monotonic()]
    live = _LiveArtifacts(cycles, dt.datetime.fromisoformat(until) if until else None)

    def progress(i: int, s: PollStats) -> None:
        live.cycle(i, s)
        if time.monotonic() - last[0] < PROGRESS_EVERY_S:
            return
        last[0] = time.monotonic()
        ages = _online_age(s)
        age = None if ages is None else ages[0]
        log.info("cycle %d: %d snapshots written, coverage %s, quarantined %d, missing %d, skipped slots %d, "
                 "newest online book %s s old", i + 1, s.written, s.coverage(), sum(s.quarantined.values()),
                 sum(s.missing.values()), s.skipped_slots, "?" if age is None else f"{age:.1f}")

    stats = runner.run_poll(Path(data_dir).resolve(), cycles, interval, step, symbols, seed, fresh, online,
                        source_kind=source, symbol_list=symbol_list,
                        sources_config=Path(sources_config) if sources_config else None,
                        until=dt.datetime.fromisoformat(until) if until else None, on_cycle=progress,
                        log_format=log_format, **_metrics_endpoint(metrics_port))
    live.finish(stats)
    d = stats.as_dict()
    d["online_symbols"] = [] if stats.last_features is None else stats.last_features.column("symbol").to_pylist()
    return d


class _LiveArtifacts:
    """The session's artifacts while it polls (Prefect UI: Artifacts): ``poll-progress`` (percent of the cycles or
    of the session until its close) and ``poll-health`` (a table: cycles, snapshots, quarantined, coverage by
    source in the latest cycle, the online books' age). Created at the first cycle, then updated in place every
    ``ARTIFACT_EVERY_S`` or 5 % of the run, and at its end."""

    def __init__(self, cycles: int | None, until: dt.datetime | None) -> None:
        self.cycles, self.until = cycles, until
        self.t0 = dt.datetime.now(dt.UTC)
        self.progress_id: Any = None
        self.health_id: Any = None
        self._at = 0.0
        self._pct = -100.0
        self._busy: threading.Thread | None = None

    def percent(self, done: int) -> float:
        parts = []
        if self.cycles:
            parts.append(done / self.cycles)
        if self.until is not None and self.until > self.t0:
            parts.append((dt.datetime.now(dt.UTC) - self.t0) / (self.until - self.t0))
        return round(100.0 * min(max(parts, default=0.0), 1.0), 1)

    def cycle(self, i: int, s: PollStats) -> None:
        pct = self.percent(i + 1)
        if time.monotonic() - self._at < ARTIFACT_EVERY_S and pct - self._pct < 5.0:
            return
        if self._busy is not None and self._busy.is_alive():
            return  # the last update still waits on the API: skipped, tried again at the next interval
        self._at, self._pct = time.monotonic(), pct
        rows = self._rows(s)
        if rows is None:
            return
        # Off the poll's thread: a slow or 503ing API (Prefect's client retries with back-off, 60 s a request) must
        # not hold a cycle. The copied context keeps the run (artifacts attach to it, the warning goes to its log).
        self._busy = threading.Thread(target=contextvars.copy_context().run, args=(self._try, pct, rows),
                                      name="poll-artifacts", daemon=True)
        self._busy.start()

    def finish(self, s: PollStats) -> None:
        if self._busy is not None:
            self._busy.join()  # the poll is over; the last word must not race an update still in flight
        rows = self._rows(s)
        if rows is not None:
            self._try(100.0, rows)

    def _rows(self, s: PollStats) -> list[dict[str, Any]] | None:
        """The health table, made on the poll's thread (the stats change with the next cycle)."""
        try:
            return _health_rows(s)
        except Exception as e:  # the artifacts are a view; the poll is the job
            self._warn(e)
            return None

    def _try(self, pct: float, rows: list[dict[str, Any]]) -> None:
        """A session outlives a Prefect API hiccup: a failed update is a warning in the run log, and the next one
        is tried at the next interval; the poll goes on."""
        try:
            self._write(pct, rows)
        except Exception as e:  # any failure: the artifacts are a view; the poll is the job
            self._at = time.monotonic()
            self._warn(e)

    @staticmethod
    def _warn(e: Exception) -> None:
        from prefect import get_run_logger

        from microstructure.sources.secrets import scrub

        get_run_logger().warning("could not update the session's artifacts: %s", scrub(f"{type(e).__name__}: {e}"))

    def _write(self, pct: float, rows: list[dict[str, Any]]) -> None:
        from prefect.artifacts import (
            TableArtifact,
            create_progress_artifact,
            create_table_artifact,
            update_progress_artifact,
        )
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate

        # Each created on its own: one failed creation (an API hiccup between the two calls) is retried at the next
        # update, never updated by an id it does not have for the rest of the session.
        if self.progress_id is None:
            self.progress_id = create_progress_artifact(pct, key="poll-progress", description="Poll session progress")
        else:
            update_progress_artifact(self.progress_id, pct)
        if self.health_id is None:
            self.health_id = create_table_artifact(rows, key="poll-health", description="Poll session health")
            return
        # In place: one artifact a session, not one a minute. The run's own client, used as Prefect's artifact
        # functions use it (not entered: entering and leaving it from this thread would race the run's count of it).
        get_client(sync_client=True).update_artifact(self.health_id,
                                                     ArtifactUpdate(data=TableArtifact(table=rows).format()))


def _health_rows(s: PollStats) -> list[dict[str, Any]]:
    """The health table: running totals, the latest cycle's coverage per serving source, the online books' age."""
    from microstructure.lake.coverage import cycle_coverage

    cov = s.coverage()
    rows: list[dict[str, Any]] = [
        {"measure": "cycles", "value": s.cycles},
        {"measure": "snapshots written", "value": s.written},
        {"measure": "quarantined", "value": sum(s.quarantined.values())},
        {"measure": "symbol-polls missing", "value": sum(s.missing.values())},
        {"measure": "skipped slots (overruns)", "value": s.skipped_slots},
        {"measure": "coverage L2 / shallow / L1 only / none",
         "value": f"{cov['l2']} / {cov['shallow']} / {cov['l1_only']} / {cov['none']}"}]
    if s.last_outcomes is not None:
        for src, c in sorted(cycle_coverage(s.last_outcomes).items()):
            rows.append({"measure": f"latest cycle, {src}: L2 / shallow / L1 only / none",
                         "value": f"{c['l2']} / {c['shallow']} / {c['l1_only']} / {c['none']}"})
    age = _online_age(s)
    rows.append({"measure": "online books age, newest / oldest (s)",
                 "value": "-" if age is None else f"{age[0]:.1f} / {age[1]:.1f}"})
    rows.append({"measure": "updated", "value": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    return rows


def _online_age(s: PollStats) -> tuple[float, float] | None:
    """Seconds since the newest and the oldest book last pushed online (event time), or None before any push."""
    if s.last_features is None or not s.last_features.num_rows:
        return None
    ts = [t for t in s.last_features.column("event_ts").to_pylist() if t is not None]
    if not ts:
        return None
    now = dt.datetime.now(dt.UTC)
    return (now - max(ts)).total_seconds(), (now - min(ts)).total_seconds()


def _metrics_endpoint(port: int | None) -> dict[str, Any]:
    """``run_poll``'s metrics arguments: no endpoint without a port; the host from ``$MICROSTRUCTURE_METRICS_HOST``
    (default loopback)."""
    if port is None:
        return {}
    from microstructure.jobs.metrics import endpoint_from_env

    return {"metrics_port": port, "metrics_host": endpoint_from_env()[1]}


@task(name="build-check-publish", retries=1)
def build_task(data_dir: str, dates: list[str]) -> list[dict[str, Any]]:
    from microstructure.checks.ge import Checker

    paths = LakePaths(Path(data_dir))
    days = [dt.date.fromisoformat(d) for d in dates] or None
    return [r.as_dict() for r in build_and_publish(paths, days, Checker(paths.data_dir / "gx"))]


@task(name="compact")
def compact_task(data_dir: str, dates: list[str]) -> dict[str, list[int]]:
    days = [dt.date.fromisoformat(d) for d in dates] or None
    return {k: list(v) for k, v in compact_all(LakePaths(Path(data_dir)), days).items()}


@task(name="record-built")
def record_task(data_dir: str, dates: list[str]) -> None:
    """After build and compaction: the dates' fingerprints into the manifest, so the nightly rebuild skips them."""
    write_manifest(LakePaths(Path(data_dir)), [dt.date.fromisoformat(d) for d in dates])


@task(name="rebuild-changed", retries=1)
def rebuild_changed_task(data_dir: str) -> list[dict[str, Any]]:
    """The nightly rebuild: build, check, publish and compact only the dates changed since their last build."""
    from prefect import get_run_logger

    from microstructure.checks.ge import Checker

    paths = LakePaths(Path(data_dir))
    res = rebuild(paths, make_checker=lambda: Checker(paths.data_dir / "gx"))
    get_run_logger().info("rebuilt %s", ", ".join(b.day.isoformat() for b in res.builds) or "nothing: no new data")
    return [b.as_dict() for b in res.builds]


@flow(name="poll-order-books", retries=2, retry_delay_seconds=60)
def poll_flow(data_dir: str = "data", cycles: int | None = None, interval: float = 2.0, step: float = 2.0,
              symbols: int = 150, seed: int | None = None, source: str = "simulated",
              symbol_list: list[str] | None = None, sources_config: str | None = None,
              session: bool = True, metrics_port: int | None = None, log_format: str | None = None
              ) -> dict[str, Any]:
    """Poll today's exchange session (open to close from the exchange calendar, half days included), then
    build and publish the day's features. On a day without a session it returns at once with the reason.
    ``session=False`` polls ``cycles`` cycles instead (crypto, tests). ``source``: simulated, or polygon /
    alpaca / databento / ccxt / chain (keys from the environment). ``metrics_port`` (default
    ``$MICROSTRUCTURE_METRICS_PORT``, else none): serve the poll's Prometheus metrics there while it polls
    (docs/operations.md). ``log_format`` (default ``$MICROSTRUCTURE_LOG_FORMAT``, else none): ``json`` or ``text``
    poll lines on the worker's stderr (docs/operations.md, "Logs"); the run log and the artifacts
    ``poll-progress``/``poll-health`` show progress either way."""
    with run_warnings():
        return _poll_flow(data_dir, cycles, interval, step, symbols, seed, source, symbol_list, sources_config,
                          session, metrics_port, log_format)


def _poll_flow(data_dir: str, cycles: int | None, interval: float, step: float, symbols: int, seed: int | None,
               source: str, symbol_list: list[str] | None, sources_config: str | None, session: bool,
               metrics_port: int | None, log_format: str | None) -> dict[str, Any]:
    import os

    from prefect import get_run_logger

    from microstructure.contract.calendar import await_session
    from microstructure.jobs.logs import LOG_FORMAT_ENV, log_format_from
    from microstructure.jobs.metrics import endpoint_from_env

    # Checked before the wait for the open (as `poll` checks them): a typo in the worker's environment fails the
    # run when it starts, not at the open, hours later, and again at each retry.
    port = metrics_port if metrics_port is not None else endpoint_from_env()[0]
    fmt = log_format or os.environ.get(LOG_FORMAT_ENV)
    checked_format = log_format_from(fmt) if fmt else None
    until = None
    if session:
        end = await_session(on_wait=lambda start: get_run_logger().info("waiting for the open at %s", start))
        if isinstance(end, str):  # a holiday, a weekend, or the session is over: not a failure
            get_run_logger().info("nothing to poll: %s", end)
            return {"polled": False, "reason": end}
        until = end.isoformat()
    # One writer per data dir: a second poll or build of this data dir queues behind this one.
    with datadir.writer(Path(data_dir), wait=True):
        stats = poll_task(data_dir, cycles, interval, step, symbols, seed, fresh=False, source=source,
                          symbol_list=symbol_list, sources_config=sources_config, until=until,
                          metrics_port=port, log_format=checked_format)
        builds = build_task(data_dir, stats["dates"])
        compact_task(data_dir, stats["dates"])
        record_task(data_dir, stats["dates"])
    _session_artifact(stats, builds)
    return stats


def _session_artifact(stats: dict[str, Any], builds: list[dict[str, Any]]) -> None:
    """A markdown summary of the session on the flow run (Prefect UI: Artifacts)."""
    from prefect.artifacts import create_markdown_artifact

    cov = stats["coverage"]
    rows = [("cycles", stats["cycles"]), ("skipped slots (overruns)", stats["skipped_slots"]),
            ("snapshots written", stats["written"]), ("duplicates skipped", stats["duplicates"]),
            ("quarantined", sum(stats["quarantined"].values())),
            ("L2 / shallow / L1 only / none", f"{cov['l2']} / {cov['shallow']} / {cov['l1_only']} / {cov['none']}"),
            ("online rows pushed", stats["online_pushed"]),
            ("online batches rejected", sum(stats["online_rejected"].values())),
            ("poll seconds", stats["seconds"])]
    md = ["# Poll session", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
          "| date | snapshots | features | published | reasons |", "|---|---|---|---|---|",
          *[f"| {b['date']} | {b['snapshots']} | {b['features']} | {b['published']} | "
            f"{'; '.join(b['reasons']) or '-'} |" for b in builds]]
    if stats["missing"]:
        md += ["", "Missing symbol-polls by reason: " + ", ".join(f"{k} {v}" for k, v in stats["missing"].items())]
    create_markdown_artifact(key="poll-session", markdown="\n".join(md), description="Poll session summary")


@flow(name="build-features")
def build_features_flow(data_dir: str = "data", dates: list[str] | None = None) -> list[dict[str, Any]]:
    """The nightly rebuild. Without ``dates``: only the dates whose partitions changed since their last build
    (the manifest, docs/prefect.md); a night without new data does nothing. With ``dates``: those dates."""
    with run_warnings(), datadir.writer(Path(data_dir), wait=True, create=False):
        if not dates:
            return rebuild_changed_task(data_dir)
        res = build_task(data_dir, dates)
        compact_task(data_dir, dates)
        record_task(data_dir, dates)
    return res


@flow(name="microstructure-run")
def main_flow(data_dir: str = "data", cycles: int = 300, interval: float = 0.0, step: float = 2.0,
              symbols: int = 150, seed: int | None = None, fresh: bool = False) -> dict[str, Any]:
    """The main job: poll the simulated source, build, check, publish, compact; returns the run summary."""
    with run_warnings():
        with datadir.writer(Path(data_dir), wait=True):
            stats = poll_task(data_dir, cycles, interval, step, symbols, seed, fresh=fresh)
            builds = build_task(data_dir, stats["dates"])
            compacted = compact_task(data_dir, stats["dates"])
            record_task(data_dir, stats["dates"])
        return {"poll": stats, "builds": builds, "compacted": compacted, "symbols": symbols,
                **runner.online_sample(Path(data_dir).resolve(), stats["online_symbols"])}
