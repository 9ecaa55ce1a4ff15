"""Fill simulator: a marketable order walks the visible book.

A buy lifts asks from the best level outward, a sell hits bids, until the order's notional (or shares) is
done or the visible book runs out. Slippage is against the mid at the snapshot, in bps, signed so that
positive = worse for the trader; it includes the half-spread. A fill is *bad* when slippage exceeds the
threshold (default 20 bps) or the visible book cannot fill the whole order. A book with one level (L1/NBBO
sources) can only fill what the top of book shows: bigger orders come out "unfillable" although the real
(hidden) book may have had the size, and the result says so in ``note``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from microstructure.contract.book import MAX_LEVELS

BAD_FILL_BPS = 20.0
L1_NOTE = "L1-only book: only the top level is visible, so fills beyond it are not simulated"


@dataclass(frozen=True)
class Fill:
    side: str
    requested: float  # notional in dollars, or shares
    filled_fraction: float
    avg_price: float | None
    mid: float
    slippage_bps: float | None
    levels_consumed: int
    unfillable: bool
    bad: bool
    note: str = ""


def levels(book: Mapping[str, Any], side: str) -> tuple[np.ndarray, np.ndarray]:
    """(prices, sizes) of the side a ``side`` order takes: asks for a buy, bids for a sell; NULL -> 0 size."""
    book_side = "ask" if side == "buy" else "bid"
    px = np.array([book.get(f"{book_side}_px_{i}") for i in range(1, MAX_LEVELS + 1)], dtype=float)
    sz = np.array([book.get(f"{book_side}_sz_{i}") for i in range(1, MAX_LEVELS + 1)], dtype=float)
    ok = np.isfinite(px) & np.isfinite(sz) & (sz > 0)
    return np.where(ok, px, np.nan), np.where(ok, sz, 0.0)


def simulate_fill(book: Mapping[str, Any], side: str, notional: float | None = None, shares: float | None = None,
                  bad_bps: float = BAD_FILL_BPS) -> Fill:
    if side not in ("buy", "sell"):
        raise ValueError(f"side must be buy or sell, not {side!r}")
    if (notional is None) == (shares is None):
        raise ValueError("give exactly one of notional or shares")
    amount = float(notional if notional is not None else shares)  # type: ignore[arg-type]
    if not np.isfinite(amount) or amount <= 0:
        raise ValueError(f"order size must be a positive number, got {amount!r}")
    mid = (float(book["bid_px_1"]) + float(book["ask_px_1"])) / 2
    px, sz = levels(book, side)
    r = walk(px[None, :], sz[None, :], np.array([mid]), amount, by_notional=notional is not None,
             sign=1.0 if side == "buy" else -1.0, bad_bps=bad_bps)
    one_level = int(np.sum(sz > 0)) <= 1
    note = L1_NOTE if one_level and r["unfillable"][0] else ""
    avg = r["avg_price"][0]
    return Fill(side, amount, float(r["filled_fraction"][0]), None if np.isnan(avg) else float(avg), mid,
                None if np.isnan(r["slippage_bps"][0]) else float(r["slippage_bps"][0]),
                int(r["levels_consumed"][0]), bool(r["unfillable"][0]), bool(r["bad"][0]), note)


def walk(px: np.ndarray, sz: np.ndarray, mid: np.ndarray, amount: float | np.ndarray, by_notional: bool,
         sign: float | np.ndarray, bad_bps: float = BAD_FILL_BPS) -> dict[str, np.ndarray]:
    """Vectorised walk over ``n`` books: ``px``/``sz`` are (n, levels) of the side taken, best first (NaN
    price / 0 size = no level). ``sign`` is +1 for buys, -1 for sells (per row or scalar)."""
    px0 = np.nan_to_num(px, nan=0.0)
    cap = px0 * sz if by_notional else sz  # what each level can absorb, in the order's unit
    before = np.cumsum(cap, axis=1) - cap
    amt = np.broadcast_to(np.asarray(amount, dtype=float), (px.shape[0],))[:, None]
    take = np.clip(amt - before, 0.0, cap)  # per level, in the order's unit
    shares = np.where(px0 > 0, take / np.where(px0 > 0, px0, 1.0), 0.0) if by_notional else take
    dollars = shares * px0
    got_sh, got_usd = shares.sum(axis=1), dollars.sum(axis=1)
    done = take.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        avg = np.where(got_sh > 0, got_usd / got_sh, np.nan)
        slip = np.asarray(sign) * (avg - mid) / mid * 1e4
    frac = np.minimum(done / amt[:, 0], 1.0)
    unfillable = frac < 1.0 - 1e-9
    bad = unfillable | ~(slip <= bad_bps)
    return {"avg_price": avg, "slippage_bps": slip, "filled_fraction": frac, "levels_consumed": (take > 0).sum(axis=1),
            "unfillable": unfillable, "bad": bad}
