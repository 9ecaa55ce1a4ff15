"""DBN files written with Databento's own encoder (``databento_dbn``): metadata, MBP-10 / MBP-1 records, zstd."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import databento_dbn as dbn
import zstandard

NS = 1_000_000_000
T0 = 1_764_000_000 * NS  # 2025-11-24 16:00:00 UTC
DAY = dt.date(2025, 11, 24)
UNDEF = dbn.UNDEF_PRICE


def exact(px: int) -> float:
    """The float nearest a DBN fixed-point price's decimal value: what the lake must hold."""
    return float(Decimal(px) / Decimal(10**9))


def level(bid_px: int = UNDEF, bid_sz: int = 0, ask_px: int = UNDEF, ask_sz: int = 0) -> dbn.BidAskPair:
    return dbn.BidAskPair(bid_px=bid_px, ask_px=ask_px, bid_sz=bid_sz, ask_sz=ask_sz)


def mbp(iid: int, ts_recv: int, levels: list[dbn.BidAskPair], *, ts_event: int | None = None, depth10: bool = True,
        flags: int = dbn.F_LAST) -> bytes:
    kw = dict(publisher_id=1, instrument_id=iid, ts_event=ts_recv - 1000 if ts_event is None else ts_event,
              price=levels[0].bid_px, size=1, action=dbn.Action.ADD, side=dbn.Side.BID, depth=0, ts_recv=ts_recv,
              flags=flags)
    if depth10:
        pad = levels + [level() for _ in range(10 - len(levels))]
        return bytes(dbn.MBP10Msg(**kw, levels=pad))
    return bytes(dbn.MBP1Msg(**kw, levels=levels[0]))


def mapping_msg(iid: int, symbol: str, ts: int, raw: str | None = None) -> bytes:
    """Without ``raw``: a raw-symbol subscription (out: the instrument id). With it: a parent or continuous
    subscription, ``symbol`` (ES.FUT) in, ``raw`` (ESZ5) out, as Databento's live gateway sends them."""
    stype_in = dbn.SType.RAW_SYMBOL if raw is None else dbn.SType.PARENT
    stype_out = dbn.SType.INSTRUMENT_ID if raw is None else dbn.SType.RAW_SYMBOL
    return bytes(dbn.SymbolMappingMsg(publisher_id=1, instrument_id=iid, ts_event=ts, stype_in=stype_in,
                                      stype_in_symbol=symbol, stype_out=stype_out,
                                      stype_out_symbol=str(iid) if raw is None else raw, start_ts=ts,
                                      end_ts=ts + 86_400 * NS))


def metadata(mappings: dict[str, int], schema: str | None = "mbp-10", day: dt.date = DAY) -> bytes:
    """``schema`` None: a file of several schemas (a live capture subscribed to more than one)."""
    maps = [SimpleNamespace(raw_symbol=raw, intervals=[SimpleNamespace(start_date=day, end_date=day + dt.timedelta(1),
                                                                       symbol=str(iid))])
            for raw, iid in mappings.items()]
    md = dbn.Metadata(dataset="XNAS.ITCH", start=T0, end=T0 + 3600 * NS, stype_in=dbn.SType.RAW_SYMBOL,
                      stype_out=dbn.SType.INSTRUMENT_ID, schema=None if schema is None else dbn.Schema(schema),
                      symbols=list(mappings),
                      mappings=maps)
    return md.encode()


def write_dbn(path: Path, mappings: dict[str, int], records: list[bytes], schema: str | None = "mbp-10",
              zstd: bool = True) -> Path:
    data = metadata(mappings, schema) + b"".join(records)
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if zstd else data)
    return path
