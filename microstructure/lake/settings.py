"""What a data dir records about itself: its store choices, in ``<data-dir>/settings.json``.

The online store holds the served rows, so which one a data dir uses belongs to the data dir, not to the shell
that happens to run a command: a data dir made with ``MICROSTRUCTURE_ONLINE_STORE=redis://…`` must not answer
from an empty SQLite file in a shell without the variable. The choices are recorded when a writer command first
holds the data dir (:func:`record_if_missing`), and read by every command (:func:`effective`):

* no variable: the recorded choice;
* the variable set and equal to the record (a password aside): fine;
* the variable set and different: refused (:class:`~microstructure.contract.inputs.InputError`, one line);
  changing the record takes ``--online-store`` on ``run``/``poll`` (:func:`change_online`).

The offline store is an engine over the same Parquet lake (no data lives in it), so its variable picks the
engine for one command without touching the record; without the variable the recorded engine is used.

A password never reaches the file: the record keeps the URL without it, and the password comes from
``MICROSTRUCTURE_REDIS_PASSWORD`` or the URL in the environment. The file is data (JSON only, bounded, its
fields validated strictly by ``pydantic-settings``), never executed.
"""

from __future__ import annotations

import contextvars
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple
from urllib.parse import parse_qs, urlsplit

from pydantic import ValidationError, field_validator
from pydantic_settings import BaseSettings, JsonConfigSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from microstructure.contract.inputs import InputError

SETTINGS_FILE = "settings.json"
MAX_BYTES = 4096  # a record is ~100 bytes; anything much larger is not ours
ONLINE_STORE_ENV = "MICROSTRUCTURE_ONLINE_STORE"
OFFLINE_STORE_ENV = "MICROSTRUCTURE_OFFLINE_STORE"
REDIS_PASSWORD_ENV = "MICROSTRUCTURE_REDIS_PASSWORD"
REDIS_KEY_TTL_S = 24 * 3600  # a symbol no longer polled leaves Redis a day after its last push
SQLITE = "sqlite"
DUCKDB = "duckdb"


def split_online_url(url: str) -> tuple[str, str | None]:
    """``url`` (``sqlite``/``default``, or ``redis[s]://[:password@]host:port/db[?key_ttl_seconds=N]``) as its
    canonical form without a password (what a record holds and what is compared), and the password.
    ValueError, never naming the URL (it may hold a password), when it is neither."""
    url = url.strip()
    if url.lower() in ("", SQLITE, "default"):
        return SQLITE, None
    u = urlsplit(url)
    if u.scheme not in ("redis", "rediss") or not u.hostname:
        raise ValueError(f"online store must be sqlite or look like redis://host:6379/0 (got scheme {u.scheme!r})")
    try:
        db = int(u.path.strip("/") or 0)
        query = parse_qs(u.query, strict_parsing=bool(u.query))
        ttl = int(query.pop("key_ttl_seconds", [REDIS_KEY_TTL_S])[0])
        port = u.port or 6379
    except ValueError:
        raise ValueError("online store URL: db, port and key_ttl_seconds must be whole numbers") from None
    if query:
        raise ValueError(f"online store URL: unknown option {sorted(query)[0]!r} (only key_ttl_seconds)")
    if db < 0 or ttl <= 0:
        raise ValueError("online store URL: db must be >= 0 and key_ttl_seconds > 0")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    out = f"{u.scheme}://{host}:{port}/{db}"
    if ttl != REDIS_KEY_TTL_S:
        out += f"?key_ttl_seconds={ttl}"
    return out, u.password or None


