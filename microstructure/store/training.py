"""Training sets: entity rows joined point-in-time to the features through Feast, streamed in bounded batches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from feast import FeatureStore
from microstructure.store.lookup import _plain_view

# --- Training sets -------------------------------------------------------------------------------------------
# An entity file is read as a stream and joined a batch at a time through Feast's API; each batch's rows are
# written before the next is read, so memory follows the batch, not the file (10M rows: see benchmarks/training.py).

ENTITY_BATCH_ROWS = 1_000_000  # entity rows per Feast call when a training set is written to a file
MAX_ENTITY_ROWS = 100_000_000  # an entity file's rows: the output (on disk) grows with them
ENTITY_LINE_BYTES = 1 << 20  # a CSV entity line longer than this is refused (pyarrow's block size)
ENTITY_ROW_GROUP_BYTES = 1 << 30  # a Parquet entity row group, uncompressed (pyarrow writes ~1M rows in one)
ENTITY_JSON_BYTES = 256 << 20  # a JSON entity file is read whole: this much decompressed at most...
ENTITY_JSON_ROWS = 1_000_000  # ...and this many rows (CSV and Parquet stream: use them for more)
_ROW = "__entity_row"  # each entity row's position, sent through Feast and checked on the way back
# Times pandas (Feast's entity frames) can hold: nanoseconds since 1970 in an int64.
_TS_MIN = pd.Timestamp.min.ceil("us").tz_localize("UTC")
_TS_MAX = pd.Timestamp.max.floor("us").tz_localize("UTC")


class _TypeChanged(Exception):
    """A CSV column's type, inferred from the first block, does not fit a later block."""


def normalise_entities(entities: pd.DataFrame) -> pd.DataFrame:
    """Accept ``event_timestamp`` or ``timestamp``; UTC, floored to microseconds (Feast's precision)."""
    df = entities.copy()
    if "event_timestamp" not in df and "timestamp" in df:
        df = df.rename(columns={"timestamp": "event_timestamp"})
    from microstructure.contract.inputs import InputError

    missing = {"symbol", "event_timestamp"} - set(df.columns)
    if missing:
        raise InputError(f"entity file lacks column(s) {sorted(missing)}; needs symbol and event_timestamp")
    raw = df["event_timestamp"]
    if pd.api.types.is_datetime64_any_dtype(raw):  # already times: no text to parse
        ts = raw.dt.tz_localize("UTC") if raw.dt.tz is None else raw.dt.tz_convert("UTC")
    else:
        ts = pd.to_datetime(raw, utc=True, format="mixed", errors="coerce")
    if ts.isna().any():
        bad = raw[ts.isna()].iloc[0]
        raise InputError(f"{int(ts.isna().sum())} entity row(s) have no readable event_timestamp "
                         f"(first: {_short(bad)})")
    df["event_timestamp"] = ts.dt.floor("us").astype("datetime64[us, UTC]")
    df["symbol"] = df["symbol"].astype(str)
    return df


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _request_columns(store: FeatureStore, svc: Any) -> list[str]:
    """Entity-frame columns the service's on-demand views read (request data); ours read none. Only the
    service's own views are looked up."""
    odfvs = [store.get_on_demand_feature_view(p.name) for p in svc.feature_view_projections
             if _plain_view(store, p.name) is None]
    return sorted({c for o in odfvs for c in o.get_request_data_schema()})


