"""``microstructure sql``: DuckDB over the lake that can only read, and only the lake.

Why not DuckDB's own path guard: a connection that may read a path (``allowed_paths``) may also write it, so
``EXPLAIN ANALYZE COPY (...) TO '<a lake file>'`` truncated the lake. Here the DuckDB connection touches no
path at all, so there is nothing a statement could write, however it is wrapped:

- Python opens the lake's files itself, as ``pyarrow`` datasets over each dataset's consistent file list
  (``LakePaths.files``), schemas unified like ``union_by_name``. A file that resolves outside the lake (a
  symlink out) or is not a regular file (a FIFO would hang the open) is refused before anything is read. A
  dataset with no files yet is its zero-row schema, held in memory.
- The datasets are registered on an in-memory DuckDB started with ``enable_external_access = false``,
  DuckDB's local file system disabled, no temp directory (nothing spills, ``<cwd>/.tmp`` is never made or
  read), extension autoload/autoinstall off, Python replacement scans off (a query cannot name a Python
  variable), a memory limit and a thread count; then its configuration is locked, so no ``SET``/``PRAGMA``/
  ``RESET`` can undo any of it. The four views are ``transforms/views.sql`` with its ``read_parquet`` swapped
  for the registered datasets, so they have the same columns as in any DuckDB client, ``date`` included.
- Every statement runs under a timeout (a timer thread calls ``con.interrupt()``), and its result is
  fetched as Arrow batches and refused once it outgrows the memory limit (DuckDB's limit does not count the
  result handed to Python).

The up-front statement-type check is only a friendlier message ("COPY is not allowed"); the connection
above is the defence, and tests attack it with the check bypassed. There is no write mode: to write, load
``transforms/views.sql`` in the stock DuckDB CLI. The prompt (``repl``) runs on the same kind of session, and
each of its statements lists the lake's files again (``Session.query``): a prompt left open sees the rows written
since, and never reads the files a compaction replaced.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import stat
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from microstructure.contract.inputs import InputError
from microstructure.contract.text import visible
from microstructure.lake import paths as lake

DATASETS = ("snapshots", "features", "quarantine", "outcomes")

# Statement types the friendly check lets through (SHOW / DESCRIBE / SUMMARIZE parse as SELECT). SET and PRAGMA
# pass it on purpose: the locked configuration is what refuses them, and a test proves it.
READ_ONLY = {"SELECT", "EXPLAIN", "PRAGMA", "VARIABLE_SET", "SET"}

DEFAULT_TIMEOUT = 60.0  # seconds; --timeout / MICROSTRUCTURE_SQL_TIMEOUT
MAX_TIMEOUT = 24 * 3600.0
DEFAULT_MEMORY = "1GB"  # --memory-limit / MICROSTRUCTURE_SQL_MEMORY_LIMIT
MIN_MEMORY = 64 * 1000**2  # DuckDB cannot run a plain scan in much less
MAX_STATEMENT_CHARS = 1_000_000  # a prompt statement longer than this is refused, never buffered on
BATCH_ROWS = 65_536

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.I)


class NotAllowed(InputError):
    """A statement or lake file a read-only session refuses; the message says why."""


class QueryError(InputError):
    """A statement failed (syntax, memory limit, timeout, ...): one line for the user, exit code 2."""


@dataclass(frozen=True)
class Limits:
    """Bounds of a session: seconds per statement, and bytes for DuckDB's working memory and, separately,
    for the result handed back."""

    timeout: float = DEFAULT_TIMEOUT
    memory_bytes: int = 1000**3

    @classmethod
    def parse(cls, timeout: float = DEFAULT_TIMEOUT, memory: str = DEFAULT_MEMORY) -> Limits:
        if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
            raise InputError(f"--timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}], not {timeout}")
        m = _SIZE.fullmatch(memory)
        unit = _UNITS.get(m.group(2).lower()) if m else None
        if m is None or unit is None:
            raise InputError(f"--memory-limit must be a size such as 512MB or 2GB, not {memory!r}")
        n = float(m.group(1)) * unit
        if not (MIN_MEMORY <= n <= 2**50):
            raise InputError(f"--memory-limit must be between 64MB and 1PB, not {memory!r}")
        return cls(timeout=timeout, memory_bytes=int(n))


def _friendly_size(n: int) -> str:
    return f"{n / 1000**3:g} GB" if n >= 1000**3 else f"{n / 1000**2:g} MB"


def _open_duckdb(limits: Limits) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that cannot touch the file system, with its configuration locked."""
    con = duckdb.connect(":memory:", config={
        "enable_external_access": False,  # no COPY TO, ATTACH of a file, read_* of a path, INSTALL/LOAD of a file
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "allow_persistent_secrets": False,  # never read or write ~/.duckdb/stored_secrets
        "temp_directory": "",  # an in-memory database would spill to <cwd>/.tmp: nothing spills, nothing is read there
        "max_temp_directory_size": "0B",
        "memory_limit": f"{limits.memory_bytes}B",
        "threads": os.cpu_count() or 1,
        "python_enable_replacements": False,  # `FROM some_name` must not scan a Python variable of that name
        "python_scan_all_frames": False,
    })
    # These are refused in the connect config (TimeZone is ICU's, the file system list needs a running
    # database, the progress bar is per session); they are set before the lock, before any user statement.
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")  # it would draw over the output on a terminal
    con.execute("SET disabled_filesystems = 'LocalFileSystem'")  # a second wall behind enable_external_access
    con.execute("SET lock_configuration = true")  # no SET / RESET / PRAGMA can change any of the above
    return con


