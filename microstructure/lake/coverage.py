"""How much of the universe has real depth: per source and overall, symbols with L2, shallow, L1 only, none.

A symbol's depth is the most levels (on its thinner side) any snapshot of it showed in the window, so a
symbol whose L2 book was briefly thin still counts as L2. "None" means the poller asked for the symbol
(``lake/outcomes``) and no source served it in the window. Backfilled files have snapshots but no
outcomes, so they show up with their true depth and never as "none".
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from microstructure.lake.paths import LakePaths
from microstructure.lake.views import connect

L2_MIN_LEVELS = 5
BUCKETS = ("l2", "shallow", "l1_only", "none")


def _bucket(levels: int) -> str:
    if levels >= L2_MIN_LEVELS:
        return "l2"
    if levels > 1:
        return "shallow"
    return "l1_only" if levels == 1 else "none"


def coverage(paths: LakePaths, since: dt.datetime | None = None,
             until: dt.datetime | None = None) -> dict[str, Any]:
    """``{"window": ..., "sources": [{source, l2, shallow, l1_only, failed, ...}], "overall": {...}}``."""
    con = connect(paths)
    lo = since or dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    hi = until or dt.datetime(2262, 1, 1, tzinfo=dt.UTC)
    per = con.execute(
        "SELECT source, symbol, max(book_levels) AS lv, count(*) AS n FROM snapshots "
        "WHERE received_ts >= ? AND received_ts < ? GROUP BY ALL", [lo, hi]).fetchall()
    asked = {r[0] for r in con.execute(
        "SELECT DISTINCT symbol FROM outcomes WHERE cycle_ts >= ? AND cycle_ts < ?", [lo, hi]).fetchall()}
    failed = dict(con.execute(
        "SELECT split_part(m, ':', 1), count(*) FROM (SELECT unnest(regexp_extract_all(detail, "
        "'[A-Za-z0-9_.-]+: [a-z_]+')) AS m FROM outcomes WHERE cycle_ts >= ? AND cycle_ts < ?) "
        "WHERE m NOT LIKE '%: ok' GROUP BY 1", [lo, hi]).fetchall())
    sources: dict[str, dict[str, Any]] = {}
    best: dict[str, int] = dict.fromkeys(asked, 0)
    for src, sym, lv, n in per:
        row = sources.setdefault(src, {"source": src, **dict.fromkeys(BUCKETS[:3], 0), "snapshots": 0,
                                       "failed_calls": int(failed.get(src, 0))})
        row[_bucket(int(lv))] += 1
        row["snapshots"] += int(n)
        best[sym] = max(best.get(sym, 0), int(lv))
    overall: dict[str, Any] = dict.fromkeys(BUCKETS, 0)
    for lv in best.values():
        overall[_bucket(lv)] += 1
    overall["symbols"] = len(best)
    overall["none_symbols"] = sorted(s for s, lv in best.items() if lv == 0)[:50]
    return {"window": {"since": since, "until": until}, "sources": sorted(sources.values(), key=lambda r: r["source"]),
            "overall": overall}
