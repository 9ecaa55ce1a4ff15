"""Our Feast repository: opening the store of a data dir, its configuration, registry and online push.

The stores' defaults are in ``feature_repo/feature_store.yaml``; the data dir's recorded choices
(:mod:`microstructure.lake.settings`) override them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pandas as pd
import pyarrow as pa

from microstructure.contract.schemas import package_dir
from microstructure.lake import settings
from microstructure.store.lookup import _read_plan

if TYPE_CHECKING:
    from feast import FeatureStore

FEATURE_REPO = package_dir("microstructure.feature_repo")
FEATURE_VIEW = "order_book"

_stores: dict[Path, FeatureStore] = {}


def _definitions(data_dir: Path) -> Any:
    """Import feature_repo/definitions.py afresh: its paths depend on the data dir, and its offline source on the
    data dir's offline store, which it reads from ``$MICROSTRUCTURE_OFFLINE_STORE`` (it sits below the store
    layer): set to the effective choice while it runs, then put back."""
    spec = importlib.util.spec_from_file_location("microstructure_feature_definitions", FEATURE_REPO / "definitions.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    kind = offline_store_kind(data_dir)
    before = os.environ.get(OFFLINE_STORE_ENV)
    os.environ[OFFLINE_STORE_ENV] = kind
    try:
        spec.loader.exec_module(mod)
    finally:
        if before is None:
            os.environ.pop(OFFLINE_STORE_ENV, None)
        else:
            os.environ[OFFLINE_STORE_ENV] = before
    return mod


def feast_objects(data_dir: Path) -> list[Any]:
    mod = _definitions(data_dir)
    return [mod.symbol, mod.order_book_source, mod.order_book_push, mod.order_book, mod.scoring, mod.order_book_all,
            mod.freshness, mod.order_book_live]


class _FeastPath(str):
    """A data dir's path in the generated feature_store.yaml (see :func:`_feast_yaml`)."""


def _feast_yaml(cfg: dict[str, Any]) -> str:
    """``cfg`` as YAML that Feast reads back exactly as given.

    Feast runs ``os.path.expandvars`` over the file's text before parsing it, so a ``$`` in a data dir's path
    (``/srv/$POLYGON_API_KEY/data``) would pull an environment value, a key, into a path and its error messages.
    Our paths are written as double-quoted scalars (a quote or ``#`` in them is then just text) with each ``$``
    as the escape ``\\x24``, which YAML decodes only after expandvars has looked. Other values are written as
    before (the Redis password placeholder must still expand)."""
    import re

    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    # NUL never occurs in a path: it stands in for "$" and is emitted as the escape \0, rewritten below.
    Dumper.add_representer(_FeastPath, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str",
                                                                       s.replace("$", "\0"), style='"'))
    text = yaml.dump(cfg, Dumper=Dumper, sort_keys=False, width=float("inf"))
    text = re.sub(r"\\(.)", lambda m: r"\x24" if m.group(1) == "0" else m.group(0), text)
    if yaml.safe_load(text) != cfg:  # the rewrite touched nothing else: every value reads back as written
        raise AssertionError("feature_store.yaml would not read back as written")
    return text


def store_yaml(data_dir: Path) -> Path:
    """``<data-dir>/feast/feature_store.yaml``: the repo's file with its online store's relative path made absolute
    for this data dir and the registry in :func:`registry_dir` (one definition; the Feast CLI can use it with
    ``-f``). Written on every open: a planted one never reaches Feast. The stores are the data dir's recorded
    choices (:mod:`microstructure.lake.settings`), so a shell without the variables writes the same text."""
    import yaml

    cfg = yaml.safe_load((FEATURE_REPO / "feature_store.yaml").read_text())
    rel = Path(cfg["online_store"]["path"])
    if not rel.is_absolute():  # ../data/feast/x.db -> <data-dir>/feast/x.db
        cfg["online_store"]["path"] = _FeastPath(data_dir / "feast" / rel.name)
    # Never the data dir's: Feast runs code held in a registry (on-demand views' source), see registry_dir.
    cfg["registry"]["path"] = _FeastPath(registry_dir(data_dir) / "registry.db")
    online = online_store_config(data_dir)
    if online is not None:
        cfg["online_store"] = online
    if offline_store_kind(data_dir) == "spark":
        from microstructure.features.spark import spark_conf

        cfg["offline_store"] = {"type": "spark", "spark_conf": spark_conf()}
    out = data_dir / "feast" / "feature_store.yaml"
    text = _feast_yaml(cfg)
    if not out.exists() or out.read_text() != text:
        from microstructure.contract.atomic import atomic_write_bytes

        atomic_write_bytes(text.encode(), out)
    return out