def lake_dataset(paths: lake.LakePaths, name: str) -> Any:
    """The dataset's files as one ``pyarrow`` dataset (a zero-row table when it has none): only regular files
    whose real path is inside the lake, schemas unified across files like DuckDB's ``union_by_name``.

    Each file also carries its folder's date as the column ``date``, as DuckDB's hive-partition detection gives
    it to ``views.sql`` (whose computed ``date`` then reads as ``date_1``): the same columns as every other
    DuckDB client, and a filter on ``date`` skips the other days' files instead of reading them.
    """
    return _dataset(name, _listing(paths, name))


@dataclass(frozen=True)
class _File:
    real: str  # the resolved path: pyarrow opens what was checked, not a link
    day: Any  # dt.date of its partition
    stamp: tuple[int, int, int, int]  # (device, inode, size, mtime ns): a file replaced under the name differs


def _listing(paths: lake.LakePaths, name: str) -> tuple[_File, ...]:
    """The dataset's consistent file list (``LakePaths.files``), each file checked: inside the lake, regular."""
    import datetime as dt

    root = paths.root.resolve()
    out = []
    for f in paths.files(name):
        try:
            p = Path(f).resolve(strict=True)
            st = p.stat()
        except FileNotFoundError:
            if os.path.islink(f):  # a link to nothing, planted: listing again would only find it again
                raise NotAllowed(f"{f} is a link to a file that does not exist: remove it") from None
            raise  # gone after a compaction: lake.paths.with_retry lists again
        except (OSError, RuntimeError) as e:  # a loop of links (RuntimeError before Python 3.13), no permission
            why = e.strerror if isinstance(e, OSError) and e.strerror else "a loop of links"
            raise NotAllowed(f"{f} cannot be read ({why}): `sql` reads only the lake's Parquet files") from None
        if not p.is_relative_to(root):
            raise NotAllowed(f"{f} resolves outside the lake ({root}): `sql` reads only the lake; "
                             "remove the link or copy the file in")
        if not stat.S_ISREG(st.st_mode):
            raise NotAllowed(f"{f} is not a regular file: `sql` reads only the lake's Parquet files")
        try:
            day = dt.date.fromisoformat(Path(f).parent.name.removeprefix("date="))
        except ValueError:
            raise InputError(f"{Path(f).parent} is not a date partition (date=YYYY-MM-DD)") from None
        out.append(_File(str(p), day, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)))
    return tuple(out)


