"""Databento's live MBP-10 (ten price levels a side, US stocks) through the official ``databento`` SDK.

One subscription for every configured symbol, made once (``schema="mbp-10"``, ``stype_in="raw_symbol"``, the
dataset configurable, ``XNAS.ITCH`` by default: Nasdaq's own book, not the consolidated NBBO). A background
thread keeps the connection; the SDK's callback keeps the *latest* record per symbol that ends a venue event
(``F_LAST``; bounded: one record a symbol, only subscribed symbols), and each ``fetch()`` samples those records
as the cycle's books: ``event_ts`` is the record's ``ts_event``, ``received_ts`` our clock when the record arrived.

A book we cannot vouch for is never served:
- the gateway sets ``F_MAYBE_BAD_BOOK`` on a record after an unrecoverable gap in its channel, and a record whose
  ``sequence`` goes backwards for its instrument means the venue started over: that symbol's book is a ``gap``
  until a clean record arrives for it. (A forward jump of ``sequence`` is no gap: the venue numbers every message
  of the channel, so one instrument's numbers skip whatever the others were sent.)
- a dropped connection marks every book a ``gap``; the thread reconnects with back-off and subscribes again, and
  each symbol is served again on its first record of the new session.
- a level whose price is ``UNDEF_PRICE`` ends its side; a defined level after an undefined one, a side with no
  level, or an empty book goes to quarantine with its reason.

The SDK has its own reconnect policy, but it tries once without back-off and gives up if that try fails; the
loop here keeps trying (1 s doubling to 60 s) and tells the chain what state it is in.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from microstructure.contract.book import BookQuote, plausible_ns
from microstructure.sources.guard import AUTH, CONNECTION, UNAVAILABLE, UNKNOWN_SYMBOL, Limits, SourceError
from microstructure.sources.secrets import scrub
from microstructure.sources.symbol_lists import check_symbols
from microstructure.sources.vendor import ConfigError, Fetched, env_key, is_loopback

GATEWAY_ENV = "MICROSTRUCTURE_DATABENTO_LIVE_GATEWAY"
DEFAULT_DATASET = "XNAS.ITCH"
DEFAULT_PORT = 13000  # the SDK's DEFAULT_REMOTE_PORT, also the stand-in's default
GAP = "gap"  # error class and quarantine reason: the symbol's book may have missed updates
MAX_LEVELS = 10
# Back-off between connection attempts. A rejected key is not retried at all: the same key fails again.
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
STABLE_S = 30.0  # a session that streamed this long resets the back-off
# How long building the source waits for its first connection's verdict: a rejected key stops the poll at
# once with one error line; a gateway that is slow or down only makes the source unavailable (the chain falls
# back) while the thread keeps trying.
FIRST_CONNECT_WAIT_S = 15.0
# The gateway sends a heartbeat after 30 s without data (the SDK asks for 30 s); a session silent for that plus the
# SDK's own 10 s margin is dead. The SDK's heartbeat monitor only counts from the first record, so a gateway that
# authenticates and then sends nothing would hold the session forever: our own watch ends it.
SILENCE_S = 40.0
# Symbol mappings, gateway errors and system messages a session may send: one mapping a symbol at the start, a
# few more when the venue reassigns ids. Past this the gateway is hostile or broken (each mapping also grows the
# SDK's own symbology map, each error message its error list): the session is ended and retried after back-off.
MAX_CONTROL_RECORDS_PER_SYMBOL = 4
MAX_CONTROL_RECORDS_EXTRA = 1000
CLOSE_WAIT_S = 2.0  # close() waits this long for the connection thread to end
WATCH_S = 0.2  # how often the connection thread checks the session (silence, close())
MAX_ERROR_CHARS = 300
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_DATASET = re.compile(r"[A-Za-z0-9]{1,15}\.[A-Za-z0-9]{1,15}")  # XNAS.ITCH, GLBX.MDP3, DBEQ.BASIC

# The SDK logs a refused key or a lost connection at ERROR; with no logging set up Python's last-resort
# handler would print those next to our own one-line error. A NullHandler keeps them out of a bare CLI while
# an application's own logging (propagation to the root) still sees them.
logging.getLogger("databento").addHandler(logging.NullHandler())


def gateway_from_env() -> tuple[str, int] | None:
    """``host[:port]`` from ``MICROSTRUCTURE_DATABENTO_LIVE_GATEWAY``, loopback hosts only; None = Databento.

    Only the environment picks a stand-in (tests, benchmarks), never a sources file. CRAM never sends the key
    itself, but a gateway we did not choose could feed us any book, so the override is for this machine only.
    """
    raw = os.environ.get(GATEWAY_ENV, "").strip()
    if not raw:
        return None
    host, port = raw, str(DEFAULT_PORT)
    if raw.startswith("["):  # [::1]:13000
        host, _, rest = raw[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"{GATEWAY_ENV} must be host[:port]")
            port = rest[1:]
    elif raw.count(":") == 1:
        host, port = raw.split(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{GATEWAY_ENV}: port must be a number from 1 to 65535")
    if not is_loopback(host):
        raise ConfigError(f"{GATEWAY_ENV} may only point at a loopback host (127.0.0.1, ::1, localhost), "
                          f"not {host[:100]!r}")
    return host, int(port)


@dataclass
class _Latest:
    """The newest record of one symbol and when it arrived (epoch ns, our clock); ``gap`` when the book may have
    missed updates since (set by a flagged record, a backwards sequence or a reconnect)."""

    record: Any
    received_ns: int
    sequence: int
    gap: str | None = None
    quarantine: bool = False  # the record itself is suspect (flagged, sequence back)
    reported: bool = False  # this record has had its quarantine row: one row a record, not one a cycle


def _side(levels: Sequence[Any], side: str, lot: float) -> tuple[list[tuple[float, float | None]], bool]:
    """One side's (price, size) levels, best first, up to the first undefined price; and whether a defined level
    followed an undefined one (a hole: the record is malformed)."""
    from databento_dbn import FIXED_PRICE_SCALE, UNDEF_PRICE

    out: list[tuple[float, float | None]] = []
    ended = hole = False
    for lv in levels:
        px = getattr(lv, f"{side}_px")
        if px == UNDEF_PRICE:
            ended = True
            continue
        if ended:
            hole = True
            break
        out.append((px / FIXED_PRICE_SCALE, float(getattr(lv, f"{side}_sz")) * lot))
    return out, hole


def _describe(rec: Any) -> str:
    """A short text of a record for a quarantine row: its key fields and the levels as fixed-point integers."""
    lv = [(b.bid_px, b.bid_sz, b.ask_px, b.ask_sz) for b in rec.levels]
    return (f"instrument_id={rec.instrument_id} ts_event={rec.ts_event} sequence={rec.sequence} "
            f"flags={rec.flags} levels(bid_px,bid_sz,ask_px,ask_sz)={lv}")


class DatabentoLiveSource:
    """A :class:`VendorSource` over one live MBP-10 subscription (see the module doc)."""

    def __init__(self, name: str = "databento", asset: str = "stocks", limits: Limits | None = None,
                 lot_size: float = 1.0, dataset: str = DEFAULT_DATASET, symbols: Sequence[str] = (),
                 first_connect_wait_s: float = FIRST_CONNECT_WAIT_S, silence_s: float = SILENCE_S) -> None:
        if asset != "stocks":
            raise ConfigError(f"{name}: the databento source serves US stocks only (asset = \"stocks\")")
        # A dataset code is VENUE.FEED; it travels in the auth line and names the gateway host, so nothing else
        # (a "|" or newline would add fields or lines; the sources file may come from anyone).
        if not isinstance(dataset, str) or len(dataset) > 32 or not _DATASET.fullmatch(dataset):
            raise ConfigError(f"{name}: dataset must be a Databento dataset code such as {DEFAULT_DATASET!r}")
        self.name, self.asset, self.max_levels = name, asset, MAX_LEVELS
        self.limits = limits or Limits()
        self.lot_size, self.dataset, self.silence_s = lot_size, dataset, silence_s
        # Checked here too (a library caller skips the CLI's check): a symbol is sent inside a control line, so a
        # "|", "," or newline in one would add fields or lines to the subscription.
        self.symbols = check_symbols(symbols, f"source {name!r}")
        # The SDK upper-cases raw symbols before it sends them, so the gateway maps "BRK.B" for our "brk.b".
        self._ours: dict[str, str] = {}
        for s in self.symbols:
            if s.upper() in self._ours:
                raise ConfigError(f"source {name!r}: {self._ours[s.upper()]!r} and {s!r} are one symbol to "
                                  "Databento (it upper-cases symbols)")
            self._ours[s.upper()] = s
        key = env_key("DATABENTO_API_KEY", True, f"source {name!r} needs a Databento API key in the environment")
        if key is None or not key.strip() or any(c in key for c in "|\r\n"):
            raise ConfigError("DATABENTO_API_KEY is blank or holds characters no Databento key has")
        self._key = key.strip()
        self._gateway = gateway_from_env()
        self._wanted = frozenset(self.symbols)
        self._lock = threading.Lock()
        self._latest: dict[str, _Latest] = {}
        self._by_id: dict[int, str] = {}  # instrument_id -> our symbol, only for subscribed symbols
        self._id_of: dict[str, int] = {}  # the reverse: one id a symbol, so both stay as small as the symbol list
        self._controls = 0  # control records (mappings, errors, system messages) of the current session
        self._max_controls = MAX_CONTROL_RECORDS_PER_SYMBOL * len(self.symbols) + MAX_CONTROL_RECORDS_EXTRA
        self._ended: str | None = None  # why we ended the current session ourselves (silent, hostile)
        self._state: SourceError | None = SourceError(CONNECTION, f"{name}: not connected yet")
        self._fatal: SourceError | None = None
        self._notice = ""  # the gateway's last error or system message (say, a symbol it could not resolve)
        self._stop = threading.Event()
        self._first = threading.Event()
        self._client: Any = None
        self._heard_ns = 0  # monotonic ns of the last record of any kind (heartbeats too) of the current session
        self.sessions = 0  # connections that authenticated and started streaming
        if not self.symbols:
            return  # nothing to subscribe: every fetch answers "not subscribed"
        self._thread = threading.Thread(target=self._run, name=f"src-{name}", daemon=True)
        self._thread.start()
        self._first.wait(first_connect_wait_s)
        refused = self.refused()
        if refused is not None:
            self.close()
            raise ConfigError(f"{name}: Databento refused DATABENTO_API_KEY ({refused.detail})")

    def refused(self) -> SourceError | None:
        """The gateway's refusal of our key, if it refused it (then no connection is tried again)."""
        return self._fatal if self._fatal is not None and self._fatal.error_class == AUTH else None

    def __repr__(self) -> str:  # the client holds the key; keep it out of any repr
        return f"DatabentoLiveSource(name={self.name!r}, dataset={self.dataset!r})"

    # ---- the connection thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = BACKOFF_FIRST_S
        try:
            while not self._stop.is_set():
                try:
                    stable = self._session()
                except Exception as e:  # the SDK refused our arguments: tried again after the back-off
                    self._state, stable = SourceError(CONNECTION, f"{self.name}: {_text(e)}"), False
                if self._fatal is not None or self._stop.is_set():
                    break
                # Only a session that streamed for a while resets the back-off: a gateway that accepts and hangs
                # up at once (or that we end as silent or hostile) is retried 1, 2, 4 ... 60 s apart, not every second.
                wait = BACKOFF_FIRST_S if stable else backoff
                backoff = min(wait * 2, BACKOFF_MAX_S)
                state = self._state
                if state is not None:
                    self._state = SourceError(state.error_class, f"{state.detail}; next try in {wait:.0f} s")
                self._stop.wait(wait)
        finally:
            self._first.set()

    def _session(self) -> bool:
        """One connection: subscribe, stream until it ends. True if it streamed for ``STABLE_S`` and ended by the
        gateway's doing (then the back-off starts again from its first step)."""
        import databento as db

        host, port = self._gateway or (None, DEFAULT_PORT)
        client = db.Live(key=self._key, gateway=host, port=port)
        # Bound to this client: a record of an ended session that the SDK still dispatches is dropped.
        client.add_callback(lambda rec: self._on_record(rec, client), self._on_callback_error)
        started = False
        try:
            with self._lock:
                self._client = client
                self._by_id.clear()  # instrument ids are the session's: mappings come again
                self._id_of.clear()
                self._controls, self._ended = 0, None
            if self._stop.is_set():
                return False
            try:
                client.subscribe(dataset=self.dataset, schema="mbp-10", stype_in="raw_symbol", symbols=self.symbols)
            except Exception as e:
                self._state = _classify_connect(self.name, e)
                # A refusal before any session is the key's: the same key fails again, so the poll stops. After a
                # good session the same key was accepted; the refusal (sessions at their limit, a gateway
                # restarting, a dataset entitlement lapsing) is retried with back-off like a lost connection.
                if self._state.error_class == AUTH:
                    if self.sessions == 0:
                        self._fatal = self._state
                    else:  # not "auth": the chain stops the poll when every outcome of a cycle is "auth"
                        self._state = SourceError(CONNECTION, f"{self.name}: the gateway refused the reconnect "
                                                              f"({self._state.detail})")
                return False
            with self._lock:
                if self._stop.is_set():  # close() came while we were connecting: never start streaming
                    return False
                self._heard_ns = time.monotonic_ns()
                client.start()
            started = True
            self.sessions += 1
            self._state = None
            self._first.set()
            began = time.monotonic()
            why = self._watch(client)
            self._state = SourceError(CONNECTION, f"{self.name}: {self._ended or why}; reconnecting")
            return self._ended is None and time.monotonic() - began >= STABLE_S
        finally:
            self._first.set()
            with self._lock:  # from here on this client's records are dropped, before any book is marked
                self._client = None
            self._mark_all_gap("reconnect" if started else None)
            with contextlib.suppress(Exception):  # never connected, or already closed: nothing to end
                client.terminate()

    def _watch(self, client: Any) -> str:
        """Until the session ends, ``close()`` asks, or the gateway has sent nothing (not even a heartbeat) for
        ``silence_s``: then the session is ended here. Why it ended."""
        while client.is_connected():
            if self._stop.wait(WATCH_S):
                return "closed"
            silent_s = (time.monotonic_ns() - self._heard_ns) / 1e9
            if silent_s > self.silence_s:
                self._ended = f"the gateway sent nothing for {silent_s:.0f} s"
                client.terminate()
                return self._ended
        try:
            client.block_for_close()
            return "the gateway closed the connection"
        except Exception as e:
            return f"connection lost: {_text(e)}"

    def _mark_all_gap(self, why: str | None) -> None:
        if why is None:
            return
        with self._lock:
            for latest in self._latest.values():
                latest.gap = f"{why}: updates may have been missed since this book"
                latest.sequence = -1  # a new session may number afresh: no "went back" against the old one

    def _on_callback_error(self, e: Exception) -> None:
        self._notice = f"record handling failed: {_text(e)}"

    def _on_record(self, rec: Any, client: Any) -> None:
        """On the SDK's event-loop thread, for every record of ``client``'s session: as little work as possible."""
        import databento_dbn as dbn

        now = time.time_ns()
        self._heard_ns = time.monotonic_ns()
        if isinstance(rec, dbn.MBP10Msg):
            gap = None
            if rec.flags & dbn.F_MAYBE_BAD_BOOK:
                gap = f"the gateway flagged an unrecoverable gap in its channel (sequence {rec.sequence})"
            elif not rec.flags & dbn.F_LAST:
                # Mid-event (a sweep through several levels is several records): not a book the venue ever showed.
                # The event's last record, F_LAST, comes in the same packet and carries the whole top ten after it.
                return
            with self._lock:
                if client is not self._client:
                    return  # a record of an ended session, dispatched late: its books are already gaps
                sym = self._by_id.get(rec.instrument_id)
                if sym is None:
                    return  # a record for an instrument we have no mapping for: not ours
                prev = self._latest.get(sym)
                if gap is None and prev is not None and rec.sequence < prev.sequence:
                    gap = f"sequence went back from {prev.sequence} to {rec.sequence}"
                self._latest[sym] = _Latest(rec, now, rec.sequence, gap, gap is not None)
            return
        if isinstance(rec, dbn.SystemMsg) and rec.is_heartbeat():
            return
        if isinstance(rec, dbn.SymbolMappingMsg | dbn.ErrorMsg | dbn.SystemMsg):
            with self._lock:
                if client is not self._client or self._ended is not None:
                    return
                self._controls += 1
                if self._controls > self._max_controls:
                    self._ended = (f"the gateway sent more than {self._max_controls} symbol mappings, errors and "
                                   "system messages in one session")
            if self._ended is not None:
                with contextlib.suppress(Exception):  # already closing
                    client.terminate()
                return
        if isinstance(rec, dbn.SymbolMappingMsg):
            # With stype_in raw_symbol the input symbol is ours. An id mapped to a symbol we did not subscribe to
            # is no longer ours (instrument ids are reused); a symbol of ours has one id, its latest.
            sym = self._ours.get(rec.stype_in_symbol) or self._ours.get(rec.stype_out_symbol)
            iid = rec.instrument_id
            with self._lock:
                gone = self._by_id.pop(iid, None)
                if gone is not None and self._id_of.get(gone) == iid:
                    del self._id_of[gone]
                if sym is not None:
                    old = self._id_of.get(sym)
                    if old is not None:
                        self._by_id.pop(old, None)
                    self._by_id[iid], self._id_of[sym] = sym, iid
        elif isinstance(rec, dbn.ErrorMsg):
            self._notice = f"gateway error: {_text(rec.err)}"
        elif isinstance(rec, dbn.SystemMsg):
            self._notice = f"gateway: {_text(rec.msg)}"

    # ---- the poll ----------------------------------------------------------------------------------------
    def fetch(self, symbols: Sequence[str], at: dt.datetime, deadline: float | None = None) -> Fetched:
        if self._fatal is not None:
            raise self._fatal
        with self._lock:
            snap = {s: self._latest.get(s) for s in symbols}
            mapped = set(self._id_of)
        state = self._state
        out = Fetched()
        for s in symbols:
            latest = snap[s]
            if s not in self._wanted:
                out.errors[s] = SourceError(UNKNOWN_SYMBOL, f"{self.name} did not subscribe to {s}")
            elif latest is None:
                if state is not None:
                    out.errors[s] = state
                elif s not in mapped:
                    out.errors[s] = SourceError(UNKNOWN_SYMBOL, f"{self.name}: {self.dataset} sent no mapping "
                                                                f"for {s} (last notice: {self._notice or 'none'})")
                else:
                    out.errors[s] = SourceError(UNAVAILABLE, f"{self.name}: no MBP-10 record for {s} yet")
            elif latest.gap is not None:
                now = f" (now: {state.detail})" if state is not None else ""  # disconnected: when the next try is
                out.errors[s] = SourceError(GAP, f"{self.name} {s}: {latest.gap}; served again on its next "
                                                 f"record{now}")
                if latest.quarantine and not latest.reported:
                    latest.reported = True
                    out.rejected.append((s, GAP, f"{latest.gap}: {_describe(latest.record)}"))
            else:
                self._shape(s, latest, out)
        if state is not None and not out.quotes:
            out.calls_ok = 0  # disconnected and nothing served: the chain counts it as a failed call
        return out

    def _shape(self, s: str, latest: _Latest, out: Fetched) -> None:
        rec = latest.record
        if not plausible_ns(rec.ts_event):  # UNDEF_TIMESTAMP, 0 or garbage: no time to file the book under
            self._reject(s, latest, "implausible_time", f"ts_event out of range: {_describe(rec)}", out)
            return
        bids, bid_hole = _side(rec.levels, "bid", self.lot_size)
        asks, ask_hole = _side(rec.levels, "ask", self.lot_size)
        if bid_hole or ask_hole:
            self._reject(s, latest, "level_gap", f"a defined level after an undefined one: {_describe(rec)}", out)
            return
        # Integer nanoseconds floored to microseconds (the lake's precision); a float division would round.
        received = _EPOCH + dt.timedelta(microseconds=latest.received_ns // 1000)
        event = _EPOCH + dt.timedelta(microseconds=rec.ts_event // 1000)
        # An empty or one-sided book is handed on as it is: the contract quarantines it with its reason.
        out.quotes.append(BookQuote(s, event, received, self.name, bids, asks))

    def _reject(self, s: str, latest: _Latest, reason: str, detail: str, out: Fetched) -> None:
        """Not a book: the symbol's error this cycle, and one quarantine row for the record (not one a cycle)."""
        out.errors[s] = SourceError(reason, f"{self.name} {s}: {detail[:200]}")
        if not latest.reported:
            latest.reported = True
            out.rejected.append((s, reason, detail))

    def close(self) -> None:
        """End the connection. A streaming session ends at once; a connection still in its handshake cannot be
        interrupted (the SDK waits up to 10 s to connect and 30 s to authenticate), but it never starts streaming:
        the thread ends it when the handshake returns."""
        self._stop.set()
        with self._lock:
            client = self._client
        if client is not None:
            with contextlib.suppress(Exception):  # already closed
                client.terminate()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_WAIT_S)


def _text(e: object) -> str:
    return scrub(e)[:MAX_ERROR_CHARS]


def _classify_connect(name: str, e: BaseException) -> SourceError:
    """Why a connection attempt failed. The SDK raises ``BentoError`` for all of them; a refused key is the one
    whose text is the gateway's own answer rather than the SDK's "Connection to ..."/"... timed out"."""
    from databento.common.error import BentoError

    msg = _text(e)
    if not isinstance(e, BentoError) or msg.startswith("Connection to") or "timed out" in msg:
        return SourceError(CONNECTION, f"{name}: {msg}")
    return SourceError(AUTH, msg or "authentication failed")
