"""The `sql` prompt, driven for real (a subprocess fed through a pipe, or a terminal through a pty): every
statement reads the lake as it is when it runs. Rows written after the prompt opened are seen, a compaction
(which swaps the files) changes nothing for it, a statement running while the compactor swaps files never
fails; `.help` lists the views, the commands and how to quit.

Failing before (the prompt bound the lake's file list once, when it opened):
- test_rows_written_after_the_prompt_opened_are_seen: the count stayed at the rows of the first listing.
- test_a_compaction_after_the_prompt_opened_changes_nothing_for_it: a dataset empty when the prompt opened stayed
  empty through new rows and their compaction (nothing it held vanished, so nothing made it list again).
- test_help_lists_the_views_the_commands_and_how_to_quit, test_an_unknown_dot_command_is_one_error_line: there
  was no `.help`; `.help` and `.schema` went to DuckDB as SQL ("syntax error at or near '.'").
Not failing before, kept as guards of the new listing per statement: a statement running while the compactor swaps
files (the old prompt already listed again when a file vanished mid-read), and a link out of the lake planted while
the prompt is open (the old prompt never listed again, so never saw it; now every listing is checked).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import queue
import re
import select
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from microstructure.cli.sql_shell import DATASETS, DOT_COMMANDS, view_notes
from microstructure.jobs import poll as pipeline
from microstructure.jobs.build import compact_all
from microstructure.lake.compaction import compact
from microstructure.lake.paths import SNAPSHOTS, LakePaths, partition_files
from microstructure.sources.simulated import SimulatedSource, universe

pytestmark = pytest.mark.integration  # each test starts the prompt in a subprocess

T0 = dt.datetime(2026, 11, 23, 14, 30, tzinfo=dt.UTC)
SYMBOLS = universe()[:5]
COUNT = "SELECT 'rows=' || count(*) || ' keys=' || count(DISTINCT (symbol, event_ts, source)) AS r FROM snapshots;"
WAIT = 120.0  # seconds for one answer: a bound against a hung prompt, not a speed target


def write(d: Path, cycles: int, start: dt.datetime, src: SimulatedSource) -> None:
    """New snapshots (and outcomes) through the lake's real writer, as a poll writes them."""
    pipeline.poll_cycles(LakePaths(d), src, SYMBOLS, pipeline.cycle_times(start, 2.0, cycles, 0))


def truth(d: Path) -> tuple[int, int]:
    """(rows, keys) of the snapshots as a fresh reader in this process sees them now."""
    from microstructure.lake.views import connect

    n = connect(LakePaths(d)).sql("SELECT count(*) FROM snapshots").fetchall()[0][0]
    return n, n


def more(d: Path, last: tuple[int, int]) -> tuple[int, int]:
    """The truth after a write, which must have added rows (else a stale prompt would pass)."""
    now = truth(d)
    assert now[0] > last[0], "the writer added no rows: the test would prove nothing"
    return now


def cycle_start(k: int) -> dt.datetime:
    return T0 + dt.timedelta(seconds=1000 * k)


def counted(text: str) -> tuple[int, int]:
    m = re.findall(r"rows=(\d+) keys=(\d+)", text)
    assert m, text
    return int(m[-1][0]), int(m[-1][1])


class Piped:
    """The prompt with its input and output on pipes, the way a script drives it."""

    def __init__(self, d: Path) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "microstructure", "sql", "--data-dir", str(d)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.n = 0
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def ask(self, statement: str) -> str:
        """Everything the prompt printed for ``statement``. A made-up command after it marks where the answer
        ends: the prompt answers it with an error line of its own, without reading the lake."""
        assert self.p.stdin is not None
        self.n += 1
        marker = f"error: unknown command .end-of-answer-{self.n} "
        self.p.stdin.write(f"{statement}\n.end-of-answer-{self.n}\n")
        self.p.stdin.flush()
        out = []
        while True:
            line = self.lines.get(timeout=WAIT)
            assert line is not None, f"the prompt ended: {out}"
            if line.startswith(marker):
                return "\n".join(out)
            out.append(line)

    def close(self) -> int:
        assert self.p.stdin is not None
        self.p.stdin.write(".quit\n")
        self.p.stdin.close()
        return self.p.wait(WAIT)


