"""``microstructure sql``: DuckDB over the lake, read-only by default, with the installed DuckDB module.

Read-only means the connection can read the lake's files and nothing else: after the views are made,
DuckDB's own settings switch off file-system access except to those files (``allowed_paths``), switch off
extension installs and loads, and lock the configuration so a query cannot switch them back. ``COPY ... TO``,
``ATTACH``, ``INSTALL``, ``read_text('/etc/passwd')`` all fail with DuckDB's permission error; statements
other than queries are also refused up front with a plain message. ``--allow-writes`` skips all of it.

The interactive shell is a small loop over the same module connection (so it is always the DuckDB version
we install, with the same guard); a user who wants the full DuckDB CLI loads ``transforms/views.sql`` in it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import duckdb

from microstructure import lake

# Statement types a read-only session may run (SHOW / DESCRIBE / SUMMARIZE parse as SELECT).
READ_ONLY = {"SELECT", "EXPLAIN", "PRAGMA", "VARIABLE_SET", "SET"}


class NotAllowed(Exception):
    """A statement a read-only session refuses; the message says why and how to opt out."""


def connect(paths: lake.LakePaths, allow_writes: bool = False) -> duckdb.DuckDBPyConnection:
    con = lake.connect(paths)
    if not allow_writes:
        files = [str(p) for name in ("snapshots", "features", "quarantine", "outcomes")
                 for p in (paths.files(name) or [str(lake.schema_file(paths, name))])]
        con.execute("SET allowed_paths = ?", [[str(Path(f).resolve()) for f in files]])
        for setting in ("SET autoinstall_known_extensions = false", "SET autoload_known_extensions = false",
                        "SET enable_external_access = false", "SET lock_configuration = true"):
            con.execute(setting)
    return con


def check(query: str, allow_writes: bool) -> None:
    if allow_writes:
        return
    for st in duckdb.extract_statements(query):
        kind = st.type.name
        if kind not in READ_ONLY:
            raise NotAllowed(f"{kind} is not allowed: `sql` is read-only (pass --allow-writes to opt out)")


def run(paths: lake.LakePaths, query: str, allow_writes: bool = False) -> Any:
    """The query's result as a DataFrame (None for a statement without rows); re-run on a fresh listing if
    a compaction removed a file under it."""
    check(query, allow_writes)

    def go() -> Any:
        rel = connect(paths, allow_writes).sql(query)
        return None if rel is None else rel.df()

    try:
        return lake.with_retry(go)
    except duckdb.PermissionException as e:
        raise NotAllowed(f"{str(e).splitlines()[0]} (`sql` reads the lake only; --allow-writes to opt out)") from None


def repl(paths: lake.LakePaths, allow_writes: bool = False, stdin: Any = None, out: Any = None) -> None:
    """A minimal DuckDB prompt: statements end with ``;``; ``.tables``, ``.quit``."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    interactive = stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()
    con = connect(paths, allow_writes)
    width = shutil.get_terminal_size((120, 40)).columns
    if interactive:
        print(f"DuckDB {duckdb.__version__} over {paths.root} ({'read-write' if allow_writes else 'read-only'}); "
              "views: snapshots, features, quarantine, outcomes. End statements with ';', .quit to leave.", file=out)
    buf = ""
    while True:
        try:
            line = input("D " if not buf else "· ") if interactive else stdin.readline()
        except EOFError:
            break
        if not interactive and line == "":
            break
        cmd = line.strip()
        if not buf and cmd in (".quit", ".exit"):
            break
        if not buf and cmd == ".tables":
            cmd = "SHOW TABLES;"
        buf += cmd + "\n"
        if not buf.rstrip().endswith(";"):
            continue
        query, buf = buf, ""
        try:
            check(query, allow_writes)
            rel = con.sql(query)
            if rel is not None and interactive:
                rel.show(max_width=width)  # DuckDB's own box rendering
            elif rel is not None:
                print(rel.df().to_string(index=False), file=out)
        except (NotAllowed, duckdb.Error) as e:
            print(f"error: {str(e).splitlines()[0]}", file=out)