# Defined with the data dir's record of its choices (lake.settings); kept here for existing importers.
ONLINE_STORE_ENV = settings.ONLINE_STORE_ENV
OFFLINE_STORE_ENV = settings.OFFLINE_STORE_ENV
REDIS_PASSWORD_ENV = settings.REDIS_PASSWORD_ENV
REDIS_KEY_TTL_S = settings.REDIS_KEY_TTL_S


def offline_store_kind(data_dir: Path | None) -> str:
    """``duckdb`` or ``spark``: ``$MICROSTRUCTURE_OFFLINE_STORE`` for this command, else the data dir's record."""
    return settings.effective(data_dir).offline_store


def online_store_config(data_dir: Path | None = None) -> dict[str, Any] | None:
    """Feast's online store for ``data_dir``: its recorded choice (:mod:`microstructure.lake.settings`), or
    ``$MICROSTRUCTURE_ONLINE_STORE`` when it has no record (``redis://[:password@]host:port/db``, ``rediss://``
    for TLS, ``?key_ttl_seconds=N``); None keeps the embedded SQLite store. A variable that disagrees with the
    record is an InputError.

    A password never reaches a file: the generated yaml says ``${MICROSTRUCTURE_REDIS_PASSWORD}`` (Feast expands
    it when it reads the file) and this process sets that variable from the URL in the environment."""
    from microstructure.contract.inputs import InputError

    choice = settings.effective(data_dir)
    url = choice.online_store
    try:
        password = settings.split_online_url(os.environ.get(ONLINE_STORE_ENV, ""))[1]
    except ValueError as e:
        raise InputError(f"{ONLINE_STORE_ENV}: {e}") from None
    if password:
        os.environ[REDIS_PASSWORD_ENV] = password
    if url == settings.SQLITE:
        return None
    u = urlsplit(url)  # canonical (split_online_url): scheme, host, port, db and a non-default ttl
    assert u.hostname is not None and u.port is not None
    parts = [f"{u.hostname}:{u.port}", f"db={int(u.path.strip('/'))}"]
    if u.scheme == "rediss":
        parts.append("ssl=true")
    if choice.password:
        parts.append("password=${" + REDIS_PASSWORD_ENV + "}")
    ttl = int(parse_qs(u.query).get("key_ttl_seconds", [REDIS_KEY_TTL_S])[0])
    return {"type": "redis", "connection_string": ",".join(parts), "key_ttl_seconds": ttl}


def _definitions_hash(data_dir: Path) -> str:
    """What the registry was applied from: the definitions, the feature SQL they are derived from (its declared
    columns are the view's fields) and the effective store configuration."""
    import hashlib

    from microstructure.contract.schemas import sql

    h = hashlib.sha256()
    h.update((FEATURE_REPO / "definitions.py").read_bytes())
    h.update(sql("features").encode())
    h.update(store_yaml(data_dir).read_bytes())
    return h.hexdigest()


CACHE_ENV = "MICROSTRUCTURE_CACHE_DIR"


def cache_dir() -> Path:
    """This user's cache folder for derived state: ``$MICROSTRUCTURE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/microstructure``, else ``~/.cache/microstructure``."""
    own = os.environ.get(CACHE_ENV, "").strip()
    if own:
        return Path(own).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"  # the spec: relative is unset
    return (base / "microstructure").resolve()


def _private_dir(path: Path, chmod: bool) -> None:
    """``path`` exists, is this user's and nobody else may write in it (``chmod``: made 0700), or InputError."""
    from microstructure.contract.inputs import InputError

    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise InputError(f"cache folder {path} belongs to another user; set {CACHE_ENV} to a folder of yours")
    if chmod and st.st_mode & 0o077:
        path.chmod(0o700)
    elif st.st_mode & 0o022:
        raise InputError(f"cache folder {path} is writable by others; set {CACHE_ENV} to a private folder")


