"""IEX DEEP HIST replay: IEX's own aggregated price-level book, sampled into snapshots.

IEX publishes DEEP T+1 as pcap / pcap-ng captures (often gzipped) of IEX-TP v1 UDP packets whose
messages (protocol id 0x8004) include:

- ``8`` / ``5`` price level update, buy / sell side: flags u8, timestamp i64 ns, symbol 8s, size u32,
  price i64 (1/10 000 dollars). Size 0 deletes the level. Flag bit 0 set = "event processing complete":
  only then is the book consistent, so snapshots only ever show a consistent book.
- ``H`` trading status: status u8 (``H`` halted, ``P`` paused, ``O`` order acceptance, ``T`` trading),
  timestamp, symbol, reason 4s. ``O`` operational halt: ``O`` halted / ``N`` not halted.

All integers are little-endian (IEX Transport Specification 1.25, DEEP Specification 1.08). The book of
each symbol is sampled every ``cadence_s`` seconds like LOBSTER: ``received_ts`` is the grid time,
``event_ts`` the time of the last consistent update. Depth is IEX's alone: this is not a consolidated
book, and the README says so.
"""

from __future__ import annotations

import datetime as dt
import heapq
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from microstructure.contract.book import MAX_LEVELS, BookQuote, plausible_ns, raw_table
from microstructure.recorded.batch import Batch, file_time, take_batch
from microstructure.recorded.bounds import (
    MAX_BOOK_LEVELS,
    FileFormatError,
    GridBudget,
    InstantCounter,
    check_cadence,
    snippet,
)
from microstructure.recorded.streams import BoundedStream

SOURCE_NAME = "iex-deep"
DEEP_PROTOCOL = 0x8004
_TP = struct.Struct("<BBHIIHHqqq")  # IEX-TP header, 40 bytes
_PLU = struct.Struct("<Bq8sIq")  # after the type byte: flags, ts, symbol, size, price (29 bytes)
_STATUS = struct.Struct("<Bq8s4s")  # after the type byte: status, ts, symbol, reason (21 bytes)
_OPHALT = struct.Struct("<Bq8s")
HALTED_STATUS = {b"H", b"P"}
# A captured frame (pcap's largest snap length). A record claiming more is a corrupt capture: refused before it
# is read, whatever length its header claims.
MAX_PACKET_BYTES = 262_144
MAX_BLOCK_BYTES = 1 << 20  # a pcap-ng block (options included); packets inside are still <= MAX_PACKET_BYTES
QUOTES_PER_BATCH = 20_000  # BookQuote objects held before they become a table


class DeepFormatError(FileFormatError):
    pass


class _Exact:
    """Exact reads from a bounded stream (a short read only at the end)."""

    def __init__(self, stream: BoundedStream) -> None:
        self.s = stream
        self.offset = 0

    def read(self, n: int) -> bytes:
        out = self.s.read(n)
        while 0 < len(out) < n:
            more = self.s.read(n - len(out))
            if not more:
                break
            out += more
        self.offset += len(out)
        return out


def iter_udp_payloads(path: Path) -> Iterator[tuple[int, bytes]]:
    """(packet number, UDP payload) of a pcap or pcap-ng capture (Ethernet or raw-IP link types, IPv4), plain or
    gzip / zstd. A capture cut short, or a record longer than MAX_PACKET_BYTES, is a DeepFormatError."""
    with BoundedStream(path) as stream:
        fh = _Exact(stream)
        head = fh.read(4)
        if head == b"\x0a\x0d\x0d\x0a":
            yield from _pcapng(fh, path.name)
            return
        if len(head) < 4:
            raise DeepFormatError(f"{path.name}: empty or truncated capture")
        if head in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
            e = "<"
        elif head in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
            e = ">"
        else:
            raise DeepFormatError(f"{path.name}: not a pcap or pcap-ng file")
        rest = fh.read(20)
        if len(rest) < 20:
            raise DeepFormatError(f"{path.name}: the pcap header is cut short")
        link = struct.unpack(e + "HHiIII", rest)[5]
        n = 0
        while True:
            rec = fh.read(16)
            if not rec:
                return
            n += 1
            if len(rec) < 16:
                raise DeepFormatError(f"{path.name} packet {n}: the capture is cut short (record header)")
            _, _, incl, _ = struct.unpack(e + "IIII", rec)
            if incl > MAX_PACKET_BYTES:
                raise DeepFormatError(f"{path.name} packet {n}: a {incl:,}-byte record, more than "
                                      f"{MAX_PACKET_BYTES:,} (MAX_PACKET_BYTES): a corrupt capture")
            frame = fh.read(incl)
            if len(frame) < incl:
                raise DeepFormatError(f"{path.name} packet {n}: the capture is cut short ({len(frame)} of {incl} "
                                      "bytes)")
            p = _udp(frame, link)
            if p is not None:
                yield n, p