def _features_for(store: FeatureStore, svc: Any, keys: pd.DataFrame) -> pa.Table:
    """The service's feature columns for each row of ``keys`` (symbol, event_timestamp and any request columns),
    in ``keys``' order, through Feast's ``get_historical_features``. Only the keys go through Feast: the entity
    file's other columns stay as they were read (types included) and are put beside the result."""
    keys = keys.assign(**{_ROW: np.arange(len(keys), dtype=np.int64)})
    res = store.get_historical_features(entity_df=keys, features=svc).to_arrow()
    if len(res) != len(keys):
        raise RuntimeError(f"the offline store returned {len(res)} rows for {len(keys)} entity rows")
    expected = pa.array(np.arange(len(keys), dtype=np.int64))
    # Our ASOF store keeps the caller's order; another offline store (stock DuckDB, Spark) may not.
    if not pc.all(pc.equal(res[_ROW], expected)).as_py():
        res = res.take(pc.sort_indices(res[_ROW]))
        if not pc.all(pc.equal(res[_ROW], expected)).as_py():
            raise RuntimeError("the offline store did not return each entity row once")
    return res.drop_columns([c for c in keys.columns if c in res.column_names])


def _check_names(entity_columns: list[str], features: pa.Table) -> None:
    from microstructure.contract.inputs import InputError

    clash = [c for c in features.column_names if c in entity_columns]
    if clash:
        raise InputError(f"entity column(s) {clash} have the names of features; rename them in the entity file")


def training_set(store: FeatureStore, entities: pd.DataFrame, service: str = "order_book_all") -> pd.DataFrame:
    """Point-in-time join through Feast: each row gets the latest features with received_ts <= its time.
    Rows come back in the entity frame's order; the frame's columns first, then the features."""
    df = normalise_entities(entities).reset_index(drop=True)
    svc = store.get_feature_service(service)
    keys = df[["symbol", "event_timestamp", *_request_columns(store, svc)]]
    feats = _features_for(store, svc, keys)
    _check_names(list(df.columns), feats)
    return pd.concat([df, feats.to_pandas()], axis=1, copy=False)


def _arrow_times(col: pa.ChunkedArray, first_row: int) -> pa.ChunkedArray:
    """An entity batch's times as UTC microseconds (a time without a zone is UTC, as in ``normalise_entities``),
    or InputError naming the first unreadable one and its row in the file."""
    from microstructure.contract.inputs import InputError

    t = col.type
    out = None
    if pa.types.is_timestamp(t):
        out = col if t.tz is not None else col.cast(pa.timestamp(t.unit, "UTC"))
        if t.unit == "ns":
            out = pc.floor_temporal(out, unit="microsecond")
        out = out.cast(pa.timestamp("us", "UTC"), safe=False)
    elif pa.types.is_date(t):
        out = col.cast(pa.timestamp("us")).cast(pa.timestamp("us", "UTC"))
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        # ISO 8601 (what pandas and Arrow write) in Arrow's parser; anything else as pandas reads it.
        for target in (pa.timestamp("us", "UTC"), pa.timestamp("us")):
            try:
                out = col.cast(target).cast(pa.timestamp("us", "UTC"))
                break
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
    if out is None or out.null_count > col.null_count:
        parsed = pd.to_datetime(col.to_pandas(), utc=True, format="mixed", errors="coerce")
        out = pa.chunked_array([pa.array(parsed.dt.floor("us").astype("datetime64[us, UTC]"))])
    bad = pc.is_null(out)
    if out.null_count:
        i = int(pc.index(bad, True).as_py())
        raise InputError(f"{out.null_count:,} entity row(s) have no readable event_timestamp "
                         f"(first: {_short(col[i].as_py())}) from row {first_row + i + 1:,} of the file")
    lo, hi = pc.min_max(out).values()
    if lo.as_py() < _TS_MIN or hi.as_py() > _TS_MAX:
        i = int(pc.index(pc.or_(pc.less(out, pa.scalar(_TS_MIN, out.type)),
                                pc.greater(out, pa.scalar(_TS_MAX, out.type))), True).as_py())
        raise InputError(f"entity row {first_row + i + 1:,} has event_timestamp {_short(col[i].as_py())}, outside "
                         f"{_TS_MIN.year}-{_TS_MAX.year} (the times Feast's entity frames can hold)")
    return out


