"""Reading what a user hands us: one error type for bad input, and whole-file reads with bounds.

``InputError`` is what the CLI turns into one ``error:`` line and exit 2. ``read_frame`` reads a small table (picks,
JSON entity rows) whole, refusing it before it is expanded past its row and byte bounds.
"""

from __future__ import annotations

from collections.abc import Callable
from io import BufferedIOBase
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import pandas as pd


class InputError(ValueError):
    """A file or value the user gave cannot be used; the message says why in plain words (exit code 2)."""


FRAME_MAX_ROWS = 1_000_000  # rows of a file read whole (picks and JSON entity files pass their own)
FRAME_MAX_BYTES = 256 << 20  # its size once decompressed
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}


def _bounded_bytes(path: Path, what: str, max_bytes: int) -> bytes:
    """The file's bytes, decompressed (gzip, bz2, xz: told by their magic bytes, whatever the name) while
    counting: InputError as soon as they pass ``max_bytes``, so a small bomb never expands in memory."""
    import bz2
    import gzip
    import lzma

    with open(path, "rb") as fh:
        magic = fh.read(6)
    kind = next((k for m, k in _MAGIC.items() if magic.startswith(m)), None)
    if kind in ("zstd", "zip"):
        raise InputError(f"{what} file {path} is {kind}-compressed; use plain, gzip, bz2 or xz")
    # Each opener gives a buffered binary stream (GzipFile, BZ2File, LZMAFile, BufferedReader).
    openers: dict[str, Callable[[Path, Literal["rb"]], BufferedIOBase]] = {
        "gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}
    opener = openers.get(kind or "", open)
    chunks, size = [], 0
    with opener(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                raise InputError(f"{what} file {path} is larger than {max_bytes >> 20:,} MiB"
                                 f"{' decompressed' if kind else ''} (the cap for a {what} file)")
            chunks.append(chunk)
    return b"".join(chunks)


def read_frame(path: Path, what: str, max_rows: int = FRAME_MAX_ROWS, max_bytes: int = FRAME_MAX_BYTES
               ) -> pd.DataFrame:
    """A CSV (optionally gzipped), JSON or Parquet file as a DataFrame, or InputError in plain words.

    Bounded before anything is parsed: at most ``max_bytes`` decompressed (counted while decompressing) and
    ``max_rows`` rows (lines counted in the bytes; a Parquet file's row count and size read from its footer)."""
    import io
    import lzma
    import zlib

    import pandas as pd
    import pyarrow as pa

    if not path.is_file():
        raise InputError(f"no such {what} file: {path}")
    name = path.name.lower()
    too_many = f"{what} file {path} has more than {max_rows:,} rows (the cap for a {what} file)"
    try:
        if name.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            if meta.num_rows > max_rows:
                raise InputError(too_many)
            size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            if size > max_bytes:
                raise InputError(f"{what} file {path} holds {size >> 20:,} MiB of data; the cap for a {what} file "
                                 f"is {max_bytes >> 20:,} MiB")
            df = pd.read_parquet(path)
        else:
            data = _bounded_bytes(path, what, max_bytes)
            if name.endswith((".json", ".json.gz")):
                df = pd.read_json(io.BytesIO(data))
            else:
                # Lines bound the rows (a quoted field may hold a line break: counted as a row, on the safe side).
                if data.count(b"\n") - data.endswith(b"\n") > max_rows:
                    raise InputError(too_many)
                df = pd.read_csv(io.BytesIO(data))
            del data
    except pd.errors.EmptyDataError:
        raise InputError(f"{what} file {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"{what} file {path} is not readable CSV: {str(e).splitlines()[0]}") from None
    except (EOFError, zlib.error, lzma.LZMAError, OSError) as e:
        raise InputError(f"{what} file {path} is truncated or not what its name says ({type(e).__name__})") from None
    except (pa.ArrowInvalid, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{what} file {path} cannot be read: {str(e).splitlines()[0]}") from None
    if df.empty:
        raise InputError(f"{what} file {path} has no rows")
    if len(df) > max_rows:
        raise InputError(too_many)
    return df
