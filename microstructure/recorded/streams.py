"""Bounded reading of a recorded file: its bytes (decompressed when gzip or zstd, and counted), its lines, and its
Parquet row groups. Past a bound (``recorded.bounds``) the read stops with a FileFormatError before it holds more.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from microstructure.recorded.batch import positions
from microstructure.recorded.bounds import (
    BATCH_ROWS,
    DECOMPRESSED_FLOOR,
    MAX_COMPRESSION_RATIO,
    MAX_DECOMPRESSED_BYTES,
    MAX_LINE_BYTES,
    MAX_ROW_GROUP_BYTES,
    FileFormatError,
    MiB,
    why,
)

_READ = MiB  # bytes per read of a stream
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
_UNSUPPORTED = {b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"PK\x03\x04": "zip"}


class BoundedStream:
    """A file's bytes, decompressed when it is gzip or zstd (told by its first bytes, whatever its name), with
    the decompressed bytes counted: past the file's bound the read stops with a FileFormatError."""

    def __init__(self, path: Path) -> None:
        self.name = path.name
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                head = fh.read(4)
        except OSError as e:
            raise FileFormatError(f"{path.name}: cannot read it ({e.strerror or why(e)})") from None
        self.codec = next((c for m, c in _MAGIC.items() if head.startswith(m)), None)
        other = next((c for m, c in _UNSUPPORTED.items() if head.startswith(m)), None)
        if other:
            raise FileFormatError(f"{path.name}: compressed with {other}; backfill reads plain, gzip or zstd files")
        self.limit = (min(MAX_DECOMPRESSED_BYTES, max(DECOMPRESSED_FLOOR, MAX_COMPRESSION_RATIO * size))
                      if self.codec else None)
        self.count = 0
        try:
            self._fh: Any = (pa.CompressedInputStream(pa.OSFile(str(path)), self.codec) if self.codec
                             else open(path, "rb"))  # noqa: SIM115 - closed in close()
        except (OSError, pa.ArrowException) as e:
            raise FileFormatError(f"{path.name}: cannot read it ({why(e)})") from None

    def read(self, n: int = _READ) -> bytes:
        try:
            data = self._fh.read(n)
        except (OSError, pa.ArrowException, EOFError) as e:
            raise FileFormatError(f"{self.name}: cannot read the {self.codec or 'file'} stream after "
                                  f"{self.count:,} bytes ({why(e)})") from None
        self.count += len(data)
        if self.limit is not None and self.count > self.limit:
            raise FileFormatError(
                f"{self.name}: decompresses to more than {self.limit:,} bytes (MAX_COMPRESSION_RATIO "
                f"{MAX_COMPRESSION_RATIO}x its size, at least {DECOMPRESSED_FLOOR:,}, at most "
                f"{MAX_DECOMPRESSED_BYTES:,}): a compression bomb or not a recording; decompress it yourself "
                "to read it")
        return bytes(data)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> BoundedStream:
        return self

    def __exit__(self, *a: object) -> None:
        self.close()


def line_chunks(stream: BinaryIO | BoundedStream, name: str) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the first line, complete lines without their newline) as the stream is read. A line longer
    than MAX_LINE_BYTES stops the read before more of it is held."""
    pending = b""
    done = 0  # lines yielded so far
    while True:
        chunk = stream.read(_READ)
        if not chunk:
            break
        parts = (pending + chunk).split(b"\n") if pending else chunk.split(b"\n")
        pending = parts.pop()
        if parts and max(map(len, parts)) > MAX_LINE_BYTES:
            i = next(i for i, p in enumerate(parts) if len(p) > MAX_LINE_BYTES)
            _too_long(name, done + i + 1)
        if len(pending) > MAX_LINE_BYTES:
            _too_long(name, done + len(parts) + 1)
        if parts:
            yield done + 1, parts
            done += len(parts)
    if pending:
        yield done + 1, [pending]


def _too_long(name: str, line: int) -> None:
    raise FileFormatError(f"{name} line {line}: longer than {MAX_LINE_BYTES:,} bytes (MAX_LINE_BYTES): not a "
                          "recording this reader knows")


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a plain, gzip or zstd text file, bounded (see ``line_chunks``)."""
    with BoundedStream(path) as fh:
        for first, parts in line_chunks(fh, path.name):
            for i, line in enumerate(parts):
                yield first + i, line



def open_parquet(path: Path) -> pq.ParquetFile:
    """The Parquet file, refused when unreadable or when a row group (read as a unit) passes MAX_ROW_GROUP_BYTES."""
    try:
        pf = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise FileFormatError(f"{path.name}: not a readable Parquet file ({why(e)})") from None
    md = pf.metadata
    for i in range(md.num_row_groups):
        size = md.row_group(i).total_byte_size
        if size > MAX_ROW_GROUP_BYTES:
            raise FileFormatError(f"{path.name}: row group {i} holds {size:,} bytes uncompressed, more than "
                                  f"{MAX_ROW_GROUP_BYTES:,} (MAX_ROW_GROUP_BYTES); rewrite it with smaller row groups")
    return pf


def parquet_batches(path: Path, pf: pq.ParquetFile, columns: list[str]) -> Iterator[tuple[pa.Table, pa.Array]]:
    """(batch, origin per row: ``<file> row <n>``) of the columns asked for, never the whole file."""
    row = 0
    try:
        for b in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            where = positions(path.name, "row", np.arange(row + 1, row + b.num_rows + 1))
            row += b.num_rows
            yield pa.Table.from_batches([b]), where
    except (pa.ArrowException, OSError) as e:
        raise FileFormatError(f"{path.name} after row {row:,}: cannot read it ({why(e)})") from None