def _normalise_batch(table: pa.Table, first_row: int) -> pa.Table:
    """``normalise_entities`` for an Arrow batch of the entity file: ``timestamp`` accepted for
    ``event_timestamp``, times in UTC microseconds, symbols as text; every other column as read."""
    from microstructure.contract.inputs import InputError

    names = table.column_names
    if "event_timestamp" not in names and "timestamp" in names:
        table = table.rename_columns(["event_timestamp" if n == "timestamp" else n for n in names])
        names = table.column_names
    missing = sorted({"symbol", "event_timestamp"} - set(names))
    if missing:
        raise InputError(f"entity file lacks column(s) {missing}; needs symbol and event_timestamp")
    table = table.set_column(names.index("event_timestamp"), "event_timestamp",
                             _arrow_times(table["event_timestamp"], first_row))
    sym = table["symbol"]
    if not pa.types.is_string(sym.type):
        try:
            sym = sym.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InputError(f"entity file's symbol column ({sym.type}) is not text: {str(e).splitlines()[0]}") \
                from None
        table = table.set_column(names.index("symbol"), "symbol", sym)
    return table


def _csv_batches(path: Path, text: bool) -> Iterator[pa.RecordBatch]:
    import pyarrow.csv as pacsv

    # Keys are text whatever they look like (a ticker may be all digits); times are parsed by _arrow_times.
    types = {n: pa.string() for n in ("symbol", "event_timestamp", "timestamp")}
    if text:
        head = pacsv.open_csv(pa.input_stream(str(path), compression="detect"),
                              read_options=pacsv.ReadOptions(block_size=ENTITY_LINE_BYTES))
        types = {n: pa.string() for n in head.schema.names}
        head.close()
    stream = pa.input_stream(str(path), compression="detect")
    reader = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=ENTITY_LINE_BYTES),
                            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True))
    try:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowInvalid as e:
                if "conversion error" in str(e) and not text:
                    raise _TypeChanged(str(e)) from None
                raise
            yield batch
    finally:
        reader.close()


def _frame_table(df: pd.DataFrame) -> pa.Table:
    try:
        return pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column of mixed values: as text, as CSV would give it
        return pa.Table.from_pandas(df.astype({c: str for c in df.columns if df[c].dtype == object}),
                                    preserve_index=False)


