"""The fallback chain's configuration: the sources file (TOML, see ``sources.example.toml``) read, checked and built
into a ``ChainSource``; a built-in default when no file is given.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from microstructure.sources.chain import ChainSource, Group, asset_of
from microstructure.sources.guard import Limits
from microstructure.sources.symbol_lists import check_symbols, read_symbols_file
from microstructure.sources.vendor import ConfigError, VendorSource

# A source's name travels into log lines, Prometheus labels, Prefect table artifacts and outcome details (where
# "name: result; ..." is parsed back by metrics.failed_calls and lake.coverage, whose pattern is this class): a
# name with spaces, ":", ";", "|", markup or control characters would forge or misattribute all of them.
SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")
# Used when no sources file is given: the roadmap's order (Polygon primary, Alpaca fallback for stocks;
# Alpaca's real L2 first for crypto, Polygon's deprecated book behind it).
DEFAULT_CONFIG = """
cycle_deadline_s = 2.5

[sources.polygon_stocks]
kind = "polygon"
asset = "stocks"

[sources.alpaca_stocks]
kind = "alpaca"
asset = "stocks"
feed = "iex"

[sources.alpaca_crypto]
kind = "alpaca"
asset = "crypto"

[sources.polygon_crypto]
kind = "polygon"
asset = "crypto"

[sources.databento_stocks]
kind = "databento"
asset = "stocks"

[groups.stocks]
chain = ["databento_stocks", "polygon_stocks", "alpaca_stocks"]

