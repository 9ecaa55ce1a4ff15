"""How much of the universe has real depth: per source and overall, symbols with L2, shallow, L1 only, none.

A symbol's depth is the most levels (on its thinner side) any snapshot of it showed in the window, so a
symbol whose L2 book was briefly thin still counts as L2. "None" means the poller asked for the symbol
(``lake/outcomes``) and no source served it in the window. Backfilled files have snapshots but no
outcomes, so they show up with their true depth and never as "none".

Per cycle (from ``lake/outcomes``, one row per symbol and cycle): how many symbols each source served with L2 in
each poll cycle of the window, as the minimum, median and last over the cycles (a cycle in which a source served
nothing counts 0 for it), so a source that was L2 for every symbol once but thin most of the day is visible. Failed
calls are counted per source with the distinct symbols they failed for; a source that only failed still has a row.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from microstructure.lake.paths import LakePaths
from microstructure.lake.views import connect

L2_MIN_LEVELS = 5
BUCKETS = ("l2", "shallow", "l1_only", "none")
CYCLE_STATS = ("cycles", "l2_cycle_min", "l2_cycle_median", "l2_cycle_last")
ALL = "*"  # per_cycle's key for all sources together (symbols with L2 from any source, per cycle)


def _bucket(levels: int) -> str:
    if levels >= L2_MIN_LEVELS:
        return "l2"
    if levels > 1:
        return "shallow"
    return "l1_only" if levels == 1 else "none"


def coverage(paths: LakePaths, since: dt.datetime | None = None,
             until: dt.datetime | None = None) -> dict[str, Any]:
    """``{"window": ..., "sources": [{source, l2, shallow, l1_only, failed_calls, failed_symbols, cycles,
    l2_cycle_min, l2_cycle_median, l2_cycle_last, ...}], "overall": {...}, "all_sources_per_cycle": {cycles, ...}}``."""
    con = connect(paths)
    lo = since or dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    hi = until or dt.datetime(2262, 1, 1, tzinfo=dt.UTC)
    per = con.execute(
        "SELECT source, symbol, max(book_levels) AS lv, count(*) AS n FROM snapshots "
        "WHERE received_ts >= ? AND received_ts < ? GROUP BY ALL", [lo, hi]).fetchall()
    asked = {r[0] for r in con.execute(
        "SELECT DISTINCT symbol FROM outcomes WHERE cycle_ts >= ? AND cycle_ts < ?", [lo, hi]).fetchall()}
    # Only the sources tried (before " | "): after it come the vendor's own words, where "reason: forbidden" would
    # count as a source of ours (metrics.failed_calls splits the same way).
    failed = dict(con.execute(
        "SELECT split_part(m, ':', 1), count(*) FROM (SELECT unnest(regexp_extract_all(split_part(detail, ' | ', 1), "
        "'[A-Za-z0-9_.-]+: [a-z_]+')) AS m FROM outcomes WHERE cycle_ts >= ? AND cycle_ts < ?) "
        "WHERE m NOT LIKE '%: ok' GROUP BY 1", [lo, hi]).fetchall())
    failed_symbols = dict(con.execute(
        "SELECT split_part(m, ':', 1), count(DISTINCT symbol) FROM (SELECT symbol, "
        "unnest(regexp_extract_all(split_part(detail, ' | ', 1), "
        "'[A-Za-z0-9_.-]+: [a-z_]+')) AS m FROM outcomes WHERE cycle_ts >= ? AND cycle_ts < ?) "
        "WHERE m NOT LIKE '%: ok' GROUP BY 1", [lo, hi]).fetchall())
    cycles = per_cycle(con, lo, hi)
    sources: dict[str, dict[str, Any]] = {}

    # A source that was tried but never served: 0 symbols with L2 in every cycle. One seen only in backfilled
    # snapshots (no outcomes): no per-cycle figures.
    never_served = dict(zip(CYCLE_STATS, (cycles[ALL]["cycles"], 0, 0, 0), strict=True)) if ALL in cycles else {}

    def row_of(src: str) -> dict[str, Any]:
        per_cycle_stats = cycles.get(src) or (never_served if src in failed else {})
        return sources.setdefault(src, {"source": src, **dict.fromkeys(BUCKETS[:3], 0), "snapshots": 0,
                                        "failed_calls": int(failed.get(src, 0)),
                                        "failed_symbols": int(failed_symbols.get(src, 0)),
                                        **dict.fromkeys(CYCLE_STATS), **per_cycle_stats})

    best: dict[str, int] = dict.fromkeys(asked, 0)
    for src, sym, lv, n in per:
        row = row_of(src)
        row[_bucket(int(lv))] += 1
        row["snapshots"] += int(n)
        best[sym] = max(best.get(sym, 0), int(lv))
    for src in [*failed, *cycles]:  # a source that only failed, or served only shallow books, still shows
        if src != ALL:
            row_of(src)
    overall: dict[str, Any] = dict.fromkeys(BUCKETS, 0)
    for lv in best.values():
        overall[_bucket(lv)] += 1
    overall["symbols"] = len(best)
    overall["none_symbols"] = sorted(s for s, lv in best.items() if lv == 0)[:50]
    return {"window": {"since": since, "until": until}, "sources": sorted(sources.values(), key=lambda r: r["source"]),
            "overall": overall, "all_sources_per_cycle": cycles.get(ALL, dict.fromkeys(CYCLE_STATS))}


def per_cycle(con: Any, lo: dt.datetime, hi: dt.datetime) -> dict[str, dict[str, Any]]:
    """Source (and ``ALL``) -> cycles in the window and symbols served with L2 per cycle: min, median, last.

    Every (cycle, source) pair counts, 0 where the source served no symbol that cycle; "last" is the window's last
    cycle. A symbol is served by at most one source a cycle, so ``ALL`` sums the sources."""
    rows = con.execute(
        "WITH o AS (SELECT cycle_ts, source, book_levels FROM outcomes WHERE cycle_ts >= ? AND cycle_ts < ?), "
        "cyc AS (SELECT DISTINCT cycle_ts FROM o), "
        "src AS (SELECT DISTINCT source FROM o WHERE source IS NOT NULL), "
        "served AS (SELECT cycle_ts, source, count(*) FILTER (WHERE book_levels >= ?) AS l2 FROM o "
        "  WHERE source IS NOT NULL GROUP BY ALL), "
        "grid AS (SELECT c.cycle_ts, s.source, coalesce(x.l2, 0) AS l2 FROM cyc c CROSS JOIN src s "
        "  LEFT JOIN served x ON x.cycle_ts = c.cycle_ts AND x.source = s.source "
        "  UNION ALL SELECT c.cycle_ts, ?, coalesce(sum(x.l2), 0) FROM cyc c LEFT JOIN served x "
        "  ON x.cycle_ts = c.cycle_ts GROUP BY c.cycle_ts) "
        "SELECT source, count(*), min(l2), quantile_disc(l2, 0.5), arg_max(l2, cycle_ts) FROM grid GROUP BY source",
        [lo, hi, L2_MIN_LEVELS, ALL]).fetchall()
    return {src: dict(zip(CYCLE_STATS, (int(n), int(mn), int(med), int(last)), strict=True))
            for src, n, mn, med, last in rows}


def cycle_coverage(outcomes: Any) -> dict[str, dict[str, int]]:
    """One cycle's outcomes (``contract.outcomes``) -> per serving source, its symbols by depth (l2, shallow,
    l1_only); the symbols nobody served under source ``none``, depth ``none``."""
    res: dict[str, dict[str, int]] = {}
    for src, lv, err in zip(*(outcomes.column(c).to_pylist() for c in ("source", "book_levels", "error_class")),
                            strict=True):
        served = err is None and bool(src)
        row = res.setdefault(src if served else "none", dict.fromkeys(BUCKETS, 0))
        row[_bucket(int(lv or 0)) if served else "none"] += 1
    return res