def _dataset(name: str, files: tuple[_File, ...]) -> Any:
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    from microstructure.contract.schemas import EMPTY

    if not files:
        return EMPTY[name].empty_table()
    real = [f.real for f in files]
    days = [ds.field("date") == pa.scalar(f.day, pa.date32()) for f in files]
    fs, fmt = pafs.LocalFileSystem(), ds.ParquetFileFormat()
    try:
        schema = ds.FileSystemDatasetFactory(fs, real, fmt).inspect(promote_options="permissive")
        if "date" not in schema.names:
            schema = schema.append(pa.field("date", pa.date32()))
        return ds.FileSystemDataset.from_paths(real, schema=schema, format=fmt, filesystem=fs, partitions=days)
    except (pa.ArrowException, OSError) as e:  # a footer that is no Parquet footer is an OSError to pyarrow
        if isinstance(e, OSError) and lake._vanished(e):
            raise  # gone after a compaction: lake.paths.with_retry lists again
        raise InputError(f"lake dataset {name}: {str(e).splitlines()[0]}") from None


def _views() -> dict[str, str]:
    """``views.sql``'s CREATE VIEW statements, each reading its registered dataset instead of a glob."""
    from microstructure.contract.schemas import sql

    text = "\n".join(line for line in sql("views").splitlines() if not line.strip().startswith("--"))
    out = {}
    for body in filter(None, (s.strip() for s in text.split(";"))):
        name = re.search(r"VIEW\s+(\w+)", body, re.I).group(1)  # type: ignore[union-attr]
        read = (f"read_parquet(coalesce(getvariable('lake'), 'data/lake') || '/{name}/*/*.parquet', "
                "union_by_name = true)")
        if name not in DATASETS or body.count(read) != 1:
            raise ValueError(f"views.sql: view {name} does not read {read}")
        out[name] = body.replace(read, _registered(name))
    return out


def _registered(name: str) -> str:
    return f"_lake_{name}"  # our constant: safe to put in SQL


class Session:
    """One read-only DuckDB session over the lake (see the module docstring for why it cannot write)."""

    def __init__(self, paths: lake.LakePaths, limits: Limits | None = None) -> None:
        self.paths = paths
        self.limits = limits or Limits()
        self.con = _open_duckdb(self.limits)
        self._bound: dict[str, tuple[_File, ...]] = {}  # the file list each dataset is registered on
        try:
            self.refresh()
            for body in _views().values():
                self.con.execute(body)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close DuckDB, and with it the datasets, while Python is fully alive: a DuckDB thread that still held
        a Python object (a dataset scan) at interpreter exit would take the GIL then, and abort the process."""
        self.con.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh(self) -> None:
        """Register each dataset on a fresh listing (the views read them by name, so they follow). A dataset
        whose files are the very same as last time keeps its registration: lake files are never rewritten in
        place (new rows come as new files, a compaction swaps in a new name), so an idle prompt on a big lake
        does not read every file's footer again for each statement."""
        for name in DATASETS:
            files = _listing(self.paths, name)
            if self._bound.get(name) != files:
                self.con.register(_registered(name), _dataset(name, files))
                self._bound[name] = files

    def check(self, query: str) -> None:
        """A plain message for statements that are not queries. Not the defence: the connection is."""
        try:
            query.encode()  # bytes that were no UTF-8 (binary stdin, argv) arrive as lone surrogates
        except UnicodeEncodeError:
            raise QueryError("the statement is not UTF-8 text") from None
        try:
            statements = self.con.extract_statements(query)
        except duckdb.Error as e:
            raise QueryError(str(e).splitlines()[0]) from None
        for st in statements:
            kind = st.type.name
            if kind not in READ_ONLY:
                raise NotAllowed(f"{kind} is not allowed: `sql` only reads the lake (to write, load "
                                 "transforms/views.sql in the DuckDB CLI)")

    def query(self, query: str) -> pa.Table | None:
        """Run ``query`` (checked, under the timeout, result bounded) as an Arrow table, or None for a statement
        without rows. It reads the lake as it is now: each statement lists the files again (a prompt open for
        hours sees the rows written since, and never the files a compaction replaced). A file removed under a
        running statement by a compaction makes it run again, whole, on a fresh listing: the partial result is
        dropped, so no row is counted twice or missed."""
        self.check(query)

        def go() -> pa.Table | None:
            self.refresh()
            return self._fetch(query)

        return lake.with_retry(go)

    def df(self, query: str) -> Any:
        table = self.query(query)
        # Through DuckDB again, so types convert exactly as DuckDB's own .df() converts them.
        return None if table is None else self.con.from_arrow(table).df()

    def _fetch(self, query: str) -> pa.Table | None:
        with _deadline(self.con, self.limits.timeout) as timer:
            try:
                # None for a statement without a result (SET, CREATE ...), which DuckDB's stubs leave out.
                rel: duckdb.DuckDBPyRelation | None = self.con.sql(query)
                if rel is None:
                    return None
                batches, size = [], 0
                with rel.to_arrow_reader(BATCH_ROWS) as reader:  # closed when refused: DuckDB frees the result
                    for batch in reader:
                        size += batch.nbytes
                        if size > self.limits.memory_bytes:
                            raise QueryError(f"the result is larger than {_friendly_size(self.limits.memory_bytes)}"
                                             " (--memory-limit): aggregate, or add a LIMIT")
                        batches.append(batch)
                    return pa.Table.from_batches(batches, schema=reader.schema)
            except (duckdb.Error, OSError, pa.ArrowException) as e:
                if timer.fired:
                    raise QueryError(f"the statement ran longer than {self.limits.timeout:g} s and was stopped "
                                     "(--timeout or MICROSTRUCTURE_SQL_TIMEOUT to allow longer)") from None
                if lake._vanished(e):
                    raise  # lake.with_retry lists the files again
                raise _query_error(e) from None


