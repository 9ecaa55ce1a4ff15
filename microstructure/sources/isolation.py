"""Per-symbol fault isolation for a source's batched calls: which sub-batches hold a failing symbol.

A batched call that hangs or fails in a way one symbol can cause is split in halves, in the same cycle while the
deadline allows and otherwise in the next, until the culprits stand alone behind breakers of their own; the
healthy symbols keep riding one batch call (``sources.chain`` runs the calls).
"""

from __future__ import annotations

from collections.abc import Sequence

from microstructure.sources.guard import BREAKER_OPEN, CircuitBreaker, Limits, SourceError


class Isolation:
    """One source's memory of which sub-batches of its symbols hold a failing symbol.

    Hand-written because it is specific to batched market-data calls (no breaker library splits a batch):
    ``suspects`` are disjoint sub-batches that failed; a suspect of one symbol has its own circuit breaker.
    Each cycle the symbols outside every suspect ride one batch call and every suspect gets its own call.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.suspects: list[tuple[str, ...]] = []
        self.breakers: dict[str, CircuitBreaker] = {}
        self.last: dict[str, SourceError] = {}

    def plan(self, symbols: Sequence[str]) -> tuple[list[tuple[str, ...]], dict[str, SourceError]]:
        """This cycle's calls (healthy batch first) and the symbols not called (their breaker is open)."""
        want = set(symbols)
        held: set[str] = set()
        calls: list[tuple[str, ...]] = []
        skipped: dict[str, SourceError] = {}
        for g in self.suspects:
            held.update(g)
            part = tuple(s for s in g if s in want)
            if not part:
                continue
            br = self.breakers.get(part[0]) if len(part) == 1 else None
            if br is not None and not br.allow():
                last = self.last.get(part[0])
                skipped[part[0]] = SourceError(
                    last.error_class if last else BREAKER_OPEN,
                    f"not called: {part[0]} failed {br.consecutive} times in a row"
                    + (f" (last: {last.detail})" if last and last.detail else ""))
                continue
            calls.append(part)
        healthy = tuple(s for s in symbols if s not in held)
        return ([healthy] if healthy else []) + calls, skipped

    def _regroup(self, batch: tuple[str, ...], into: list[tuple[str, ...]]) -> None:
        gone = set(batch)
        self.suspects = [g for g in (tuple(s for s in g if s not in gone) for g in self.suspects) if g] + into

    def succeeded(self, batch: tuple[str, ...]) -> None:
        for s in batch:
            br = self.breakers.pop(s, None)
            if br is not None:
                br.record(True)
            self.last.pop(s, None)
        self._regroup(batch, [])

    def failed(self, batch: tuple[str, ...], err: SourceError) -> list[tuple[str, ...]]:
        """Record a failed call; return the halves to call next (none once the culprit stands alone)."""
        if len(batch) == 1:
            s = batch[0]
            br = self.breakers.setdefault(s, CircuitBreaker(self.limits.breaker_failures,
                                                            self.limits.breaker_cooldown_s))
            br.record(False)
            self.last[s] = err
            self._regroup(batch, [batch])
            return []
        halves = [batch[: len(batch) // 2], batch[len(batch) // 2:]]
        self._regroup(batch, halves)
        return halves
