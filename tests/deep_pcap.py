"""Build small IEX DEEP captures from the published layout (IEX-TP 1.25, DEEP 1.08), for replay tests."""

from __future__ import annotations

import struct
from pathlib import Path

NS = 1_000_000_000


def plu(side: str, ts: int, symbol: str, price: float, size: int, complete: bool = True) -> bytes:
    """Price level update: '8' buy, '5' sell. Price in 1/10 000 dollars; flag bit 0 = event complete."""
    return (side.encode() + struct.pack("<Bq8sIq", 1 if complete else 0, ts, symbol.encode().ljust(8),
                                        size, round(price * 10_000)))


def status(ts: int, symbol: str, st: str, reason: str = "T1  ") -> bytes:
    return b"H" + struct.pack("<Bq8s4s", ord(st), ts, symbol.encode().ljust(8), reason.encode())


def iextp(messages: list[bytes], seq: int, send_ts: int, protocol: int = 0x8004) -> bytes:
    body = b"".join(struct.pack("<H", len(m)) + m for m in messages)
    head = struct.pack("<BBHIIHHqqq", 1, 0, protocol, 1, 42, len(body), len(messages), 0, seq, send_ts)
    return head + body


def udp_frame(payload: bytes) -> bytes:
    udp = struct.pack(">HHHH", 10378, 10378, 8 + len(payload), 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes([10, 0, 0, 1]),
                     bytes([233, 215, 21, 4]))
    return b"\x01\x00\x5e\x57\x15\x04" + b"\x00\x11\x22\x33\x44\x55" + b"\x08\x00" + ip + udp


def write_pcap(path: Path, packets: list[tuple[int, bytes]]) -> Path:
    """Classic little-endian nanosecond pcap, Ethernet link type."""
    out = [struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1)]
    for ts, payload in packets:
        frame = udp_frame(payload)
        out.append(struct.pack("<IIII", ts // NS, ts % NS, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(out))
    return path