def _query_error(e: BaseException) -> NotAllowed | QueryError:
    line = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, duckdb.PermissionException) or "disabled by configuration" in line:
        return NotAllowed(f"{line} (`sql` reads the lake only)")
    if isinstance(e, duckdb.OutOfMemoryException):
        return QueryError(f"{line} (--memory-limit or MICROSTRUCTURE_SQL_MEMORY_LIMIT to allow more)")
    return QueryError(line)


class _Timer:
    fired = False


@contextmanager
def _deadline(con: duckdb.DuckDBPyConnection, seconds: float) -> Iterator[_Timer]:
    """Interrupt ``con`` if the block is still running after ``seconds`` (DuckDB has no statement timeout)."""
    state = _Timer()
    lock = threading.Lock()
    running = True

    def fire() -> None:
        with lock:  # never interrupt after the block ended (DuckDB clears a stale interrupt anyway)
            if running:
                state.fired = True
                con.interrupt()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield state
    finally:
        with lock:
            running = False
        timer.cancel()


def run(paths: lake.LakePaths, query: str, limits: Limits | None = None) -> Any:
    """The query's result as a DataFrame (None for a statement without rows)."""
    with lake.with_retry(lambda: Session(paths, limits)) as session:
        return session.df(query)


def _printable(df: Any) -> Any:
    """Text cells and column names with control characters shown escaped (a printed ESC must not drive the
    terminal; a column alias is the statement's text, as hostile as a cell)."""
    return df.map(lambda v: visible(v) if isinstance(v, str) else v).rename(columns=lambda c: visible(str(c)))


# The prompt's own commands (typed alone on a line, outside a statement): what each does, for ``.help``.
DOT_COMMANDS = {
    ".help": "this text",
    ".tables": "the views",
    ".quit": "leave (also .exit, or Ctrl-D)",
}
_TABLES = "SELECT view_name AS name FROM duckdb_views() WHERE NOT internal AND NOT temporary ORDER BY 1;"


def view_notes() -> dict[str, str]:
    """Each view's one-line description, from the comments at the top of ``views.sql`` (one source for the
    file, its readers and ``.help``)."""
    from microstructure.contract.schemas import sql

    notes = {}
    for line in sql("views").splitlines():
        m = re.match(r"--\s*(\w+):\s+(.+)", line)
        if m and m.group(1) in DATASETS:
            notes[m.group(1)] = m.group(2).strip()
    return notes


