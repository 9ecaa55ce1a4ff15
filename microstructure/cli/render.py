"""Printing for people: tables, progress and run summaries (data escaped, never markup).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from rich.table import Table

from microstructure.cli.app import err, out
from microstructure.contract.text import dumps, text

# Units of the columns a table may hold: each feature's declared unit (transforms/features.sql; "none" when it
# declares none), and the age the online read adds. Formatting follows the unit (text.UNIT_FORMATS).
_EXTRA_UNITS = {"age_s": "s"}


@cache
def _units() -> dict[str, str]:
    from microstructure.contract.schemas import DECLARATION

    return {**{c.name: c.unit or "none" for c in DECLARATION.features}, **_EXTRA_UNITS}


def _table(title: str, columns: list[str], rows: list[list[Any]], transpose: bool = False) -> Any:
    """A table for a person: numbers formatted by their column's unit (``_units``; other numbers at most 6
    decimals), right-aligned, data shown as data. Three layouts, the first that fits the terminal (80 columns
    included): one line per row; with ``transpose`` (rows are entities, say symbols), one column per row and a
    line per column; else one block per row, a ``column  value`` line per column."""
    from rich.cells import cell_len
    from rich.console import Group
    from rich.text import Text

    from microstructure.contract.text import formatted, is_numeric, visible

    units = _units()
    # Data as data: titles, headers (a query's column names) and cells are Text, never parsed as markup, with
    # control characters shown escaped by ``cell`` / ``visible``.
    texts = [[formatted(v, units.get(str(c))) for c, v in zip(columns, r, strict=True)] for r in rows]
    columns = [visible(str(c)) for c in columns]
    numeric = [is_numeric([r[i] for r in rows]) for i in range(len(columns))]

    def width(heads: list[str], body: list[list[str]]) -> int:  # Rich's default box: "│ x " per column, and "│"
        return sum(max([cell_len(h), *(cell_len(t[i]) for t in body)]) + 3 for i, h in enumerate(heads)) + 1

    def table(heads: list[str], body: list[list[str]], right: list[bool]) -> Any:
        t = Table(title=Text(visible(title), style="table.title") if title else None, title_justify="left")
        for h, r in zip(heads, right, strict=True):
            t.add_column(Text(h), justify="right" if r else "left", overflow="fold")
        for b in body:
            t.add_row(*(Text(v) for v in b))
        return t

    if width(columns, texts) <= out.width or len(columns) <= 2:
        return table(columns, texts, numeric)
    if transpose and texts:
        heads = [columns[0], *(t[0] for t in texts)]
        body = [[c, *(t[i] for t in texts)] for i, c in enumerate(columns) if i > 0]
        if width(heads, body) <= out.width:
            return table(heads, body, [False] + [True] * len(texts))
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
        out.print(_table("online sample (Feast)", cols, [[r.get(c) for c in cols] for r in sample], transpose=True))
    out.print(text(f"Data Docs: {summary['data_docs']}"))


def _emit(rows: list[dict[str, Any]], title: str, as_json: bool) -> None:
    if as_json:
        print(dumps(rows))
    elif rows:
        out.print(_table(title, list(rows[0].keys()), [list(r.values()) for r in rows]))
    else:
        out.print(text(f"{title}: nothing to do"))