@pytest.fixture
def lake_dir(tmp_path: Path) -> tuple[Path, SimulatedSource]:
    d = tmp_path / "data"
    src = SimulatedSource(seed=7)
    write(d, 4, cycle_start(0), src)
    return d, src


def test_rows_written_after_the_prompt_opened_are_seen(lake_dir):
    d, src = lake_dir
    prompt = Piped(d)
    try:
        assert counted(prompt.ask(COUNT)) == (n := truth(d))
        write(d, 3, cycle_start(1), src)
        assert counted(prompt.ask(COUNT)) == (n := more(d, n))
        write(d, 2, cycle_start(2), src)
        assert counted(prompt.ask(COUNT)) == more(d, n)
        assert re.search(r"n=45\b", prompt.ask("SELECT 'n=' || count(*) AS r FROM outcomes;"))  # 5 symbols x 9
    finally:
        assert prompt.close() == 0


def test_a_compaction_after_the_prompt_opened_changes_nothing_for_it(tmp_path):
    d = tmp_path / "data"
    LakePaths(d).root.mkdir(parents=True)
    src = SimulatedSource(seed=7)
    prompt = Piped(d)  # opened on a lake with no rows yet
    try:
        assert counted(prompt.ask(COUNT)) == (n := truth(d)) == (0, 0)
        write(d, 4, cycle_start(0), src)
        write(d, 4, cycle_start(1), src)
        part = LakePaths(d).partition(SNAPSHOTS, T0.date())
        assert len(partition_files(part)) > 1
        compact_all(LakePaths(d))  # the files it would have listed are replaced by one merged file
        assert len(list(part.glob("*.parquet"))) == 1
        assert counted(prompt.ask(COUNT)) == (n := more(d, n))
        # And after that compaction, rows written next are seen beside the merged file, then merged again.
        write(d, 2, cycle_start(2), src)
        assert counted(prompt.ask(COUNT)) == (n := more(d, n))
        r = subprocess.run([sys.executable, "-m", "microstructure", "compact", "--data-dir", str(d)],
                           capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 0, r.stderr
        assert len(list(part.glob("*.parquet"))) == 1
        assert counted(prompt.ask(COUNT)) == truth(d) == n
        assert "error" not in prompt.ask("SELECT max(date) AS d FROM snapshots;")
    finally:
        assert prompt.close() == 0


def test_a_statement_never_fails_while_the_compactor_swaps_files(lake_dir):
    """A writer appends and a rolling compactor merges, all the while the prompt answers: no statement fails, no
    row is counted twice, and no answer has fewer rows than the one before (nothing vanishes, even for a
    moment)."""
    d, src = lake_dir
    paths = LakePaths(d)
    stop = threading.Event()
    merges: list[tuple[int, int]] = []
    errors: list[str] = []

    def compact_loop() -> None:
        while not stop.is_set():
            for level in (0, 1, None):
                try:
                    merges.append(compact(paths, SNAPSHOTS, T0.date(), ("symbol", "event_ts", "source"),
                                          ("symbol", "event_ts"), level=level, min_files=2))
                except Exception as e:  # a failure of the compactor would make the test prove nothing
                    errors.append(f"compactor: {type(e).__name__}: {e}")
                stop.wait(0.005)

    prompt = Piped(d)
    compactor = threading.Thread(target=compact_loop)
    compactor.start()
    seen: list[tuple[int, int]] = []
    try:
        for k in range(1, 25):
            write(d, 2, cycle_start(k), src)
            for _ in range(3):
                answer = prompt.ask(COUNT)
                assert "error" not in answer, answer
                seen.append(counted(answer))
    finally:
        stop.set()
        compactor.join(WAIT)
        assert prompt.close() == 0
    assert errors == []
    assert sum(1 for before, after in merges if after < before) >= 5, "the compactor hardly ever swapped files"
    assert all(rows == keys for rows, keys in seen), "a row counted twice"
    assert all(b[0] >= a[0] for a, b in itertools.pairwise(seen)), "an answer saw fewer rows than the one before"
    assert seen[-1] == truth(d)


def test_an_unknown_dot_command_is_one_error_line(lake_dir):
    d, _ = lake_dir
    prompt = Piped(d)
    try:
        answer = prompt.ask(".schema snapshots")
        assert answer.strip() == "error: unknown command .schema snapshots (.help lists the commands)"
        assert counted(prompt.ask(COUNT)) == truth(d)  # the prompt goes on
        tables = prompt.ask(".tables")
        assert all(name in tables for name in DATASETS), tables
    finally:
        assert prompt.close() == 0


def test_a_symlink_planted_after_the_prompt_opened_is_never_read(lake_dir, tmp_path):
    """The prompt lists the lake for each statement, so each listing is checked again: a link out of the lake
    planted while it is open is refused like one there at the start, and what it points to never shows."""
    d, _ = lake_dir
    part = LakePaths(d).partition(SNAPSHOTS, T0.date())
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(partition_files(part)[0].read_bytes())  # real rows, outside the lake
    prompt = Piped(d)
    try:
        n = counted(prompt.ask(COUNT))
        (part / "part-zz-planted.parquet").symlink_to(outside)
        answer = prompt.ask(COUNT)
        assert answer.startswith("error: ") and "resolves outside the lake" in answer, answer
        assert "rows=" not in answer
        (part / "part-zz-planted.parquet").unlink()
        assert counted(prompt.ask(COUNT)) == n  # the prompt goes on, the lake as it was
    finally:
        assert prompt.close() == 0


class Terminal:
    """The prompt on a pseudo-terminal: what a person at a shell gets (line editing, DuckDB's boxes)."""

    def __init__(self, d: Path) -> None:
        import fcntl
        import struct
        import termios

        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # wide: boxes not cut
        env = {**os.environ, "TERM": "dumb"}  # no escape sequences from readline
        self.p = subprocess.Popen([sys.executable, "-m", "microstructure", "sql", "--data-dir", str(d)],
                                  stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.buf = ""

    def until(self, pattern: str) -> str:
        """Read until ``pattern`` (a regex) shows in what came since the last call; return that text."""
        deadline = WAIT
        while not re.search(pattern, self.buf):
            ready, _, _ = select.select([self.master], [], [], deadline)
            assert ready, f"no {pattern!r} in {self.buf!r}"
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the prompt closed the terminal
                chunk = b""
            assert chunk, f"the prompt ended before {pattern!r}: {self.buf!r}"
            self.buf += chunk.decode(errors="replace").replace("\r\n", "\n")
        m = re.search(pattern, self.buf)
        assert m is not None
        text, self.buf = self.buf[:m.end()], self.buf[m.end():]
        return text

    def type(self, line: str) -> str:
        """Type a line; what the prompt answered, up to its next prompt."""
        os.write(self.master, (line + "\n").encode())
        return self.until(r"(?m)^D $")

    def close(self) -> int:
        os.write(self.master, b".quit\n")
        code = self.p.wait(WAIT)
        os.close(self.master)
        return code


def test_help_lists_the_views_the_commands_and_how_to_quit(lake_dir):
    d, src = lake_dir
    term = Terminal(d)
    try:
        banner = term.until(r"(?m)^D $")
        assert ".help" in banner and ".quit" in banner
        text = term.type(".help")
        notes = view_notes()
        assert set(notes) == set(DATASETS)
        for name in DATASETS:  # one line each, with its description from views.sql
            assert re.search(rf"(?m)^  {name} +{re.escape(notes[name])}$", text), (name, text)
        for cmd in DOT_COMMANDS:
            assert re.search(rf"(?m)^  {re.escape(cmd)} +\S", text), (cmd, text)
        assert "Ctrl-D" in text and ".exit" in text
        # The person's own path too: rows written after the prompt opened show in its box.
        assert counted(term.type(COUNT)) == (n := truth(d))
        write(d, 3, cycle_start(1), src)
        assert counted(term.type(COUNT)) == more(d, n)
    finally:
        assert term.close() == 0


# --- hostile files planted between statements, hostile stdin (review attacks) -----------------------------------
# Failing before: each of these ended the prompt with `error: FileNotFoundError` / `RuntimeError: Symlink loop` /
# `OSError: ... Couldn't deserialize thrift` / `TypeError: extract_statements()`, exit 1: one planted file or one
# line of binary input killed a prompt someone had open, instead of one error line for that statement.

PLANTS = {
    "dangling_link": lambda part: (part / "part-zz-planted.parquet").symlink_to(part / "no-such-file.parquet"),
    "symlink_loop": lambda part: (part / "part-zz-planted.parquet").symlink_to("part-zz-planted.parquet"),
    "hostile_footer": lambda part: (part / "part-zz-planted.parquet").write_bytes(
        b"PAR1" + b"\xff" * 64 + (64).to_bytes(4, "little") + b"PAR1"),  # a footer that is no thrift at all
    "not_parquet": lambda part: (part / "part-zz-planted.parquet").write_bytes(b"root:x:0:0:root:/root:/bin/sh\n"),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_a_hostile_file_planted_between_statements_is_one_error_line_and_the_prompt_goes_on(lake_dir, plant):
    d, _ = lake_dir
    part = LakePaths(d).partition(SNAPSHOTS, T0.date())
    prompt = Piped(d)
    try:
        n = counted(prompt.ask(COUNT))
        PLANTS[plant](part)
        answer = prompt.ask(COUNT)
        assert answer.startswith("error: ") and len(answer.splitlines()) == 1, answer
        assert "part-zz-planted.parquet" in answer and "Error:" not in answer, answer  # names the file, no class
        (part / "part-zz-planted.parquet").unlink()
        assert counted(prompt.ask(COUNT)) == n  # the prompt goes on, the lake as it was
    finally:
        assert prompt.close() == 0


@pytest.mark.parametrize("encoding", ["", "utf-8:strict"])  # the C locale's surrogateescape; a strict UTF-8 one
def test_binary_garbage_on_stdin_is_one_error_line_and_the_prompt_goes_on(lake_dir, encoding):
    d, _ = lake_dir
    r = subprocess.run([sys.executable, "-m", "microstructure", "sql", "--data-dir", str(d)],
                       input=b"SELECT 1 AS a;\n\xff\xfe\x80garbage;\nSELECT 42 AS answer;\n", capture_output=True,
                       timeout=WAIT, env={**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": encoding})
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "error: the statement is not UTF-8 text" in out and out.rstrip().endswith("42"), out
    assert r.stderr == b""


def test_a_column_name_with_terminal_escapes_is_printed_escaped_by_a_piped_prompt(lake_dir):
    """Failing before: the piped prompt escaped control characters in the cells only, so a column alias carried
    ESC sequences (colours, an OSC window title, BEL) to whatever showed the output."""
    d, _ = lake_dir
    q = 'SELECT 1 AS "\x1b[31mRED\x1b]0;pwned\x07", chr(27) || \'[2J\' AS "ok";\n'
    r = subprocess.run([sys.executable, "-m", "microstructure", "sql", "--data-dir", str(d)], input=q,
                       capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout, repr(r.stdout)
    assert "\\x1b[31mRED" in r.stdout and "\\x1b[2J" in r.stdout, repr(r.stdout)
