"""The poll's own log: a line per cycle (or per minute) and per warning, as text or JSON, on stderr.

``poll --log-format json`` (``$MICROSTRUCTURE_LOG_FORMAT=json``, the poll flow's ``log_format``) writes one JSON
object a line: ``{"event": "cycle", ...}`` after every cycle and ``{"event": "source_errors" | "quarantined" |
"skipped_slots", ...}`` at level WARNING for what went wrong in it, attributed to its source and symbols. The
default text format writes a summary line every :data:`TEXT_EVERY_S` seconds (and on the first cycle), so a piped
or daemonised ``poll --session``, which shows no progress bar, still says it is alive.

The lines go to stderr: stdout carries the poll's result (its table, or ``--json``), and a service manager
(systemd, Docker, a Prefect worker) already collects a process's stderr; a file of our own would need rotating.
Everything a line says goes through :func:`~microstructure.sources.secrets.scrub` last, whatever put it there:
an outcome's detail is a vendor's error text, which may echo a key.

The stdlib ``logging`` carries the records; python-json-logger (maintained, already in the runtime set through
Prefect) renders them, so fields, timestamps and escaping are a library's, not ours.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from microstructure.sources.secrets import scrub

if TYPE_CHECKING:
    from microstructure.jobs.poll import PollStats

LOG_FORMAT_ENV = "MICROSTRUCTURE_LOG_FORMAT"
FORMATS = ("text", "json")
LOGGER = "microstructure.poll"
TEXT_EVERY_S = 60.0  # text format: a summary line this often (and on the first cycle)
MAX_SYMBOLS = 20  # symbols named in one warning line; the count is always whole


class LogFormatError(ValueError):
    """An unknown log format: one line."""


def log_format_from(value: str | None) -> str:
    """``value``, else ``$MICROSTRUCTURE_LOG_FORMAT``, else ``text``; checked."""
    fmt = (value or os.environ.get(LOG_FORMAT_ENV, "") or "text").strip().lower()
    if fmt not in FORMATS:
        raise LogFormatError(f"log format must be text or json, not {fmt!r}")
    return fmt


def _scrubbed(value: Any) -> Any:
    """``value`` with every string in it scrubbed. Anything else JSON has no type for (an exception, a path, bytes,
    a set) is made text here, then scrubbed: left to the serialiser it would become text (bytes: base64) after
    the scrub, carrying a key it holds onto the line."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(k): _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrubbed(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, bytes | bytearray):
        return scrub(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, BaseException):
        return scrub(f"{type(value).__name__}: {value}")
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    return scrub(value)


class ScrubbedJsonFormatter(JsonFormatter):
    """JSON lines with every string scrubbed before it is serialised (a key never reaches the line, escaped or
    not)."""

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {k: _scrubbed(v) for k, v in log_data.items()}


class ScrubbedTextFormatter(logging.Formatter):
    def converter(self, t: float | None) -> time.struct_time:
        return time.gmtime(t)  # UTC, as every time we print; the line's Z says so

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return ScrubbedJsonFormatter("%(levelname)s %(name)s %(message)s", timestamp=True,
                                     rename_fields={"levelname": "level", "name": "logger"})
    return ScrubbedTextFormatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%SZ")


@contextmanager
def poll_logger(fmt: str, stream: TextIO | None = None) -> Iterator[logging.Logger]:
    """The poll's logger, writing ``fmt`` lines to ``stream`` (default stderr) until the block ends. It does not
    propagate: the root logger's handlers (Prefect's console) would print every line twice."""
    log = logging.getLogger(LOGGER)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield log
    finally:
        log.removeHandler(handler)
        handler.flush()


