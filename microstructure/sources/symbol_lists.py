"""Explicit symbol lists (``--symbol``, ``--symbols-file``, a group's ``symbols`` in the sources file): capped in
count and length, and, for a list sent to a vendor, holding only characters a vendor symbol has.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from microstructure.sources.vendor import ConfigError

# An explicit symbol list: a few thousand at most in practice (the whole US market, ~10,000 tickers, comes from
# `--source polygon-market`, which builds its own list). Vendors take a batch of symbols as one comma-separated
# parameter, so a symbol sent to one holds no separator, space or control character.
MAX_SYMBOLS = 20_000
MAX_SYMBOL_CHARS = 32  # OCC option tickers, the longest a vendor spells, have 21
SYMBOLS_FILE_BYTES = 4 << 20  # 20,000 symbols with room for comments
_VENDOR_SYMBOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9./:_-]*")  # AAPL, BRK.B, BTC/USD, X:BTCUSD, O:SPY...


def check_symbols(symbols: Sequence[str], what: str = "symbol list", vendor: bool = True) -> list[str]:
    """``symbols`` without repeats, or ConfigError (one line) when there are more than ``MAX_SYMBOLS``, one is
    empty or longer than ``MAX_SYMBOL_CHARS``, or (``vendor``: the list goes to a vendor) one holds a character
    no vendor symbol has."""
    out = list(dict.fromkeys(symbols))
    if len(out) > MAX_SYMBOLS:
        raise ConfigError(f"{what}: {len(out):,} symbols; an explicit list holds at most {MAX_SYMBOLS:,} "
                          "(for every US stock use --source polygon-market)")
    for s in out:
        if not s or len(s) > MAX_SYMBOL_CHARS:
            shown = repr(s) if len(s) <= 40 else f"{s[:37]!r}..."
            raise ConfigError(f"{what}: symbol {shown} is {len(s)} characters long; a symbol has 1 to "
                              f"{MAX_SYMBOL_CHARS}")
        if vendor and not _VENDOR_SYMBOL.fullmatch(s):
            raise ConfigError(f"{what}: symbol {s!r} holds a character no vendor symbol has (letters, digits and "
                              ". / : _ - only)")
    return out


def read_symbols_file(path: Path, vendor: bool = True) -> list[str]:
    """One symbol per line (or comma-separated); ``#`` starts a comment. Read line by line within
    ``SYMBOLS_FILE_BYTES``; the symbols are checked by :func:`check_symbols`."""
    if not path.is_file():
        raise ConfigError(f"symbols file not found: {path}")
    what = f"symbols file {path}"
    if path.stat().st_size > SYMBOLS_FILE_BYTES:
        raise ConfigError(f"{what} is larger than {SYMBOLS_FILE_BYTES >> 20} MiB; an explicit list holds at most "
                          f"{MAX_SYMBOLS:,} symbols (for every US stock use --source polygon-market)")
    out: dict[str, None] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.split("#", 1)[0]
                out.update((s, None) for s in line.replace(",", " ").split())
                if len(out) > MAX_SYMBOLS:
                    break  # check_symbols names the cap
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text") from None
    return check_symbols(list(out), what, vendor)