def _pcapng(fh: _Exact, name: str) -> Iterator[tuple[int, bytes]]:
    e = "<"
    links: list[int] = []
    block_type: bytes | None = b"\x0a\x0d\x0d\x0a"
    n = 0
    while True:
        if block_type is None:
            block_type = fh.read(4)
            if not block_type:
                return
        raw_len = fh.read(4)
        if len(block_type) < 4 or len(raw_len) < 4:
            raise DeepFormatError(f"{name} at byte {fh.offset:,}: the capture is cut short (block header)")
        if block_type == b"\x0a\x0d\x0d\x0a":
            bom = fh.read(4)
            e = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">"
            length = struct.unpack(e + "I", raw_len)[0]
            _check_block(length, fh, name)
            if len(fh.read(length - 12)) < length - 12:
                raise DeepFormatError(f"{name} at byte {fh.offset:,}: the capture is cut short")
            block_type = None
            continue
        btype = struct.unpack(e + "I", block_type)[0]
        length = struct.unpack(e + "I", raw_len)[0]
        _check_block(length, fh, name)
        body = fh.read(length - 8)
        block_type = None
        if len(body) < length - 8:
            raise DeepFormatError(f"{name} at byte {fh.offset:,}: the capture is cut short")
        if btype == 1 and len(body) >= 2:  # interface description
            links.append(struct.unpack(e + "H", body[:2])[0])
        elif btype == 6:  # enhanced packet
            n += 1
            if len(body) < 24:
                raise DeepFormatError(f"{name} packet {n}: an enhanced packet block too short to hold a packet")
            iface, _, _, cap, _ = struct.unpack(e + "IIIII", body[:20])
            if cap > min(MAX_PACKET_BYTES, len(body) - 24):
                raise DeepFormatError(f"{name} packet {n}: captured length {cap:,} does not fit its block")
            p = _udp(body[20:20 + cap], links[iface] if iface < len(links) else 1)
            if p is not None:
                yield n, p
        elif btype == 3 and len(body) >= 8:  # simple packet
            n += 1
            p = _udp(body[4:-4], links[0] if links else 1)
            if p is not None:
                yield n, p


def _check_block(length: int, fh: _Exact, name: str) -> None:
    if not (12 <= length <= MAX_BLOCK_BYTES and length % 4 == 0):
        raise DeepFormatError(f"{name} at byte {fh.offset:,}: a pcap-ng block of {length:,} bytes (at least 12, a "
                              f"multiple of 4, at most {MAX_BLOCK_BYTES:,}): a corrupt capture")


def _udp(frame: bytes, link: int) -> bytes | None:
    """The UDP payload of an IPv4 frame, or None for anything else. A payload cut short by the capture is
    returned as far as it goes (the DEEP parser then names the cut message)."""
    if link == 1:  # Ethernet
        if len(frame) < 14:
            return None
        ethertype = struct.unpack(">H", frame[12:14])[0]
        off = 14
        if ethertype == 0x8100:  # VLAN tag
            if len(frame) < 18:
                return None
            ethertype = struct.unpack(">H", frame[16:18])[0]
            off = 18
        if ethertype != 0x0800:
            return None
        ip = frame[off:]
    elif link in (101, 12, 228):  # raw IPv4
        ip = frame
    else:
        return None
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
        return None
    ihl = (ip[0] & 0x0F) * 4
    if ihl < 20 or len(ip) < ihl + 8:
        return None
    udp_len = struct.unpack(">H", ip[ihl + 4:ihl + 6])[0]
    if udp_len < 8:
        return None
    return ip[ihl + 8:ihl + udp_len]


def iter_messages(payload: bytes, where: str = "packet") -> Iterator[bytes]:
    """The DEEP messages of one IEX-TP payload (none for another protocol). A message that runs past the
    payload is a DeepFormatError: the capture or the packet was cut."""
    if len(payload) < _TP.size:
        return
    _, _, proto, _, _, plen, count, _, _, _ = _TP.unpack_from(payload)
    if proto != DEEP_PROTOCOL:
        return
    off = _TP.size
    end = min(len(payload), off + plen)
    for i in range(count):
        if off + 2 > end:
            raise DeepFormatError(f"{where}: message {i + 1} of {count} is missing (the packet is cut short)")
        (n,) = struct.unpack_from("<H", payload, off)
        if off + 2 + n > end:
            raise DeepFormatError(f"{where}: message {i + 1} of {count} runs past the packet ({n} bytes)")
        yield payload[off + 2:off + 2 + n]
        off += 2 + n


@dataclass
class _Book:
    bids: dict[int, int] = field(default_factory=dict)
    asks: dict[int, int] = field(default_factory=dict)
    snap: tuple[int, list[tuple[float, float]], list[tuple[float, float]]] | None = None  # last consistent
    snap_at: str = ""  # where the last consistent update was
    halted: bool = False
    halt_ts: int = 0

    def capture(self, ts: int, where: str) -> None:
        bids = heapq.nlargest(MAX_LEVELS, self.bids.items())
        asks = heapq.nsmallest(MAX_LEVELS, self.asks.items())
        self.snap = (ts, [(p / 1e4, float(s)) for p, s in bids], [(p / 1e4, float(s)) for p, s in asks])
        self.snap_at = where