class _Choices(BaseSettings):
    online_store: str | None = None
    offline_store: Literal["duckdb", "spark"] | None = None
    _password_allowed: ClassVar[bool] = True  # the variable's URL may carry one; a file never

    @field_validator("online_store", mode="before")
    @classmethod
    def _online(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        url, password = split_online_url(v)
        if password and not cls._password_allowed:
            raise ValueError(f"a password never belongs in this file: use {REDIS_PASSWORD_ENV}")
        return url

    @field_validator("offline_store", mode="before")
    @classmethod
    def _offline(cls, v: Any) -> Any:
        return (v.strip().lower() or None) if isinstance(v, str) else v


class EnvChoices(_Choices):
    """The choices this shell makes: ``MICROSTRUCTURE_ONLINE_STORE`` and ``MICROSTRUCTURE_OFFLINE_STORE``."""

    model_config = SettingsConfigDict(env_prefix="MICROSTRUCTURE_", env_ignore_empty=True, extra="ignore",
                                      frozen=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)  # never a .env file or secrets folder of the working directory


_record_path: contextvars.ContextVar[Path] = contextvars.ContextVar("_record_path")


class RecordedChoices(_Choices):
    """The data dir's record (``settings.json``): both choices, nothing else."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True, strict=True)
    _password_allowed: ClassVar[bool] = False
    format: Literal[1] = 1
    online_store: str
    offline_store: Literal["duckdb", "spark"]
    # The Redis store wants a password (from the environment; the file never holds one).
    online_store_password: bool = False

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, JsonConfigSettingsSource(settings_cls, json_file=_record_path.get()))


def _one_line(where: str, e: ValidationError) -> InputError:
    """The first problem, by field and message only: pydantic's own text repeats the input (a password)."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "value"
    return InputError(f"{where}: {loc}: {err['msg'].removeprefix('Value error, ')}")


def from_env() -> EnvChoices:
    try:
        return EnvChoices()
    except ValidationError as e:
        raise _one_line("environment (MICROSTRUCTURE_ONLINE_STORE / MICROSTRUCTURE_OFFLINE_STORE)", e) from None


def recorded(data_dir: Path) -> RecordedChoices | None:
    """The data dir's record, None when it has none (made before records, or never written by a command)."""
    path = Path(data_dir) / SETTINGS_FILE
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise InputError(f"{path} is not a regular file: remove it, then run a writer command to record again")
    if path.stat().st_size > MAX_BYTES:
        raise InputError(f"{path} is larger than {MAX_BYTES} bytes: not a settings record of ours")
    token = _record_path.set(path)
    try:
        choices = RecordedChoices()  # type: ignore[call-arg]  # the fields come from the JSON source
    except ValidationError as e:
        raise _one_line(str(path), e) from None
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError):  # not JSON, or JSON but not an object
        raise InputError(f"{path} is not a JSON settings record (remove it to record the current choices)") from None
    finally:
        _record_path.reset(token)
    return choices


class Choices(NamedTuple):
    online_store: str  # sqlite, or a canonical Redis URL without password
    offline_store: str  # duckdb or spark
    password: bool  # the Redis store wants $MICROSTRUCTURE_REDIS_PASSWORD


def _env_password() -> str | None:
    """The Redis password this shell gives: in the URL of the variable, else ``$MICROSTRUCTURE_REDIS_PASSWORD``."""
    try:
        pw = split_online_url(os.environ.get(ONLINE_STORE_ENV, ""))[1]
    except ValueError:
        pw = None  # from_env reports the bad URL
    return pw or os.environ.get(REDIS_PASSWORD_ENV) or None


def _write(data_dir: Path, online: str, offline: str, password: bool) -> None:
    from microstructure.contract.atomic import atomic_write_bytes

    body = {"format": 1, "online_store": online, "offline_store": offline,
            "online_store_password": password and online != SQLITE}
    atomic_write_bytes((json.dumps(body, indent=2) + "\n").encode(), Path(data_dir) / SETTINGS_FILE)


def record_if_missing(data_dir: Path) -> None:
    """Record this shell's choices (defaults: SQLite, DuckDB) in a data dir that has no record. Writer commands
    call it holding the data dir's lock; a record already there is never changed here."""
    if recorded(data_dir) is not None:
        return
    env = from_env()
    _write(data_dir, env.online_store or SQLITE, env.offline_store or DUCKDB, _env_password() is not None)


def effective(data_dir: Path | None) -> Choices:
    """The store choices for a command on ``data_dir``; the rules are in the module's docstring. Never
    writes."""
    env = from_env()
    rec = recorded(data_dir) if data_dir is not None else None
    if rec is None:
        online = env.online_store or SQLITE
        return Choices(online, env.offline_store or DUCKDB, online != SQLITE and _env_password() is not None)
    if env.online_store is not None and env.online_store != rec.online_store:
        raise InputError(f"{data_dir} records online store {rec.online_store}, but {ONLINE_STORE_ENV} says "
                         f"{env.online_store}: unset the variable, or change the record with "
                         f"`run`/`poll --online-store {env.online_store}`")
    if rec.online_store_password and _env_password() is None:
        raise InputError(f"{data_dir}'s online store {rec.online_store} wants a password: set "
                         f"{REDIS_PASSWORD_ENV} (it is never kept in a file)")
    return Choices(rec.online_store, env.offline_store or rec.offline_store, rec.online_store_password)


def change_online(data_dir: Path, url: str) -> tuple[str, str]:
    """Set the data dir's recorded online store to ``url`` (``sqlite`` or a Redis URL; a password in it is kept
    for this process only). Returns (old, new). Call it holding the writer lock."""
    try:
        new, password = split_online_url(url)
    except ValueError as e:
        raise InputError(f"--online-store: {e}") from None
    env = from_env()
    if env.online_store is not None and env.online_store != new:
        raise InputError(f"--online-store {new} disagrees with {ONLINE_STORE_ENV}={env.online_store}: "
                         "unset the variable or make them agree")
    rec = recorded(data_dir)
    old = rec.online_store if rec is not None else (env.online_store or SQLITE)
    offline = rec.offline_store if rec is not None else (env.offline_store or DUCKDB)
    if password:
        os.environ[REDIS_PASSWORD_ENV] = password  # this process's Feast expands it; never written
    wants = _env_password() is not None
    if rec is None or old != new or rec.online_store_password != (wants and new != SQLITE):
        _write(data_dir, new, offline, wants)
    return old, new
