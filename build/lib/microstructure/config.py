"""Every execution-quality threshold in one object, overridable from a TOML file and the environment.

Precedence: defaults < ``<data-dir>/microstructure.toml`` (or the file given) < ``MICROSTRUCTURE_<FIELD>``
environment variables (e.g. ``MICROSTRUCTURE_SAFE_MAX_SPREAD_BPS=40``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODES = ("SAFE", "AGGRESSIVE")


@dataclass(frozen=True)
class Thresholds:
    safe_max_spread_bps: float = 50.0
    safe_min_depth_usd: float = 100_000.0
    aggressive_max_spread_bps: float = 100.0
    aggressive_min_depth_usd: float = 50_000.0
    max_gap_pct: float = 0.05  # drop: mid range over the trailing 5 minutes above this
    risky_gap_pct: float = 0.02  # mark risky: a 2-5% range recently
    risky_imbalance: float = 0.5  # mark risky: order imbalance at least this strongly against the side
    freshness_s: float = 10.0  # online data older than this is stale
    cache_ttl_s: float = 5.0  # service cache, 1-10 s

    def max_spread(self, mode: str) -> float:
        return self.safe_max_spread_bps if mode == "SAFE" else self.aggressive_max_spread_bps

    def min_depth(self, mode: str) -> float:
        return self.safe_min_depth_usd if mode == "SAFE" else self.aggressive_min_depth_usd

    def __post_init__(self) -> None:
        if not 1.0 <= self.cache_ttl_s <= 10.0:
            raise ValueError(f"cache_ttl_s must be between 1 and 10 seconds, got {self.cache_ttl_s}")
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be >= 0")


def load_thresholds(path: Path | None = None, env: dict[str, str] | None = None, **overrides: Any) -> Thresholds:
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {}
    if path is not None and path.exists():
        data = tomllib.loads(path.read_text())
        values.update(data.get("thresholds", data))
    for f in dataclasses.fields(Thresholds):
        key = f"MICROSTRUCTURE_{f.name.upper()}"
        if key in env:
            try:
                values[f.name] = float(env[key])
            except ValueError as e:
                raise ValueError(f"{key}={env[key]!r} is not a number") from e
    values.update(overrides)
    unknown = set(values) - {f.name for f in dataclasses.fields(Thresholds)}
    if unknown:
        raise ValueError(f"unknown threshold(s): {sorted(unknown)}")
    return Thresholds(**{k: float(v) for k, v in values.items()})


def normalise_mode(mode: str) -> str:
    m = str(mode).strip().upper()
    if m not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use SAFE or AGGRESSIVE")
    return m