def iter_iex_deep(path: Path, cadence_s: float = 1.0, symbols: set[str] | None = None) -> Iterator[Batch]:
    """Replay a DEEP capture into sampled snapshots, in ``Batch``es. A message whose timestamp is not plausible
    is quarantined (``implausible_time``) and applied to nothing: it never moves the grid. The grid is bounded
    (``bounds.MAX_GRID_POINTS``) and so are messages per instant and levels per book side."""
    check_cadence(cadence_s)
    step = round(cadence_s * 1e9)
    loaded = file_time(path)
    budget = GridBudget(cadence_s)
    instant = InstantCounter()
    books: dict[str, _Book] = {}
    quotes: list[BookQuote] = []
    origins: list[str] = []
    rejected: list[dict[str, Any]] = []
    next_grid: int | None = None
    n_msgs = 0
    n_deep = 0  # DEEP messages seen, of any type: a message's position in the file

    def emit(grid_ns: int) -> None:
        at = dt.datetime.fromtimestamp(grid_ns / 1e9, dt.UTC)
        for sym, b in books.items():
            if b.snap is None:
                continue
            ts, bids, asks = b.snap
            ev = max(ts, b.halt_ts)
            quotes.append(BookQuote(sym, dt.datetime.fromtimestamp(ev // 1000 / 1e6, dt.UTC), at, SOURCE_NAME,
                                    bids, asks, halted=b.halted))
            origins.append(b.snap_at)

    def flush() -> Batch:
        return take_batch(quotes, origins, rejected, loaded)

    for packet, payload in iter_udp_payloads(path):
        for m in iter_messages(payload, f"{path.name} packet {packet}"):
            n_deep += 1
            if not m:
                continue
            kind = m[:1]
            if kind in (b"8", b"5") and len(m) >= 1 + _PLU.size:
                flags, ts, sym_b, size, price = _PLU.unpack_from(m, 1)
            elif kind == b"H" and len(m) >= 1 + _STATUS.size:
                status, ts, sym_b, _ = _STATUS.unpack_from(m, 1)
            elif kind == b"O" and len(m) >= 1 + _OPHALT.size:
                status, ts, sym_b = _OPHALT.unpack_from(m, 1)
            else:
                continue
            sym = sym_b.rstrip(b" \x00").decode("ascii", "replace")
            if symbols and sym not in symbols:
                continue
            n_msgs += 1
            where = f"{path.name} packet {packet} message {n_deep}"
            if not plausible_ns(ts):
                rejected.append({"symbol": sym, "received_ts": loaded, "source": SOURCE_NAME,
                                 "reason": "implausible_time", "detail": f"timestamp={ts} ns since the epoch",
                                 "origin": where})
                continue
            instant.add(ts, where)
            if next_grid is None:
                next_grid = -(-ts // step) * step  # first grid time at or after the first message
            if ts > next_grid:
                budget.take(-(-(ts - next_grid) // step), where)  # before one of these grid times is emitted
                while ts > next_grid:
                    emit(next_grid)
                    next_grid += step
                    if len(quotes) >= QUOTES_PER_BATCH:
                        yield flush()
            b = books.setdefault(sym, _Book())
            if kind in (b"8", b"5"):
                side = b.bids if kind == b"8" else b.asks
                if size == 0:
                    side.pop(price, None)
                else:
                    side[price] = size
                    if len(side) > MAX_BOOK_LEVELS:
                        raise DeepFormatError(f"{where}: {snippet(sym, 20)} holds more than {MAX_BOOK_LEVELS:,} "
                                              "price levels on one side (MAX_BOOK_LEVELS): not a real book")
                if flags & 0x01:
                    b.capture(ts, where)
            elif kind == b"H":
                b.halted = bytes([status]) in HALTED_STATUS
                b.halt_ts = ts
            else:
                b.halted = bytes([status]) == b"O"
                b.halt_ts = ts
            if len(rejected) >= QUOTES_PER_BATCH:
                yield flush()
    if next_grid is not None:
        budget.take(1, f"{path.name} end")
        emit(next_grid)
    if n_msgs == 0:
        raise DeepFormatError(f"{path.name}: no IEX DEEP (protocol 0x8004) price-level or status messages")
    if quotes or rejected:
        yield flush()


def read_iex_deep(path: Path, cadence_s: float = 1.0, symbols: set[str] | None = None) -> pa.Table:
    """All sampled snapshots as one raw table (small captures and tests; backfill streams ``iter_iex_deep``)."""
    tables = [b.raw for b in iter_iex_deep(path, cadence_s, symbols)]
    return pa.concat_tables(tables) if tables else raw_table({"symbol": pa.array([], pa.string())})
