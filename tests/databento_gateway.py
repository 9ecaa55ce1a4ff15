"""A local stand-in for Databento's live subscription gateway: raw TCP speaking the documented protocol.

Control phase (one text line each, ``key=value`` fields joined by ``|``): the gateway greets with
``lsg_version=...`` and a CRAM challenge ``cram=<challenge>``; the client answers
``auth=<sha256("<challenge>|<key>")>-<last 5 characters of the key>|dataset=...|encoding=dbn|...`` (the key itself is
never sent); the gateway says ``success=1|session_id=...`` or ``success=0|error=...`` and hangs up. Then the client
sends subscription lines ``schema=...|stype_in=...|symbols=a,b,...|...|is_last=0/1`` and ``start_session=0``, and the
gateway streams DBN: the Metadata header, one SymbolMappingMsg per symbol, then MBP-10 records (written with
``databento_dbn``, the SDK's own codec).

The test drives it: :meth:`drop` hangs up every live connection, :meth:`gap` sends a symbol a record flagged
``F_MAYBE_BAD_BOOK`` after skipping channel sequence numbers and then holds that symbol until :meth:`release`.
Every record sent is kept in ``sent`` (keyed by symbol and ``ts_event``) for the test to compare the lake with.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field

import databento_dbn as dbn

XNAS_ITCH = 2  # Databento's publisher id of XNAS.ITCH
TICK = 10_000_000  # $0.01 in DBN fixed point (1e-9)


@dataclass
class Sent:
    """One MBP-10 record as sent: fixed-point prices, sizes, and when it left (our clock, ns)."""

    bids: list[tuple[int, int]]
    asks: list[tuple[int, int]]
    flags: int
    sent_ns: int


@dataclass
class GatewayState:
    key: str
    symbols: list[str]
    period_s: float = 0.2
    sessions: int = 0
    auth_lines: list[str] = field(default_factory=list)  # every auth request a client sent (to check for the key)
    subscribed: list[list[str]] = field(default_factory=list)  # per session, the symbols asked for
    sent: dict[tuple[str, int], Sent] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)
    gaps: dict[str, int] = field(default_factory=dict)  # symbol -> ts_event of its flagged record
    pending_gap: set[str] = field(default_factory=set)
    # symbol -> "one_sided" (every ask undefined), "hole" (bid level 3 undefined, 4.. defined) or "no_time"
    # (ts_event undefined)
    shapes: dict[str, str] = field(default_factory=dict)
    greet_delay_s: float = 0.0  # accept, then wait this long before the greeting (a gateway that hangs)
    hang_up_after_s: float | None = None  # end every stream this long after it started (a flapping gateway)
    # symbols whose records all come without F_LAST: mid-event books, the event's last record still to come
    no_last: set[str] = field(default_factory=set)
    silent: bool = False  # authenticate and accept start_session, then send nothing at all (no Metadata, no heartbeat)
    mapping_flood: int = 0  # before any record, this many extra mappings of the first symbol, each to a new id
    reuse: tuple[str, str] | None = None  # (ours, other): give ours's instrument id to other, ours a new id
    sequence: int = 1000
    last_ts: int = 0
    conns: list[socket.socket] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _line(sock_file: object) -> str:
    raw = sock_file.readline(65536)  # type: ignore[attr-defined]
    if not raw:
        raise ConnectionError("client hung up")
    return raw.decode()


def _fields(line: str) -> dict[str, str]:
    return dict(t.partition("=")[::2] for t in line.strip().split("|"))


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        st = self.server.state
        cram = secrets.token_hex(16)
        if self.server.stopping.wait(st.greet_delay_s):
            return
        self.wfile.write(b"lsg_version=0.0.0-standin\n")
        self.wfile.write(f"cram={cram}\n".encode())
        try:
            auth = _line(self.rfile)
        except ConnectionError:
            return
        with st.lock:
            st.auth_lines.append(auth)
        f = _fields(auth)
        want = hashlib.sha256(f"{cram}|{st.key}".encode()).hexdigest() + "-" + st.key[-5:]
        if f.get("auth") != want or f.get("encoding") != "dbn":
            self.wfile.write(b"success=0|error=Authentication failed.\n")
            return
        with st.lock:
            st.sessions += 1
            session = st.sessions
        self.wfile.write(f"success=1|session_id={session}\n".encode())
        dataset, symbols = f.get("dataset", ""), []
        while True:
            try:
                msg = _fields(_line(self.rfile))
            except ConnectionError:
                return
            if "start_session" in msg:
                break
            if msg.get("schema") != "mbp-10" or msg.get("stype_in") != "raw_symbol":
                self.wfile.write(b"success=0|error=stand-in serves mbp-10 by raw_symbol only\n")
                return
            symbols += [s for s in msg.get("symbols", "").split(",") if s]
        with st.lock:
            st.subscribed.append(symbols)
            st.conns.append(self.connection)
        try:
            self._stream(dataset, symbols)
        except OSError:
            pass  # dropped by the test or by the client
        finally:
            with st.lock:
                if self.connection in st.conns:
                    st.conns.remove(self.connection)

    def _stream(self, dataset: str, symbols: list[str]) -> None:
        st = self.server.state
        if st.silent:
            self.server.stopping.wait()
            return
        now = time.time_ns()
        ids = {s: i + 1 for i, s in enumerate(symbols) if s in st.symbols}
        meta = dbn.Metadata(dataset, now, dbn.SType.RAW_SYMBOL, dbn.SType.INSTRUMENT_ID, dbn.Schema.MBP_10,
                            symbols=symbols, version=dbn.DBN_VERSION, ts_out=False)
        out = bytearray(bytes(meta))
        for s, iid in ids.items():
            out += bytes(dbn.SymbolMappingMsg(XNAS_ITCH, iid, now, dbn.SType.RAW_SYMBOL, s, dbn.SType.RAW_SYMBOL, s,
                                              now, now + 86_400 * 10**9))
        for k in range(st.mapping_flood):
            out += bytes(dbn.SymbolMappingMsg(XNAS_ITCH, 1_000_000 + k, now, dbn.SType.RAW_SYMBOL, symbols[0],
                                              dbn.SType.RAW_SYMBOL, symbols[0], now, now + 86_400 * 10**9))
        self.wfile.write(out)
        rnd = 0
        began = time.monotonic()
        while not self.server.stopping.is_set():
            if st.hang_up_after_s is not None and time.monotonic() - began > st.hang_up_after_s:
                return
            rnd += 1
            out = bytearray()
            with st.lock:
                reuse, st.reuse = st.reuse, None
            if reuse is not None:
                # The venue hands ours's instrument id to another symbol (mapping first, as a gateway would) and
                # gives ours a new id; the other symbol's records now come under the old id, after ours's.
                ours, other = reuse
                old_id = ids.pop(ours)
                new_id = 10_000 + old_id
                for sym, iid in ((other, old_id), (ours, new_id)):
                    out += bytes(dbn.SymbolMappingMsg(XNAS_ITCH, iid, now, dbn.SType.RAW_SYMBOL, sym,
                                                      dbn.SType.RAW_SYMBOL, sym, now, now + 86_400 * 10**9))
                ids[ours] = new_id
                ids[other] = old_id
            for s, iid in ids.items():
                out += self._record(s, iid, rnd)
            if out:
                self.wfile.write(out)
            time.sleep(st.period_s)

    def _record(self, s: str, iid: int, rnd: int) -> bytes:
        st = self.server.state
        with st.lock:
            if s in st.held:
                return b""
            flags = dbn.F_MBP | (0 if s in st.no_last else dbn.F_LAST)
            if s in st.pending_gap:
                st.pending_gap.discard(s)
                st.held.add(s)
                st.sequence += 500  # the channel lost messages
                flags |= dbn.F_MAYBE_BAD_BOOK
            st.sequence += 1
            # ts_event strictly increasing at microsecond precision (the lake's), so each record is its own key.
            ts = max(time.time_ns() // 1000 * 1000, st.last_ts + 1000)
            st.last_ts = ts
            base = (100 + iid) * 10**9 + (rnd % 50) * TICK
            bids = [(base - i * TICK, 100 * (i + 1) + rnd % 7) for i in range(10)]
            asks = [(base + (i + 1) * TICK, 50 * (i + 1) + iid % 5) for i in range(10)]
            shape = st.shapes.get(s)
            if shape == "one_sided":
                asks = [(dbn.UNDEF_PRICE, 0)] * 10
            elif shape == "hole":
                bids[2] = (dbn.UNDEF_PRICE, 0)
            elif shape == "no_time":
                ts = dbn.UNDEF_TIMESTAMP
            st.sent[(s, ts)] = Sent(bids, asks, flags, time.time_ns())
            if flags & dbn.F_MAYBE_BAD_BOOK:
                st.gaps[s] = ts
            seq = st.sequence
        levels = [dbn.BidAskPair(b[0], a[0], b[1], a[1], 1, 1) for b, a in zip(bids, asks, strict=True)]
        return bytes(dbn.MBP10Msg(XNAS_ITCH, iid, ts, bids[0][0], bids[0][1], dbn.Action.ADD, dbn.Side.BID, 0, ts,
                                  flags=flags, sequence=seq, levels=levels))


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, state: GatewayState) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state
        self.stopping = threading.Event()


class DatabentoGateway:
    def __init__(self, key: str, symbols: list[str], period_s: float = 0.2,
                 shapes: dict[str, str] | None = None) -> None:
        self.state = GatewayState(key, list(symbols), period_s, shapes=dict(shapes or {}))
        self._server = _Server(self.state)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="databento-standin", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> DatabentoGateway:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stopping.set()
        self.drop()
        self._server.shutdown()
        self._server.server_close()

    def drop(self) -> int:
        """Hang up every streaming connection (as a gateway restart would); how many were dropped."""
        with self.state.lock:
            conns, self.state.conns = list(self.state.conns), []
        for c in conns:
            with contextlib.suppress(OSError):  # already closed by the client
                c.shutdown(socket.SHUT_RDWR)
        return len(conns)

    def gap(self, symbol: str) -> None:
        """The next record of ``symbol`` comes after a jump of the channel's sequence and carries
        ``F_MAYBE_BAD_BOOK``; then ``symbol`` gets nothing until :meth:`release`."""
        with self.state.lock:
            self.state.pending_gap.add(symbol)

    def restart_numbering(self) -> None:
        """The venue starts its message numbers over (a new session): every instrument's sequence goes back."""
        with self.state.lock:
            self.state.sequence = 1

    def release(self, symbol: str) -> None:
        with self.state.lock:
            self.state.held.discard(symbol)