def iter_entity_batches(path: Path, batch_rows: int = ENTITY_BATCH_ROWS, text: bool = False,
                        max_rows: int = MAX_ENTITY_ROWS) -> Iterator[pa.Table]:
    """The entity file as tables of about ``batch_rows`` rows, read as a stream: Parquet batch by batch (its
    declared row count checked first), CSV (optionally gzipped) block by block, JSON whole within its caps.
    ``text``: every CSV column as text (when a column's type changes after the first block). InputError for a
    file that cannot be read or passes ``max_rows``."""
    import pyarrow.parquet as pq

    from microstructure.contract.inputs import InputError, read_frame

    if not path.is_file():
        raise InputError(f"no such entity file: {path}")
    name = path.name.lower()
    total = 0
    pending: list[pa.RecordBatch] = []
    size = 0
    try:
        if name.endswith((".parquet", ".pq")):
            pf = pq.ParquetFile(path)
            meta = pf.metadata
            declared = meta.num_rows
            groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
            if declared > max_rows or sum(g.num_rows for g in groups) != declared:
                raise InputError(f"entity file {path} declares {declared:,} rows; the cap is {max_rows:,}")
            # A row group is decoded a column chunk at a time: its declared size bounds what one read holds.
            big = max((g.total_byte_size for g in groups), default=0)
            if big > ENTITY_ROW_GROUP_BYTES:
                raise InputError(f"entity file {path} has a row group of {big >> 20:,} MiB uncompressed; at most "
                                 f"{ENTITY_ROW_GROUP_BYTES >> 20:,} MiB (write it with smaller row groups)")
            batches: Iterable[pa.RecordBatch] = pf.iter_batches(batch_size=min(batch_rows, 65_536))
        elif name.endswith((".json", ".json.gz")):
            df = read_frame(path, "entity", max_rows=min(max_rows, ENTITY_JSON_ROWS), max_bytes=ENTITY_JSON_BYTES)
            batches = _frame_table(df).to_batches(max_chunksize=batch_rows)
        else:
            batches = _csv_batches(path, text)
        for batch in batches:
            total += batch.num_rows
            if total > max_rows:
                raise InputError(f"entity file {path} has more than {max_rows:,} rows (the cap)")
            pending.append(batch)
            size += batch.num_rows
            if size >= batch_rows:
                yield pa.Table.from_batches(pending)
                pending, size = [], 0
        if pending:
            yield pa.Table.from_batches(pending)
    except (InputError, _TypeChanged):
        raise
    except pa.ArrowInvalid as e:
        msg = str(e).splitlines()[0]
        if "straddling" in msg:
            raise InputError(f"entity file {path} has a line longer than {ENTITY_LINE_BYTES:,} bytes") from None
        raise InputError(f"entity file {path} cannot be read: {msg}") from None
    except (OSError, EOFError, pa.ArrowException) as e:
        raise InputError(f"entity file {path} is truncated or not what its name says "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def write_training_set(store: FeatureStore, entities: Path, out: Path, service: str = "order_book_all",
                       batch_rows: int = ENTITY_BATCH_ROWS) -> tuple[int, int]:
    """The training set of an entity file (CSV, optionally gzipped, Parquet or JSON) written to ``out`` (Parquet
    for ``.parquet``/``.pq``, else CSV) in batches of ``batch_rows`` entity rows, each joined through Feast.
    Rows are written in the entity file's order; the file appears whole or not at all. Returns (rows, rows with
    features)."""
    import uuid

    from microstructure.contract.inputs import InputError

    svc = store.get_feature_service(service)
    request = _request_columns(store, svc)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    try:
        try:
            counts = _write_batches(store, svc, request, entities, tmp, out, batch_rows, text=False)
        except _TypeChanged:  # a column's type changes after the first block: read every column as text
            counts = _write_batches(store, svc, request, entities, tmp, out, batch_rows, text=True)
        os.replace(tmp, out)
        return counts
    except pa.ArrowInvalid as e:  # a later batch whose values do not fit the first one's types
        raise InputError(f"entity file {entities} cannot be written out: {str(e).splitlines()[0]}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_batches(store: FeatureStore, svc: Any, request: list[str], entities: Path, tmp: Path, out: Path,
                   batch_rows: int, text: bool) -> tuple[int, int]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from microstructure.contract.text import csv_table

    as_parquet = out.suffix.lower() in (".parquet", ".pq")
    writer: Any = None
    rows = joined = 0
    try:
        for batch in iter_entity_batches(entities, batch_rows, text=text):
            table = _normalise_batch(batch, rows)
            keys = table.select(["symbol", "event_timestamp", *request]).to_pandas()
            feats = _features_for(store, svc, keys)
            if writer is None:
                _check_names(table.column_names, feats)
            for name in feats.column_names:
                table = table.append_column(name, feats[name])
            if "event_ts" in feats.column_names:
                joined += feats.num_rows - feats["event_ts"].null_count
            rows += table.num_rows
            if not as_parquet:
                table = csv_table(table)
            if writer is None:
                schema = table.schema  # every batch is written with the first one's types
                writer = (pq.ParquetWriter(tmp, schema, compression="zstd") if as_parquet
                          else pacsv.CSVWriter(tmp, schema))
            writer.write_table(table if table.schema == schema else table.cast(schema))
        if writer is None:
            from microstructure.contract.inputs import InputError

            raise InputError(f"entity file {entities} has no rows")
    finally:
        if writer is not None:
            writer.close()
    return rows, joined
