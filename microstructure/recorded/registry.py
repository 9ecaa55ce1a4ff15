"""The recorded formats ``backfill`` reads: one entry per format, its ``--format`` name and its reader.

Every reader takes the same three things (the files, the sampling cadence in seconds, the ``--symbol`` or None)
and yields ``recorded.batch.Batch``es, lazily: nothing is read before the first batch is asked for. The command
line's ``--format`` choices are this registry's names, in this order.

A reader module is imported when its format is read, not when the registry is: the command line builds its
choices from this list at start-up, and ``--help`` must not load pandas or pyarrow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microstructure.recorded.batch import Batch

Reader = Callable[[list[Path], float, str | None], Iterator["Batch"]]  # (files, cadence_s, symbol) -> Batches


def _snapshots(files: list[Path], cadence_s: float, symbol: str | None) -> Iterator[Batch]:
    """Our own snapshot Parquet files (or lake folders), each in turn; every book kept, each with its symbol."""
    from microstructure.recorded.snapshots import read_snapshot_file

    for f in files:
        yield from read_snapshot_file(f)


def _wide(files: list[Path], cadence_s: float, symbol: str | None) -> Iterator[Batch]:
    """Wide CSV / Parquet tables, each in turn; every row kept; ``symbol`` replaces the file's."""
    from microstructure.recorded.wide import read_wide

    for f in files:
        yield from read_wide(f, symbol)


def _lobster(files: list[Path], cadence_s: float, symbol: str | None) -> Iterator[Batch]:
    """LOBSTER message + orderbook pairs (a file of the pair, or its folder), each sampled at the cadence;
    ``symbol`` replaces the one in the file name."""
    from microstructure.recorded.lobster import iter_lobster

    for f in files:
        yield from iter_lobster(f, cadence_s, symbol)


def _iex_deep(files: list[Path], cadence_s: float, symbol: str | None) -> Iterator[Batch]:
    """IEX DEEP captures, each sampled at the cadence; ``symbol`` keeps that symbol only."""
    from microstructure.recorded.iex_deep import iter_iex_deep

    for f in files:
        yield from iter_iex_deep(f, cadence_s, {symbol} if symbol else None)


def _binance_depth(files: list[Path], cadence_s: float, symbol: str | None) -> Iterator[Batch]:
    """The files of one continuous Binance depth recording, replayed as one stream and sampled at the cadence;
    ``symbol`` replaces Binance's."""
    from microstructure.recorded.binance import read_binance_depth

    yield from read_binance_depth(files, cadence_s, symbol)


def _hyperliquid_l2(files: list[Path], cadence_s: float, symbol: str | None) -> Iterator[Batch]:
    """Hyperliquid ``l2Book`` recordings, read as one stream and sampled at the cadence; ``symbol`` replaces
    ``<coin>-PERP``."""
    from microstructure.recorded.hyperliquid import read_hyperliquid_l2

    yield from read_hyperliquid_l2(files, cadence_s, symbol)


FORMATS: dict[str, Reader] = {
    "snapshots": _snapshots,
    "wide": _wide,
    "lobster": _lobster,
    "iex-deep": _iex_deep,
    "binance-depth": _binance_depth,
    "hyperliquid-l2": _hyperliquid_l2,
}