def registry_dir(data_dir: Path) -> Path:
    """Where the Feast registry of ``data_dir`` (and the stamp of what it was applied from) lives: this user's
    ``<cache>/registries/<sha256 of the data dir's resolved path>/``, private (0700), never inside the data dir.

    Feast executes what a registry holds (an on-demand view's UDF source, a dill fallback), and a data dir is
    untrusted data that anyone may hand over; a stamp beside a registry there could be forged as easily. The
    registry is derived state (our definitions applied for this path), so it is kept, and rebuilt, here; a
    ``registry.db`` in the data dir is ignored."""
    import hashlib

    root = cache_dir()
    _private_dir(root, chmod=False)
    _private_dir(root / "registries", chmod=True)
    out = root / "registries" / hashlib.sha256(os.fsencode(data_dir.resolve())).hexdigest()
    _private_dir(out, chmod=True)
    return out


def open_store(data_dir: Path, apply: bool = True) -> FeatureStore:
    """The Feast store for ``data_dir``. The repo is applied when the registry (in :func:`registry_dir`) is new
    or the definitions changed since it was applied (a hash kept beside the registry), so edits never go
    unseen."""
    data_dir = data_dir.resolve()
    if data_dir in _stores:
        return _stores[data_dir]
    os.environ["MICROSTRUCTURE_DATA_DIR"] = str(data_dir)
    (data_dir / "feast").mkdir(parents=True, exist_ok=True)
    from feast import FeatureStore

    from microstructure.contract.atomic import atomic_write_bytes

    store = FeatureStore(repo_path=str(FEATURE_REPO), fs_yaml_file=store_yaml(data_dir))
    reg = registry_dir(data_dir)
    stamp = reg / "applied.sha256"
    digest = _definitions_hash(data_dir)
    # A data dir cleared (--fresh, rm -r) keeps its registry here, but its SQLite online store needs the
    # tables an apply creates.
    online = getattr(store.config.online_store, "path", None)
    if apply and (not (reg / "registry.db").exists() or not stamp.exists() or stamp.read_text() != digest
                  or (online is not None and not Path(online).exists())):
        import warnings

        with warnings.catch_warnings():  # Feast warns that on-demand views are "experimental" on every apply
            warnings.simplefilter("ignore")
            store.apply(feast_objects(data_dir))
        atomic_write_bytes(digest.encode(), stamp)
    _stores[data_dir] = store
    return store


def clear_online(data_dir: Path | None = None, project: str = "microstructure") -> int:
    """Remove the project's rows from a configured Redis online store (a fresh market must not sit behind the
    newer rows of the old one: Feast's Redis writes skip rows older than the stored ones). Returns keys removed;
    the SQLite store is a file of the data dir and goes with it."""
    cfg = online_store_config(data_dir)
    if cfg is None:
        return 0
    from feast.infra.online_stores.redis import RedisOnlineStore

    nodes, kwargs = RedisOnlineStore._parse_connection_string(os.path.expandvars(cfg["connection_string"]))
    import redis

    client = redis.Redis(host=nodes[0]["host"], port=int(nodes[0]["port"]), **kwargs)
    n = 0
    keys = list(client.scan_iter(match=b"*" + project.encode(), count=1000))  # Feast's key: entity key + project
    for i in range(0, len(keys), 1000):
        n += client.delete(*keys[i: i + 1000])
    client.close()
    return n


def forget_store(data_dir: Path) -> None:
    """Drop the cached store of ``data_dir`` (its files were removed; the next open applies afresh)."""
    _stores.pop(data_dir.resolve(), None)


def _to_push_frame(features: pa.Table) -> pd.DataFrame:
    df = features.to_pandas()
    # Feast's online write wants plain numpy-backed columns; keep nullable booleans as objects.
    for c in (f.name for f in features.schema if pa.types.is_boolean(f.type)):
        df[c] = df[c].astype(object)
    return df


def push_online(store: FeatureStore, features: pa.Table, fast: bool = True) -> int:
    """Write one cycle's feature rows (one per symbol) to the online store; a row older than the stored one
    never replaces it. ``fast``: Feast's bytes encoded a column at a time (``microstructure.store.online_write``;
    the same stored rows, ~20x less time at 10,000 symbols); else through Feast's own write."""
    if features.num_rows == 0:
        return 0
    from microstructure.store import online_write

    if fast and online_write.supported(store):
        plan = _read_plan(store, "order_book_all")
        if plan is not None:
            online_write.write(store, plan[0], features)
            return features.num_rows
    # Feast's online write for the push source's view (what ``push(..., to=ONLINE)`` ends in, without its
    # per-call registry scan for precomputed services, which we do not use).
    store.write_to_online_store(FEATURE_VIEW, _to_push_frame(features))
    return features.num_rows