[groups.crypto]
chain = ["alpaca_crypto", "polygon_crypto"]
"""

SOURCE_KEYS = {"kind", "asset", "feed", "lot_size", "retries", "dataset", "exchange", *Limits.__dataclass_fields__}
# Databento live is billed by use: the built-in chain takes it only when asked (`poll --source databento`);
# a sources file that chains it asks for it.
OPT_IN_KINDS = {"databento"}
# Where a source's key is sent is the environment's choice only (see vendor.base_url_from_env): a sources file,
# above all one inside a data dir, may come from anyone.
BASE_URL_ENV = {"polygon": "MICROSTRUCTURE_POLYGON_BASE_URL", "alpaca": "MICROSTRUCTURE_ALPACA_DATA_URL",
                "ccxt": "MICROSTRUCTURE_CCXT_URL_<EXCHANGE>"}


def build_source(name: str, spec: dict[str, Any], symbols: Sequence[str] = ()) -> VendorSource:
    if "gateway" in spec:
        raise ConfigError(f"source {name!r}: gateway cannot be set in a sources file (it decides which server "
                          "feeds the books); set MICROSTRUCTURE_DATABENTO_LIVE_GATEWAY in the environment for a "
                          "local stand-in")
    moved = sorted({"urls", "hostname"} & set(spec))  # ccxt's own options for where its requests go
    if moved:
        raise ConfigError(f"source {name!r}: {moved[0]} cannot be set in a sources file (it decides where requests "
                          "go); set MICROSTRUCTURE_CCXT_URL_<EXCHANGE> in the environment for a local stand-in")
    if "base_url" in spec:
        var = BASE_URL_ENV.get(str(spec.get("kind")), "MICROSTRUCTURE_POLYGON_BASE_URL or "
                                                           "MICROSTRUCTURE_ALPACA_DATA_URL")
        raise ConfigError(f"source {name!r}: base_url cannot be set in a sources file (it decides where the API "
                          f"key is sent); set {var} in the environment for a local stand-in")
    unknown = set(spec) - SOURCE_KEYS
    if unknown:
        raise ConfigError(f"source {name!r}: unknown option(s) {sorted(unknown)}")
    limits = Limits(**{k: spec[k] for k in Limits.__dataclass_fields__ if k in spec})
    kind = spec.get("kind")
    common = {"name": name, "asset": spec.get("asset", "stocks"), "limits": limits,
              "lot_size": float(spec.get("lot_size", 1.0))}
    if kind == "polygon":
        from microstructure.sources.polygon import PolygonSource

        return PolygonSource(retries=int(spec.get("retries", 1)), **common)
    if kind == "alpaca":
        from microstructure.sources.alpaca import AlpacaSource

        return AlpacaSource(feed=spec.get("feed", "iex"), **common)
    if kind == "ccxt":
        from microstructure.sources.ccxt_source import CcxtSource, default_rate

        exchange = str(spec.get("exchange", ""))
        if "rate_per_s" not in spec:
            # Unset: the venue's own book-call rate from ccxt's metadata (docs/ccxt.md's table), not Limits' 5/s.
            common["limits"] = dataclasses.replace(limits, rate_per_s=default_rate(exchange))
        return CcxtSource(exchange=exchange, **common)
    if kind == "databento":
        from microstructure.sources.databento_live import DEFAULT_DATASET, DatabentoLiveSource

        # One live subscription for every symbol of the groups that chain it, made when it is built.
        return DatabentoLiveSource(dataset=spec.get("dataset", DEFAULT_DATASET), symbols=symbols, **common)
    if kind == "simulated":
        raise ConfigError(f"source {name!r}: the simulated source is never part of a vendor chain; "
                          "use `poll --source simulated`")
    raise ConfigError(f"source {name!r}: kind must be polygon, alpaca, databento or ccxt, not {kind!r}")


def load_config(path: Path | None) -> tuple[dict[str, Any], Path]:
    if path is None:
        return tomllib.loads(DEFAULT_CONFIG), Path.cwd()
    if not path.exists():
        raise ConfigError(f"sources file not found: {path}")
    try:
        return tomllib.loads(path.read_text()), path.parent
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def build_chain(config_path: Path | None = None, symbols: Sequence[str] | None = None,
                only: str | None = None) -> ChainSource:
    """The chain from ``config_path`` (or the built-in default). ``symbols`` adds symbols to the groups of
    their asset class. ``only`` ("polygon", "alpaca", "databento" or "ccxt") keeps just that vendor's sources in every
    chain. The built-in default leaves out the ``OPT_IN_KINDS`` unless ``only`` names them."""
    cfg, base = load_config(config_path)
    specs: dict[str, dict[str, Any]] = cfg.get("sources", {})
    gcfg: dict[str, dict[str, Any]] = cfg.get("groups", {})
    if not gcfg:
        raise ConfigError("the sources file has no [groups.<name>] with a chain")
    groups: list[Group] = []
    for gname, g in gcfg.items():
        chain = list(g.get("chain", []))
        for n in chain:
            if not isinstance(n, str) or not SOURCE_NAME.fullmatch(n):
                raise ConfigError(f"group {gname!r}: source name {str(n)[:40]!r} must be 1-40 letters, digits, "
                                  "'_', '.' or '-'")
            if n not in specs:
                raise ConfigError(f"group {gname!r}: chain names unknown source {n!r}")
        if config_path is None and only not in OPT_IN_KINDS:
            chain = [n for n in chain if specs[n].get("kind") not in OPT_IN_KINDS]
        if only is not None:
            chain = [n for n in chain if specs[n].get("kind") == only]
        assets = {specs[n].get("asset", "stocks") for n in chain}
        if len(assets) > 1:
            raise ConfigError(f"group {gname!r}: mixes asset classes {sorted(assets)}")
        syms = list(g.get("symbols", []))
        if "symbols_file" in g:
            # Inside the sources file's own folder only: a data dir's sources.toml must not be able to read any
            # file of the user's (say ~/.aws/credentials) and send its words to a vendor as tickers.
            f = (base / str(g["symbols_file"])).resolve()
            if not f.is_relative_to(base.resolve()):
                raise ConfigError(f"group {gname!r}: symbols_file must be inside the sources file's folder "
                                  f"({base.resolve()}); pass other lists with --symbols-file")
            syms += read_symbols_file(f)
        syms = check_symbols(syms, f"group {gname!r}")
        groups.append(Group(gname, chain, assets.pop() if assets else g.get("asset", "stocks"), syms))
    for s in symbols or []:
        if not any(s in g.symbols for g in groups):
            home = next((g for g in groups if g.asset == asset_of(s) and g.chain), None)
            if home is not None:
                home.symbols.append(s)
    needed = {n for g in groups if g.symbols for n in g.chain}
    if only is not None and not needed:
        raise ConfigError(f"no {only} source covers the requested symbols")
    sources: dict[str, VendorSource] = {}
    try:
        for n in sorted(needed):
            sources[n] = build_source(n, specs[n], [s for g in groups if n in g.chain for s in g.symbols])
    except ConfigError:
        for built in sources.values():  # a streaming source already built ends its connection
            closer = getattr(built, "close", None)
            if closer is not None:
                closer()
        raise
    return ChainSource(sources, groups, float(cfg.get("cycle_deadline_s", 2.5)))
