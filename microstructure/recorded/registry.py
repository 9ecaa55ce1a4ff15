"""The recorded formats ``backfill`` reads: one entry per format, its ``--format`` name and its reader.

Every reader takes the same three things (the files, the sampling cadence in seconds, the ``--symbol`` values in
the order given, maybe none: ``--symbol`` repeats) and yields ``recorded.batch.Batch``es, lazily: nothing is read
before the first batch is asked for. What several ``--symbol`` values mean is the format's: they select
(iex-deep, dbn), rename file by file (wide, lobster), or are refused (one stream: binance-depth,
hyperliquid-l2). The command line's ``--format`` choices are this registry's names, in this order.

A reader module is imported when its format is read, not when the registry is: the command line builds its
choices from this list at start-up, and ``--help`` must not load pandas or pyarrow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microstructure.recorded.batch import Batch

Reader = Callable[[list[Path], float, list[str]], Iterator["Batch"]]  # (files, cadence_s, symbols) -> Batches


def _per_file(files: list[Path], symbols: list[str], fmt: str) -> list[str | None]:
    """The symbol that replaces each file's own: none given keeps them; one renames every file; as many as the
    files pair up in order. Any other count is an error (a silent pairing would mislabel books)."""
    from microstructure.recorded.bounds import FileFormatError

    if not symbols:
        return [None] * len(files)
    if len(symbols) == 1:
        return [symbols[0]] * len(files)
    if len(symbols) != len(files):
        raise FileFormatError(f"--format {fmt}: {len(symbols)} --symbol values for {len(files)} files: give one "
                              "(every file) or one per file, in the files' order")
    return list(symbols)


def _one(symbols: list[str], fmt: str) -> str | None:
    """The one symbol of a format that reads its files as one stream: at most one ``--symbol``."""
    from microstructure.recorded.bounds import FileFormatError

    if len(symbols) > 1:
        raise FileFormatError(f"--format {fmt} reads its files as one stream of one instrument: give at most one "
                              f"--symbol (got {len(symbols)})")
    return symbols[0] if symbols else None


def _snapshots(files: list[Path], cadence_s: float, symbols: list[str]) -> Iterator[Batch]:
    """Our own snapshot Parquet files (or lake folders), each in turn; every book kept, each with its symbol
    (``--symbol`` does not apply)."""
    from microstructure.recorded.snapshots import read_snapshot_file

    for f in files:
        yield from read_snapshot_file(f)


def _wide(files: list[Path], cadence_s: float, symbols: list[str]) -> Iterator[Batch]:
    """Wide CSV / Parquet tables, each in turn; every row kept; ``--symbol`` replaces the file's (one for every
    file, or one per file in order)."""
    from microstructure.recorded.wide import read_wide

    for f, symbol in zip(files, _per_file(files, symbols, "wide"), strict=True):
        yield from read_wide(f, symbol)


def _lobster(files: list[Path], cadence_s: float, symbols: list[str]) -> Iterator[Batch]:
    """LOBSTER message + orderbook pairs (a file of the pair, or its folder), each sampled at the cadence;
    ``--symbol`` replaces the one in the file name (one for every pair, or one per pair in order)."""
    from microstructure.recorded.lobster import iter_lobster

    for f, symbol in zip(files, _per_file(files, symbols, "lobster"), strict=True):
        yield from iter_lobster(f, cadence_s, symbol)


def _iex_deep(files: list[Path], cadence_s: float, symbols: list[str]) -> Iterator[Batch]:
    """IEX DEEP captures, each sampled at the cadence; ``--symbol`` keeps those symbols only (every one given)."""
    from microstructure.recorded.iex_deep import iter_iex_deep

    for f in files:
        yield from iter_iex_deep(f, cadence_s, set(symbols) or None)


def _binance_depth(files: list[Path], cadence_s: float, symbols: list[str]) -> Iterator[Batch]:
    """The files of one continuous Binance depth recording, replayed as one stream and sampled at the cadence;
    ``--symbol`` (at most one) replaces Binance's."""
    from microstructure.recorded.binance import read_binance_depth

    yield from read_binance_depth(files, cadence_s, _one(symbols, "binance-depth"))


def _hyperliquid_l2(files: list[Path], cadence_s: float, symbols: list[str]) -> Iterator[Batch]:
    """Hyperliquid ``l2Book`` recordings, read as one stream and sampled at the cadence; ``--symbol`` (at most
    one) replaces ``<coin>-PERP``."""
    from microstructure.recorded.hyperliquid import read_hyperliquid_l2

    yield from read_hyperliquid_l2(files, cadence_s, _one(symbols, "hyperliquid-l2"))


def _dbn(files: list[Path], cadence_s: float, symbols: list[str]) -> Iterator[Batch]:
    """Databento DBN files (MBP-10, MBP-1; zstd or plain), each in turn, sampled at the cadence; symbols from
    the file's mappings; ``--symbol`` keeps those symbols only (every one given)."""
    from microstructure.recorded.dbn import read_dbn

    yield from read_dbn(files, cadence_s, set(symbols) or None)


FORMATS: dict[str, Reader] = {
    "snapshots": _snapshots,
    "wide": _wide,
    "lobster": _lobster,
    "iex-deep": _iex_deep,
    "binance-depth": _binance_depth,
    "hyperliquid-l2": _hyperliquid_l2,
    "dbn": _dbn,
}
