"""The embedded default: a deterministic simulated 10-level order book for 150 symbols.

The model is a small queue-race ("queue-reactive") book, chosen so that order imbalance carries real,
known information about the next mid move and the evaluation downstream has something true to find:

* Each symbol has a tier (mega-cap to illiquid micro-cap) that sets its price, tick ($0.01, the Reg NMS
  tick above $1), spread in ticks, queue sizes, rate of price changes, and rates of halts and jumps.
* Levels sit one tick apart on each side. Between price changes every queue size follows a
  mean-reverting multiplicative random walk, so the top-of-book imbalance ``I = (b - a) / (b + a)``
  persists for a while and then fades.
* Price changes arrive as a Poisson process. Each one moves the book up with probability
  ``0.5 + 0.4 * I`` (the thinner queue is the one more likely to be eaten first), so
  ``E[next move] = 0.4 * I`` ticks: the true signal strength is known.
* An up-move empties the best ask and opens a small new best-bid queue one tick higher (and the mirror
  for a down-move), which also reproduces the bid/ask bounce.
* Halts (5-10 minutes, reopening with a 2-10% jump), jumps of 3-12% without a halt, stale quotes (the
  vendor hands back its previous quote) and a small rate of malformed answers (crossed, negative size,
  NaN, locked) so the quarantine path is exercised on every long run.

Everything is a function of the seed and the sequence of poll times. On a replay (``live = False``) the
poll's ``at`` is the simulated clock: the book is sampled a random 5-250 ms vendor latency before it and
received at ``at``. Live (``live = True``) the model runs on the wall clock: ``event_ts`` is the instant
the book was sampled and ``received_ts`` the instant the answer was ready, both read from the clock.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from microstructure.contract.book import MAX_LEVELS, TS_TYPE, malformed_record, raw_table
from microstructure.sources.base import PollResult

SOURCE_NAME = "simulated"
TICK = 0.01
SIGNAL = 0.4  # P(up) = 0.5 + SIGNAL * top-of-book imbalance


@dataclass(frozen=True)
class Tier:
    name: str
    prefix: str
    count: int
    price: tuple[float, float]
    spread_ticks: tuple[int, int]
    level_shares: tuple[float, float]  # typical queue size per level, shares
    moves_per_s: float  # mid changes per second
    halts_per_hour: float
    jumps_per_hour: float
    stale_prob: float  # chance a poll returns the vendor's previous quote


TIERS: tuple[Tier, ...] = (
    Tier("mega", "MEGA", 15, (120, 600), (1, 2), (200, 800), 0.8, 0.0, 0.01, 0.0),
    Tier("large", "LRG", 30, (40, 200), (1, 3), (150, 600), 0.5, 0.01, 0.03, 0.01),
    Tier("mid", "MID", 45, (15, 60), (1, 5), (100, 400), 0.3, 0.03, 0.08, 0.03),
    Tier("small", "SML", 35, (4, 15), (2, 10), (100, 400), 0.15, 0.15, 0.25, 0.08),
    Tier("micro", "ILQ", 25, (2, 6), (2, 8), (100, 300), 0.08, 0.4, 0.5, 0.15),
)
FAULT_RATE = 0.001
MAX_STEP_S = 2.0
MAX_GAP_S = 3600.0


def universe() -> list[str]:
    """All simulated symbols, interleaved across tiers so any prefix of the list mixes tiers."""
    by_tier = [[f"{t.prefix}{i + 1:02d}" for i in range(t.count)] for t in TIERS]
    out: list[str] = []
    for k in range(max(len(x) for x in by_tier)):
        out.extend(x[k] for x in by_tier if k < len(x))
    return out


def tier_of(symbol: str) -> str | None:
    for t in TIERS:
        if symbol.startswith(t.prefix) and symbol[len(t.prefix):].isdigit():
            return t.name
    return None


_STATE_ARRAYS = ("bid_ticks", "spread", "bid_sz", "ask_sz", "base_sz", "halted_until", "last_px",
                 "last_sz", "last_event_us", "last_halted")


class SimulatedSource:
    """Deterministic simulated L2 source. ``poll`` advances the model to ``at`` and returns the books."""

    name = SOURCE_NAME

    def __init__(self, seed: int = 7, fault_rate: float = FAULT_RATE, levels: int = MAX_LEVELS) -> None:
        self.live = False  # True: stamp times from the wall clock (see the module docstring)
        self.seed = seed
        self.fault_rate = fault_rate
        self.levels = levels
        self.symbols = universe()
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.rng = np.random.default_rng(seed)
        n = len(self.symbols)
        tiers = {t.prefix: t for t in TIERS}
        self.tier = [tiers[s.rstrip("0123456789")] for s in self.symbols]
        p = lambda attr: np.array([getattr(t, attr) for t in self.tier], dtype=float)  # noqa: E731
        self.moves_per_s = p("moves_per_s")
        self.halt_rate = p("halts_per_hour") / 3600
        self.jump_rate = p("jumps_per_hour") / 3600
        self.stale_prob = p("stale_prob")
        self.spread_lo = np.array([t.spread_ticks[0] for t in self.tier])
        self.spread_hi = np.array([t.spread_ticks[1] for t in self.tier])
        r = self.rng
        lo = np.array([t.price[0] for t in self.tier])
        hi = np.array([t.price[1] for t in self.tier])
        price = np.exp(r.uniform(np.log(lo), np.log(hi)))
        self.bid_ticks = np.round(price / TICK).astype(np.int64)
        self.spread = r.integers(self.spread_lo, self.spread_hi + 1)
        shares_lo = np.array([t.level_shares[0] for t in self.tier])
        shares_hi = np.array([t.level_shares[1] for t in self.tier])
        typical = np.exp(r.uniform(np.log(shares_lo), np.log(shares_hi)))
        depth_shape = 1.0 + 0.15 * np.arange(MAX_LEVELS)  # deeper levels hold a little more
        self.base_sz = typical[:, None] * depth_shape[None, :]
        self.bid_sz = self._fresh(self.base_sz)
        self.ask_sz = self._fresh(self.base_sz)
        self.halted_until = np.zeros(n)  # epoch seconds
        self.now: float | None = None
        # The last quote handed out, replayed when a quote is stale.
        self.last_px = np.full((n, 2 * MAX_LEVELS), np.nan)
        self.last_sz = np.full((n, 2 * MAX_LEVELS), np.nan)
        self.last_event_us = np.zeros(n, dtype=np.int64)
        self.last_halted = np.zeros(n, dtype=bool)

    # ---- model -------------------------------------------------------------------------------
    def _fresh(self, base: np.ndarray) -> np.ndarray:
        return np.round(base * self.rng.lognormal(0.0, 0.5, base.shape)).clip(1)

    def _advance(self, dt_s: float) -> None:
        r = self.rng
        now = self.now or 0.0
        active = self.halted_until <= now
        # Queues: mean-reverting multiplicative noise around each level's typical size.
        for sz in (self.bid_sz, self.ask_sz):
            k = min(1.0, 0.1 * dt_s)
            drift = k * (np.log(self.base_sz) - np.log(sz))
            shock = r.normal(0.0, 0.35 * np.sqrt(dt_s), sz.shape)
            new = np.round(sz * np.exp(drift + shock)).clip(1)
            sz[active] = new[active]
        # Price changes: the race between the two best queues.
        moves = r.poisson(self.moves_per_s * dt_s) * active
        for j in range(int(moves.max(initial=0))):
            m = moves > j
            b, a = self.bid_sz[:, 0], self.ask_sz[:, 0]
            imb = (b - a) / (b + a)
            up = r.random(len(m)) < 0.5 + SIGNAL * imb
            self._move(m & up, +1)
            self._move(m & ~up, -1)
        # Spread breathes by a tick now and then, inside the tier's range.
        widen = (r.random(len(active)) < 0.05 * dt_s) & active
        self.spread = np.clip(self.spread + widen * r.choice([-1, 1], len(active)), self.spread_lo, self.spread_hi)
        # Jumps (gaps) without a halt.
        jump = (r.random(len(active)) < self.jump_rate * dt_s) & active
        self._jump(jump, 0.03, 0.12)
        # Halts: freeze the book, reopen later with a jump.
        reopen = (self.halted_until > 0) & (self.halted_until <= now + dt_s) & ~active
        self._jump(reopen, 0.02, 0.10)
        self.halted_until[reopen] = 0.0
        halt = (r.random(len(active)) < self.halt_rate * dt_s) & active
        self.halted_until[halt] = now + dt_s + r.uniform(300, 600, halt.sum())

    def _move(self, mask: np.ndarray, direction: int) -> None:
        if not mask.any():
            return
        grow, shrink = (self.bid_sz, self.ask_sz) if direction > 0 else (self.ask_sz, self.bid_sz)
        # The side the price moves toward loses its best queue; the other side opens a new small queue.
        shrink[mask, :-1] = shrink[mask, 1:]
        shrink[mask, -1] = self._fresh(self.base_sz[mask, -1])
        grow[mask, 1:] = grow[mask, :-1]
        grow[mask, 0] = np.round(self.base_sz[mask, 0] * self.rng.uniform(0.1, 0.6, mask.sum())).clip(1)
        self.bid_ticks[mask] += direction

    def _jump(self, mask: np.ndarray, lo: float, hi: float) -> None:
        k = int(mask.sum())
        if not k:
            return
        pct = self.rng.uniform(lo, hi, k) * self.rng.choice([-1, 1], k)
        self.bid_ticks[mask] = np.maximum(100, np.round(self.bid_ticks[mask] * (1 + pct))).astype(np.int64)
        self.bid_sz[mask] = self._fresh(self.base_sz[mask])
        self.ask_sz[mask] = self._fresh(self.base_sz[mask])

    # ---- polling -----------------------------------------------------------------------------
    def poll(self, symbols: Sequence[str], at: dt.datetime) -> PollResult:
        t = time.time() if self.live else at.timestamp()
        if self.now is None:
            self.now = t
        elif t > self.now:
            # Advance in steps of at most MAX_STEP_S so a long pause (a refresh minutes after the last poll)
            # follows the same dynamics as steady polling; beyond MAX_GAP_S the book just resumes.
            gap = min(t - self.now, MAX_GAP_S)
            self.now = t - gap
            while gap > 1e-9:
                dt_s = min(gap, MAX_STEP_S)
                self._advance(dt_s)
                self.now += dt_s
                gap -= dt_s
            self.now = t
        known = [s for s in symbols if s in self.index]
        idx = np.array([self.index[s] for s in known], dtype=np.int64)
        rejected = [malformed_record(s, self.name, at, "unknown_symbol", f"{s!r} is not in the simulated universe")
                    for s in symbols if s not in self.index]
        raw = self._quotes(idx, t)
        if self.live:  # the answer is in hand now: that, not the sampling instant, is when we had it
            now = pa.array(np.full(raw.num_rows, int(time.time() * 1e6)), pa.int64()).cast(TS_TYPE)
            raw = raw.set_column(raw.schema.get_field_index("received_ts"), "received_ts", now)
        res = PollResult(raw=raw)
        if rejected:
            res.rejected = pa.concat_tables(rejected)
        return res

    def _quotes(self, idx: np.ndarray, t: float) -> pa.Table:
        r = self.rng
        n = len(idx)
        lv = np.arange(MAX_LEVELS)
        bid_px = (self.bid_ticks[idx, None] - lv[None, :]) * TICK
        ask_px = (self.bid_ticks[idx, None] + self.spread[idx, None] + lv[None, :]) * TICK
        px = np.concatenate([bid_px, ask_px], axis=1).round(4)
        sz = np.concatenate([self.bid_sz[idx], self.ask_sz[idx]], axis=1)
        halted = self.halted_until[idx] > t
        latency_us = r.integers(5_000, 250_000, n)  # drawn live too, so both modes use the rng alike
        event_us = np.full(n, int(t * 1e6)) - (0 if self.live else latency_us)
        # A halted book does not update; a stale vendor hands back its previous quote.
        frozen = halted & self.last_halted[idx]
        stale = (r.random(n) < self.stale_prob[idx]) & (self.last_event_us[idx] > 0)
        reuse = frozen | stale
        px = np.where(reuse[:, None], self.last_px[idx], px)
        sz = np.where(reuse[:, None], self.last_sz[idx], sz)
        event_us = np.where(reuse, self.last_event_us[idx], event_us)
        self.last_px[idx], self.last_sz[idx] = px, sz
        self.last_event_us[idx] = event_us
        self.last_halted[idx] = halted
        px, sz = px.copy(), sz.copy()
        self._inject_faults(px, sz, reuse)
        cols: dict[str, object] = {
            "symbol": [self.symbols[i] for i in idx],
            "event_ts": pa.array(event_us, pa.int64()).cast(TS_TYPE),
            "received_ts": pa.array(np.full(n, int(t * 1e6)), pa.int64()).cast(TS_TYPE),
            "source": [self.name] * n,
            "halted": halted,
        }
        keep = lv < self.levels
        for s, side in enumerate(("bid", "ask")):
            for i in range(MAX_LEVELS):
                j = s * MAX_LEVELS + i
                cols[f"{side}_px_{i + 1}"] = pa.array(px[:, j], mask=np.full(n, not keep[i]))
                cols[f"{side}_sz_{i + 1}"] = pa.array(sz[:, j], mask=np.full(n, not keep[i]))
        return raw_table(cols)

    def _inject_faults(self, px: np.ndarray, sz: np.ndarray, reuse: np.ndarray) -> None:
        """Corrupt a few fresh answers the way real feeds do, so quarantine is always exercised."""
        r = self.rng
        hit = np.flatnonzero((r.random(len(px)) < self.fault_rate) & ~reuse)
        for row, kind in zip(hit, r.integers(0, 4, len(hit)), strict=True):
            if kind == 0:  # crossed: best bid above best ask
                px[row, 0] = px[row, MAX_LEVELS] + TICK
            elif kind == 1:
                sz[row, MAX_LEVELS] = -sz[row, MAX_LEVELS]
            elif kind == 2:
                px[row, 1] = np.nan
            else:  # locked: kept and flagged
                px[row, 0] = px[row, MAX_LEVELS]

    # ---- persistence: later polls continue the same book ---------------------------------------
    def save(self, path: Path) -> None:
        """Atomically (temporary file, fsync, rename): a kill at any instant leaves the old or the new state."""
        from microstructure.contract.atomic import atomic_write_bytes

        meta = {"seed": self.seed, "fault_rate": self.fault_rate, "levels": self.levels, "now": self.now,
                "rng": self.rng.bit_generator.state}
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **{k: getattr(self, k) for k in _STATE_ARRAYS})
        atomic_write_bytes(buf.getvalue(), path)

    @classmethod
    def load(cls, path: Path) -> SimulatedSource:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            src = cls(seed=meta["seed"], fault_rate=meta["fault_rate"], levels=meta["levels"])
            for k in _STATE_ARRAYS:
                setattr(src, k, z[k].copy())
        src.now = meta["now"]
        src.rng.bit_generator.state = meta["rng"]
        return src
