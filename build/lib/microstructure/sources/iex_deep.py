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
import gzip
import heapq
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from microstructure.book import MAX_LEVELS, BookQuote, table_from_quotes

SOURCE_NAME = "iex-deep"
DEEP_PROTOCOL = 0x8004
_TP = struct.Struct("<BBHIIHHqqq")  # IEX-TP header, 40 bytes
_PLU = struct.Struct("<Bq8sIq")  # after the type byte: flags, ts, symbol, size, price (29 bytes)
_STATUS = struct.Struct("<Bq8s4s")  # after the type byte: status, ts, symbol, reason (21 bytes)
_OPHALT = struct.Struct("<Bq8s")
HALTED_STATUS = {b"H", b"P"}


class DeepFormatError(ValueError):
    pass


def _open(path: Path):  # type: ignore[no-untyped-def]
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def iter_udp_payloads(path: Path) -> Iterator[bytes]:
    """UDP payloads of a pcap or pcap-ng capture (Ethernet or raw-IP link types, IPv4)."""
    with _open(path) as fh:
        head = fh.read(4)
        if head == b"\x0a\x0d\x0d\x0a":
            yield from _pcapng(fh, head)
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
        link = struct.unpack(e + "HHiIII", rest)[5]
        while True:
            rec = fh.read(16)
            if len(rec) < 16:
                return
            _, _, incl, _ = struct.unpack(e + "IIII", rec)
            frame = fh.read(incl)
            p = _udp(frame, link)
            if p is not None:
                yield p


def _pcapng(fh, first: bytes) -> Iterator[bytes]:  # type: ignore[no-untyped-def]
    e = "<"
    links: list[int] = []
    block_type = first
    while True:
        if block_type is None:
            block_type = fh.read(4)
        if len(block_type) < 4:
            return
        raw_len = fh.read(4)
        if len(raw_len) < 4:
            return
        if block_type == b"\x0a\x0d\x0d\x0a":
            bom = fh.read(4)
            e = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">"
            length = struct.unpack(e + "I", raw_len)[0]
            fh.read(length - 12)
            block_type = None
            continue
        btype = struct.unpack(e + "I", block_type)[0]
        length = struct.unpack(e + "I", raw_len)[0]
        body = fh.read(length - 8)
        block_type = None
        if btype == 1:  # interface description
            links.append(struct.unpack(e + "H", body[:2])[0])
        elif btype == 6:  # enhanced packet
            iface, _, _, cap, _ = struct.unpack(e + "IIIII", body[:20])
            p = _udp(body[20:20 + cap], links[iface] if iface < len(links) else 1)
            if p is not None:
                yield p
        elif btype == 3:  # simple packet
            p = _udp(body[4:-4], links[0] if links else 1)
            if p is not None:
                yield p


def _udp(frame: bytes, link: int) -> bytes | None:
    if link == 1:  # Ethernet
        if len(frame) < 14:
            return None
        ethertype = struct.unpack(">H", frame[12:14])[0]
        off = 14
        if ethertype == 0x8100:  # VLAN tag
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
    udp_len = struct.unpack(">H", ip[ihl + 4:ihl + 6])[0]
    return ip[ihl + 8:ihl + udp_len]


def iter_messages(payload: bytes) -> Iterator[bytes]:
    if len(payload) < _TP.size:
        return
    _, _, proto, _, _, plen, count, _, _, _ = _TP.unpack_from(payload)
    if proto != DEEP_PROTOCOL:
        return
    off = _TP.size
    end = min(len(payload), off + plen)
    for _ in range(count):
        if off + 2 > end:
            return
        (n,) = struct.unpack_from("<H", payload, off)
        yield payload[off + 2:off + 2 + n]
        off += 2 + n


@dataclass
class _Book:
    bids: dict[int, int] = field(default_factory=dict)
    asks: dict[int, int] = field(default_factory=dict)
    snap: tuple[int, list[tuple[float, float]], list[tuple[float, float]]] | None = None  # last consistent
    halted: bool = False
    halt_ts: int = 0

    def capture(self, ts: int) -> None:
        bids = heapq.nlargest(MAX_LEVELS, self.bids.items())
        asks = heapq.nsmallest(MAX_LEVELS, self.asks.items())
        self.snap = (ts, [(p / 1e4, float(s)) for p, s in bids], [(p / 1e4, float(s)) for p, s in asks])


def read_iex_deep(path: Path, cadence_s: float = 1.0, symbols: set[str] | None = None):  # type: ignore[no-untyped-def]
    """Replay a DEEP capture into raw snapshots (a pyarrow table in the raw snapshot schema)."""
    step = int(cadence_s * 1e9)
    books: dict[str, _Book] = {}
    quotes: list[BookQuote] = []
    next_grid: int | None = None
    n_msgs = 0

    def emit(grid_ns: int) -> None:
        at = dt.datetime.fromtimestamp(grid_ns / 1e9, dt.UTC)
        for sym, b in books.items():
            if b.snap is None:
                continue
            ts, bids, asks = b.snap
            ev = max(ts, b.halt_ts)
            quotes.append(BookQuote(sym, dt.datetime.fromtimestamp(ev // 1000 / 1e6, dt.UTC), at, SOURCE_NAME,
                                    bids, asks, halted=b.halted))

    for payload in iter_udp_payloads(path):
        for m in iter_messages(payload):
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
            if next_grid is None:
                next_grid = -(-ts // step) * step  # first grid time at or after the first message
            while ts > next_grid:
                emit(next_grid)
                next_grid += step
            b = books.setdefault(sym, _Book())
            if kind in (b"8", b"5"):
                side = b.bids if kind == b"8" else b.asks
                if size == 0:
                    side.pop(price, None)
                else:
                    side[price] = size
                if flags & 0x01:
                    b.capture(ts)
            elif kind == b"H":
                b.halted = bytes([status]) in HALTED_STATUS
                b.halt_ts = ts
            else:
                b.halted = bytes([status]) == b"O"
                b.halt_ts = ts
    if next_grid is not None:
        emit(next_grid)
    if n_msgs == 0:
        raise DeepFormatError(f"{path.name}: no IEX DEEP (protocol 0x8004) price-level or status messages")
    return table_from_quotes(quotes)
