"""Serve the poller on a schedule: one long-running run per US session (09:30 America/New_York, Mon-Fri);
the flow itself asks the exchange calendar whether there is a session today and when it closes.

    python -m microstructure.flows.serve --data-dir /srv/microstructure/data

The sub-10-second cadence is the flow's inner loop (``interval``), not the schedule.
"""

from __future__ import annotations

import argparse

from prefect import serve
from prefect.schedules import Cron

from microstructure.flows.pipeline import build_features_flow, poll_flow


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="data")
    args = ap.parse_args()
    poller = poll_flow.to_deployment(
        name="us-session-served",  # prefect.yaml's deployments (for workers) keep the plain names
        schedules=[Cron("30 9 * * 1-5", timezone="America/New_York")],
        parameters={"data_dir": args.data_dir, "session": True, "interval": 2.0},
        concurrency_limit=1,
    )
    nightly = build_features_flow.to_deployment(
        name="nightly-rebuild-served", schedules=[Cron("30 17 * * 1-5", timezone="America/New_York")],
        parameters={"data_dir": args.data_dir},
        concurrency_limit=1,
    )
    serve(poller, nightly)


if __name__ == "__main__":
    main()
