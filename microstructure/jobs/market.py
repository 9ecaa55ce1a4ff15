"""The simulated market of a data dir: which source a data dir holds, and its state kept between runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from microstructure.lake import paths as lake

if TYPE_CHECKING:
    from microstructure.sources.base import Source
    from microstructure.sources.simulated import SimulatedSource

SIM_STATE = Path("sim") / "state.npz"


# ---- the simulated source's persisted state ---------------------------------------------------
class MarketConflict(Exception):
    """The data dir holds another simulated market than the one asked for: never mix two in one lake."""


def simulated_source(paths: lake.LakePaths, seed: int | None, fresh: bool) -> SimulatedSource:
    """The data dir's simulated market, continued where it stopped (its state is saved every cycle).

    ``fresh`` starts over: the lake, the market state and the online store of the data dir are removed
    first, so two markets never share a lake. A ``seed`` other than the saved market's, or a lake of
    simulated books with no saved market, is a :class:`MarketConflict` (one line, with the way out).
    """
    from microstructure.sources.simulated import SOURCE_NAME, SimulatedSource

    data_dir = paths.data_dir
    state = data_dir / SIM_STATE
    if fresh:
        from microstructure.lake.datadir import require_ours
        from microstructure.store.repo import clear_online, forget_store

        require_ours(data_dir)  # never clear a folder this project did not create (nothing is deleted)
        clear_online(data_dir)
        for d in (paths.root, state.parent, data_dir / "feast"):
            shutil.rmtree(d, ignore_errors=True)
        forget_store(data_dir)
        return SimulatedSource(seed=7 if seed is None else seed)
    if state.exists():
        src = SimulatedSource.load(state)
        if seed is not None and seed != src.seed:
            raise MarketConflict(f"{data_dir} holds the simulated market of seed {src.seed}, not {seed}: pass "
                                 "--fresh to start over (removes its lake) or use another --data-dir")
        return src
    if paths.has(lake.SNAPSHOTS) and _has_source(paths, SOURCE_NAME):
        raise MarketConflict(f"{data_dir} holds simulated books but no saved market to continue: pass --fresh "
                             "to start over (removes its lake) or use another --data-dir")
    return SimulatedSource(seed=7 if seed is None else seed)


def _has_source(paths: lake.LakePaths, source: str) -> bool:
    def look() -> bool:
        files = paths.files(lake.SNAPSHOTS)  # listed again if a retry follows a compaction
        return bool(files) and bool(duckdb.connect().execute(
            "SELECT 1 FROM read_parquet(?) WHERE source = ? LIMIT 1", [files, source]).fetchall())

    return lake.with_retry(look)


def save_simulated(data_dir: Path, source: Source) -> None:
    from microstructure.sources.simulated import SimulatedSource

    if isinstance(source, SimulatedSource):
        source.save(data_dir / SIM_STATE)
