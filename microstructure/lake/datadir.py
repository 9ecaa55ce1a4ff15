"""A data dir: the folder that holds one lake, its Feast stores and market state, and who may write it.

Three rules live here.

* **One writer at a time.** Every command that writes (run, poll, backfill, build-features, validate,
  compact, ``--fresh``, the Prefect flows, the service's one-symbol refresh) holds an exclusive OS advisory
  lock (``flock``) on ``<data-dir>/.microstructure.lock`` for as long as it runs. A second writer gets one
  line naming the holder (pid and command) or, with ``--wait``, waits. The kernel drops the lock when the
  holder exits, however it exits (kill -9 included), so a crash never leaves a stale lock. Readers (``sql``,
  ``online``, ``coverage``, scoring reads) never take it: the lake's atomic renames and generation numbers
  already give them a consistent view (``lake.paths.partition_files``).
* **The data dir owns its store choices.** The first writer records them in ``settings.json``
  (``lake.settings``); later commands use the record (a shell variable that disagrees is refused).
* **``--fresh`` deletes only what this project made.** A data dir gets a marker file (``.microstructure``)
  when this project creates it. ``--fresh`` refuses any folder without the marker and deletes nothing.

Hand-written rather than ``filelock``: we need the holder's pid and command in the refusal, and re-entrancy
within one process (``run --prefect`` calls the flows in-process, and they lock too).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

LOCK_FILE = ".microstructure.lock"
MARKER = ".microstructure"
# Names this project creates in a data dir. A folder holding only these (an older data dir from before the
# marker existed) is adopted: it gets its marker the first time a writer locks it.
OWN_NAMES = frozenset({"lake", "feast", "sim", "gx", "models", "report", "README.md", "sources.toml",
                       "microstructure.toml", "settings.json", LOCK_FILE, MARKER})
LAKE_NAMES = frozenset({"snapshots", "quarantine", "features", "features_quarantine", "outcomes"})
WAIT_POLL_S = 0.2


class DataDirBusy(Exception):
    """Another process holds the data dir's writer lock; the message names it (one line)."""


class NotOurs(Exception):
    """A folder this project did not create: never cleared (one line)."""


_held: dict[Path, tuple[IO[str], int]] = {}  # data dir -> (open lock file, re-entry count) in this process
_guard = threading.RLock()


def _holder(fh: IO[str]) -> str:
    fh.seek(0)
    try:
        info = json.loads(fh.read() or "{}")
        return f"pid {int(info['pid'])} ({str(info.get('command', '?'))[:80]})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _command() -> str:
    args = [Path(sys.argv[0]).name, *sys.argv[1:3]] if sys.argv else ["python"]
    # Only the program and its subcommand: never options, which could hold a path or a value worth hiding.
    return " ".join(a for a in args if not a.startswith("-"))[:80]


def is_ours(data_dir: Path) -> bool:
    """True when the marker says this project created ``data_dir`` (a regular file, not a symlink)."""
    m = data_dir / MARKER
    return m.is_file() and not m.is_symlink()


def _adoptable(data_dir: Path) -> bool:
    """Absent, empty, or holding only what this project creates (an older data dir without its marker)."""
    if not data_dir.exists():
        return True
    if data_dir.is_symlink() or not data_dir.is_dir():
        return False
    names = {p.name for p in data_dir.iterdir()}
    if not names <= OWN_NAMES:
        return False
    lake_dir = data_dir / "lake"
    return not lake_dir.exists() or (lake_dir.is_dir() and {p.name for p in lake_dir.iterdir()} <= LAKE_NAMES)


def ensure_marker(data_dir: Path) -> None:
    """Create ``data_dir`` with its marker, or adopt an older data dir of ours; any other folder is left as
    it is (it can be written to, but ``--fresh`` will never clear it)."""
    if is_ours(data_dir) or not _adoptable(data_dir):
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    from microstructure.contract.atomic import atomic_write_bytes

    atomic_write_bytes(json.dumps({"created_by": "microstructure",
                                   "created_at": dt.datetime.now(dt.UTC).isoformat()}).encode(), data_dir / MARKER)


def require_ours(data_dir: Path) -> None:
    """Refuse to clear a folder this project did not create."""
    if not is_ours(data_dir):
        raise NotOurs(f"{data_dir} was not created by microstructure (no {MARKER} marker): --fresh clears only "
                      "data dirs this project made; nothing was deleted")


@contextlib.contextmanager
def writer(data_dir: Path, wait: bool = False, timeout_s: float | None = None,
           create: bool = True) -> Iterator[None]:
    """Hold the data dir's writer lock for the block (re-entrant within this process).

    Busy: :class:`DataDirBusy` at once, or with ``wait`` after ``timeout_s`` (None: wait for as long as it
    takes). The marker is written on first lock when the folder is new or ours. ``create=False`` (commands
    that need an existing lake): a missing folder is not created; the block runs unlocked and reports it.
    """
    data_dir = Path(data_dir).resolve()
    if not create and not data_dir.exists():
        yield
        return
    with _guard:
        if data_dir in _held:
            fh, n = _held[data_dir]
            _held[data_dir] = (fh, n + 1)
            acquired_here = False
        else:
            acquired_here = True
    if acquired_here:
        ensure_marker(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        fh = os.fdopen(fd, "r+")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    fh.close()
                    raise
                if not wait or (deadline is not None and time.monotonic() >= deadline):
                    who = _holder(fh)
                    fh.close()
                    raise DataDirBusy(f"data dir {data_dir} is in use by {who}: one writer at a time "
                                      "(wait for it, or pass --wait)") from None
                time.sleep(WAIT_POLL_S)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "command": _command(),
                             "since": dt.datetime.now(dt.UTC).isoformat()}))
        fh.flush()
        with _guard:
            _held[data_dir] = (fh, 1)
    try:
        if acquired_here and is_ours(data_dir):
            # The data dir's store choices (lake.settings), recorded once, under the lock: a data dir made
            # with Redis keeps using Redis from a shell without the variable.
            from microstructure.lake.settings import record_if_missing

            record_if_missing(data_dir)
        yield
    finally:
        with _guard:
            fh, n = _held[data_dir]
            if n > 1:
                _held[data_dir] = (fh, n - 1)
            else:
                del _held[data_dir]
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()


@contextlib.contextmanager
def try_writer(data_dir: Path) -> Iterator[bool]:
    """For optional writes (the service's refresh): yields True holding the lock, False if a writer is busy."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(writer(data_dir))
        except DataDirBusy:
            yield False
            return
        yield True
