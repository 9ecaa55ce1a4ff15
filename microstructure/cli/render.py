"""Printing for people: tables, progress and run summaries (data escaped, never markup).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from microstructure.cli.app import err, out
from microstructure.contract.text import dumps, text


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Any:
    """A table, numbers right-aligned at full precision; when it would not fit the terminal (80 columns
    included) it folds into a vertical layout: one block per row, a ``column  value`` line per column."""
    from rich.cells import cell_len
    from rich.console import Group
    from rich.text import Text

    from microstructure.contract.text import cell, is_numeric, visible

    # Data as data: titles, headers (a query's column names) and cells are Text, never parsed as markup, with
    # control characters shown escaped by ``cell`` / ``visible``.
    columns = [visible(str(c)) for c in columns]
    texts = [[cell(v) for v in r] for r in rows]
    numeric = [is_numeric([r[i] for r in rows]) for i in range(len(columns))]
    width = sum(max([cell_len(c), *(cell_len(t[i]) for t in texts)]) + 3 for i, c in enumerate(columns)) + 1
    if width <= out.width or len(columns) <= 2:
        t = Table(title=Text(visible(title), style="table.title") if title else None, title_justify="left")
        for c, num in zip(columns, numeric, strict=True):
            t.add_column(Text(c), justify="right" if num else "left", overflow="fold")
        for r in texts:
            t.add_row(*(Text(v) for v in r))
        return t
    name_w = max(cell_len(c) for c in columns)
    blocks: list[Any] = [Text(visible(title), style="italic")] if title else []
    for k, r in enumerate(texts):
        blocks.append(Text(f"-- {k + 1} " + "-" * max(0, min(out.width, 60) - 5 - len(str(k + 1))), style="dim"))
        blocks += [Text(c + " " * (name_w - cell_len(c)) + f"  {v}") for c, v in zip(columns, r, strict=True)]
    return Group(*blocks)


def _progress(total: int | None, label: str, enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err,
                 transient=True, disable=not enabled)
    return p


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _print_summary(summary: dict[str, Any], data_dir: Path, as_json: bool) -> None:
    if as_json:
        print(dumps(summary))
        return
    p = summary["poll"]
    rows = [
        ["symbols polled", summary.get("symbols")],
        ["cycles", p["cycles"]],
        ["snapshots written", p["written"]],
        ["duplicates skipped (stale quotes, re-runs)", p["duplicates"]],
        ["quarantined", sum(p["quarantined"].values())],
        *[[f"  - {r}", n] for r, n in sorted(p["quarantined"].items())],
        ["feature rows per symbol", summary["features_per_symbol"]],
        ["online rows pushed", p["online_pushed"]],
        *[[f"  online batch rejected: {r}", n] for r, n in p["online_rejected"].items()],
        ["poll seconds", p["seconds"]],
        ["symbols with L2 (>= 5 levels) / shallow / L1 only / none",
         " / ".join(str(p["coverage"][k]) for k in ("l2", "shallow", "l1_only", "none"))],
        *[[f"  served by {k}", n] for k, n in sorted(p["served_by"].items())],
        *[[f"  missing: {k}", n] for k, n in sorted(p["missing"].items())],
    ]
    out.print(_table(f"microstructure run  (data: {data_dir})", ["", "value"], rows))
    out.print(_table("feature batches", ["date", "snapshots", "features", "published", "reasons"],
                     [[b["date"], b["snapshots"], b["features"], b["published"], "; ".join(b["reasons"]) or "-"]
                      for b in summary["builds"]]))
    sample = summary["online_sample"]
    if sample:
        cols = ["symbol", "age_s", "stale", "spread_bps", "order_imbalance", "depth_imbalance", "depth_dollars",
                "book_levels", "has_recent_halt"]
        out.print(_table("online sample (Feast)", cols, [[r.get(c) for c in cols] for r in sample]))
    out.print(text(f"Data Docs: {summary['data_docs']}"))


def _emit(rows: list[dict[str, Any]], title: str, as_json: bool) -> None:
    if as_json:
        print(dumps(rows))
    elif rows:
        out.print(_table(title, list(rows[0].keys()), [list(r.values()) for r in rows]))
    else:
        out.print(text(f"{title}: nothing to do"))