def help_text() -> str:
    notes = view_notes()
    width = max(map(len, (*DATASETS, *DOT_COMMANDS)))
    lines = ["Views (read-only; every statement reads the lake as it is now, new rows and compactions included):"]
    lines += [f"  {name:<{width}}  {notes.get(name, '')}" for name in DATASETS]
    lines += ["Statements end with ';' and may span lines. Commands, alone on a line:"]
    lines += [f"  {cmd:<{width}}  {what}" for cmd, what in DOT_COMMANDS.items()]
    lines += ["Ctrl-C drops the statement being typed, or stops the one running. To quit: .quit, .exit or Ctrl-D."]
    return "\n".join(lines)


def repl(paths: lake.LakePaths, limits: Limits | None = None, stdin: Any = None, out: Any = None) -> None:
    """A minimal DuckDB prompt: statements end with ``;``; ``.help``, ``.tables``, ``.quit``. Each statement
    reads the lake as it is when it runs (:meth:`Session.query`)."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    if hasattr(stdin, "reconfigure"):  # a strict decoder would end the prompt at the first byte that is no UTF-8;
        stdin.reconfigure(errors="surrogateescape")  # kept as surrogates, that statement alone is refused (check)
    interactive = stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()
    with lake.with_retry(lambda: Session(paths, limits)) as session:
        if interactive:
            print(f"DuckDB {duckdb.__version__} over {visible(str(paths.root))} (read-only); views: snapshots, "
                  "features, quarantine, outcomes. End statements with ';'; .help for help, .quit to leave.",
                  file=out)
        for query in _statements(stdin, out, interactive):
            if query == ".help":
                print(help_text(), file=out)
            else:
                _answer(session, query, out, interactive)
            out.flush()  # a program driving the prompt through a pipe gets each answer when it is ready


def _statements(stdin: Any, out: Any, interactive: bool) -> Iterator[str]:
    """The statements typed or piped in, each whole (up to its ``;``) and at most MAX_STATEMENT_CHARS long;
    ``.help`` as itself."""
    buf = ""
    while True:
        try:
            line = input("D " if not buf else "· ") if interactive else stdin.readline(MAX_STATEMENT_CHARS + 1)
        except EOFError:
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the statement being typed
            buf = ""
            print(file=out)
            continue
        if not interactive and line == "":
            return
        cmd = line.strip()
        if not buf and cmd.startswith("."):
            word = cmd.split()[0]
            if word in (".quit", ".exit"):
                return
            if word in (".help", ".tables") and cmd == word:
                yield ".help" if word == ".help" else _TABLES
            else:  # never sent to DuckDB as SQL: it would only say "syntax error at or near '.'"
                print(visible(f"error: unknown command {cmd[:80]} (.help lists the commands)"), file=out)
            while not interactive and line and not line.endswith("\n"):  # skip the rest of a long line
                line = stdin.readline(MAX_STATEMENT_CHARS + 1)
            continue
        buf += cmd + "\n"
        if len(buf) > MAX_STATEMENT_CHARS:
            print(f"error: a statement longer than {MAX_STATEMENT_CHARS:,} characters is refused", file=out)
            buf = ""
            while not interactive and line and not line.endswith("\n"):  # skip the rest of the long line
                line = stdin.readline(MAX_STATEMENT_CHARS + 1)
            continue
        if buf.rstrip().endswith(";"):
            yield buf
            buf = ""


def _answer(session: Session, query: str, out: Any, interactive: bool) -> None:
    try:
        table = session.query(query)
        if table is not None and interactive:
            width = shutil.get_terminal_size((120, 40)).columns
            session.con.from_arrow(table).show(max_width=width)  # DuckDB's box rendering escapes control chars
        elif table is not None:
            print(_printable(session.con.from_arrow(table).df()).to_string(index=False), file=out)
    except (InputError, duckdb.Error) as e:
        print(visible(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}"), file=out)
    except KeyboardInterrupt:  # Ctrl-C during a statement stops it, not the prompt
        session.con.interrupt()
        print("interrupted", file=out)