class CycleLog:
    """An ``on_cycle`` callback that logs the cycle (json: every cycle and its warnings; text: a line a minute),
    then calls ``then``."""

    def __init__(self, log: logging.Logger, fmt: str, clock: Any = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.log, self.json, self.clock, self.monotonic = log, fmt == "json", clock, monotonic
        self._written = 0
        self._quarantined: Counter[str] = Counter()
        self._skipped = 0
        self._last_line: float | None = None

    def wrap(self, then: Callable[[int, PollStats], None] | None) -> Callable[[int, PollStats], None]:
        def hook(i: int, stats: PollStats) -> None:
            self.cycle(i, stats)
            if then is not None:
                then(i, stats)

        return hook

    def cycle(self, i: int, stats: PollStats) -> None:
        from microstructure.jobs.metrics import failed_calls
        from microstructure.lake.coverage import cycle_coverage

        new = stats.written - self._written
        self._written = stats.written
        quarantined = stats.quarantined - self._quarantined
        self._quarantined = Counter(stats.quarantined)
        skipped_total = getattr(self.clock, "skipped", 0)
        skipped, self._skipped = max(skipped_total - self._skipped, 0), max(skipped_total, self._skipped)
        if not self.json:
            now = self.monotonic()
            if self._last_line is not None and now - self._last_line < TEXT_EVERY_S:
                return  # text: a line a minute, so nothing more to compute on the cycles between
            self._last_line = now
        cov = stats.coverage()
        if not self.json:
            self.log.info("cycle %d: %d snapshots written (%d this cycle), L2 %d / shallow %d / L1 only %d / none %d "
                          "symbols, quarantined %d, missing %d, skipped slots %d", i + 1, stats.written, new,
                          cov["l2"], cov["shallow"], cov["l1_only"], cov["none"], sum(stats.quarantined.values()),
                          sum(stats.missing.values()), skipped_total)
            return
        out = stats.last_outcomes
        first = out.column("cycle_ts")[0].as_py() if out is not None and out.num_rows else None
        at = first.isoformat() if first is not None else None
        summary: dict[str, Any] = {
            "cycle": i + 1, "cycle_ts": at, "written": new, "written_total": stats.written,
            "quarantined": sum(quarantined.values()), "quarantined_total": sum(stats.quarantined.values()),
            "missing_total": sum(stats.missing.values()), "skipped_slots_total": skipped_total, "coverage": cov,
            "cycle_coverage_by_source": cycle_coverage(out) if out is not None else {}}
        self.log.info("cycle", extra={"event": "cycle", **summary})
        if out is not None:
            syms = _failed_symbols(out)
            for (src, cls), n in sorted(failed_calls(out).items()):
                names = syms.get((src, cls), [])
                self.log.warning("source_errors", extra={
                    "event": "source_errors", "cycle": i + 1, "cycle_ts": at, "source": src, "error_class": cls,
                    "count": n, "symbols": names[:MAX_SYMBOLS], "detail": _first_detail(out, src, cls)})
        for reason, n in sorted(quarantined.items()):
            self.log.warning("quarantined", extra={"event": "quarantined", "cycle": i + 1, "cycle_ts": at,
                                                   "reason": reason, "count": n})
        if skipped:
            self.log.warning("skipped_slots", extra={"event": "skipped_slots", "cycle": i + 1, "cycle_ts": at,
                                                     "count": skipped})


def _failed_symbols(outcomes: Any) -> dict[tuple[str, str], list[str]]:
    """(source, error class) -> the symbols it failed for in this cycle (the same attribution as
    ``metrics.failed_calls``, one outcome at a time)."""
    from microstructure.jobs.metrics import failed_calls

    res: dict[tuple[str, str], list[str]] = {}
    for k in range(outcomes.num_rows):
        row = outcomes.slice(k, 1)
        for key in failed_calls(row):
            res.setdefault(key, []).append(row.column("symbol")[0].as_py())
    return res


def _first_detail(outcomes: Any, source: str, error_class: str) -> str | None:
    """The first outcome detail naming ``source`` failing with ``error_class`` (scrubbed by the formatter). The
    vendor's words after " | " are the last failed source's: they are kept only when that source is ``source``;
    else only the list of sources tried is given, so no source's words are shown under another's name."""
    fallback = None
    for detail, err in zip(outcomes.column("detail").to_pylist(), outcomes.column("error_class").to_pylist(),
                           strict=True):
        if not detail or not (f"{source}: {error_class}" in detail or (err == error_class and source in detail)):
            continue
        tried, sep, _ = str(detail).partition(" | ")
        failures = [p for p in tried.split("; ") if not p.endswith(": ok")]
        if not sep or not failures or failures[-1].startswith(f"{source}: "):
            return str(detail)[:500]
        fallback = fallback or tried[:500]
    return fallback
