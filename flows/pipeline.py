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

import datetime as dt
import time
import warnings
from pathlib import Path
from typing import Any

from prefect import flow, task

from microstructure.jobs import runner
from microstructure.jobs.build import build_and_publish, compact_all, rebuild, write_manifest
from microstructure.jobs.poll import PollStats
from microstructure.lake import datadir
from microstructure.lake.paths import LakePaths

# Libraries' deprecation notices (GE, Feast) are not the run's warnings: keep them out of the run's log.
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
PROGRESS_EVERY_S = 300.0  # the run log gets a progress line this often


@task(name="poll-cycles")
def poll_task(data_dir: str, cycles: int | None, interval: float, step: float, symbols: int, seed: int | None,
              fresh: bool, online: bool = True, source: str = "simulated", symbol_list: list[str] | None = None,
              sources_config: str | None = None, until: str | None = None,
              metrics_port: int | None = None) -> dict[str, Any]:
    # Vendor keys are read from the environment inside the source; they are never task parameters, so
    # they never reach Prefect's stored parameters, results or logs.
    from prefect import get_run_logger

    log = get_run_logger()
    last = [time.monotonic()]

    def progress(i: int, s: PollStats) -> None:
        if time.monotonic() - last[0] < PROGRESS_EVERY_S:
            return
        last[0] = time.monotonic()
        age = None
        if s.last_features is not None and s.last_features.num_rows:
            newest = max(s.last_features.column("event_ts").to_pylist())
            age = (dt.datetime.now(dt.UTC) - newest).total_seconds()
        log.info("cycle %d: %d snapshots written, coverage %s, quarantined %d, missing %d, skipped slots %d, "
                 "newest online book %s s old", i + 1, s.written, s.coverage(), sum(s.quarantined.values()),
                 sum(s.missing.values()), s.skipped_slots, "?" if age is None else f"{age:.1f}")

    stats = runner.run_poll(Path(data_dir).resolve(), cycles, interval, step, symbols, seed, fresh, online,
                        source_kind=source, symbol_list=symbol_list,
                        sources_config=Path(sources_config) if sources_config else None,
                        until=dt.datetime.fromisoformat(until) if until else None, on_cycle=progress,
                        **_metrics_endpoint(metrics_port))
    d = stats.as_dict()
    d["online_symbols"] = [] if stats.last_features is None else stats.last_features.column("symbol").to_pylist()
    return d


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
              session: bool = True, metrics_port: int | None = None) -> dict[str, Any]:
    """Poll today's exchange session (open to close from the exchange calendar, half days included), then
    build and publish the day's features. On a day without a session it returns at once with the reason.
    ``session=False`` polls ``cycles`` cycles instead (crypto, tests). ``source``: simulated, or polygon /
    alpaca / databento / chain (keys from the environment). ``metrics_port`` (default
    ``$MICROSTRUCTURE_METRICS_PORT``, else none): serve the poll's Prometheus metrics there while it polls
    (docs/operations.md)."""
    from prefect import get_run_logger

    from microstructure.contract.calendar import await_session
    from microstructure.jobs.metrics import endpoint_from_env

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
                          metrics_port=metrics_port if metrics_port is not None else endpoint_from_env()[0])
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
    with datadir.writer(Path(data_dir), wait=True, create=False):
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
    with datadir.writer(Path(data_dir), wait=True):
        stats = poll_task(data_dir, cycles, interval, step, symbols, seed, fresh=fresh)
        builds = build_task(data_dir, stats["dates"])
        compacted = compact_task(data_dir, stats["dates"])
        record_task(data_dir, stats["dates"])
    return {"poll": stats, "builds": builds, "compacted": compacted, "symbols": symbols,
            **runner.online_sample(Path(data_dir).resolve(), stats["online_symbols"])}
