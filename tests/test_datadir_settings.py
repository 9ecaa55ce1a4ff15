"""The data dir owns its store choices (issue 19, item 5): recorded in ``settings.json`` when a writer first holds
it, used by every later command whatever its shell says, changed only by ``run``/``poll --online-store``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from microstructure.contract.inputs import InputError
from microstructure.lake import datadir, settings

REDIS_DB = 6 + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0)  # this module's own database
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
STORE_VARS = ("MICROSTRUCTURE_ONLINE_STORE", "MICROSTRUCTURE_OFFLINE_STORE", "MICROSTRUCTURE_REDIS_PASSWORD")


@pytest.fixture
def no_store_vars(monkeypatch):
    for k in STORE_VARS:
        monkeypatch.delenv(k, raising=False)


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without any store variable (a fresh shell), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in STORE_VARS}
    return {**env, **extra}


def cli(*args: object, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                          env=_env(**env), timeout=600)


def _record(d: Path) -> dict[str, object]:
    return json.loads((d / settings.SETTINGS_FILE).read_text())


# --- in-process: the rules -------------------------------------------------------------------------------------

def test_a_writer_records_the_shells_choice_and_a_read_never_writes(tmp_path, no_store_vars, monkeypatch):
    d = tmp_path / "data"
    monkeypatch.setenv("MICROSTRUCTURE_ONLINE_STORE", "redis://127.0.0.1/3?key_ttl_seconds=60")
    assert settings.effective(d).online_store == "redis://127.0.0.1:6379/3?key_ttl_seconds=60"
    assert not d.exists()  # reading the choice made nothing
    with datadir.writer(d):
        pass
    assert _record(d) == {"format": 1, "online_store": "redis://127.0.0.1:6379/3?key_ttl_seconds=60",
                          "offline_store": "duckdb", "online_store_password": False}
    monkeypatch.delenv("MICROSTRUCTURE_ONLINE_STORE")
    assert settings.effective(d) == ("redis://127.0.0.1:6379/3?key_ttl_seconds=60", "duckdb", False)
    # The same store spelled differently agrees; another one is refused, naming the record and the way out.
    monkeypatch.setenv("MICROSTRUCTURE_ONLINE_STORE", "redis://127.0.0.1:6379/3?key_ttl_seconds=60")
    settings.effective(d)
    monkeypatch.setenv("MICROSTRUCTURE_ONLINE_STORE", "sqlite")
    with pytest.raises(InputError, match=r"records online store redis://127\.0\.0\.1:6379/3.*--online-store sqlite"):
        settings.effective(d)
    with datadir.writer(d):  # a later writer never rewrites a record
        pass
    assert _record(d)["online_store"] == "redis://127.0.0.1:6379/3?key_ttl_seconds=60"


def test_an_older_data_dir_gets_its_record_from_the_first_writer(tmp_path, no_store_vars):
    d = tmp_path / "data"
    (d / "lake" / "snapshots").mkdir(parents=True)  # ours, made before markers and records
    assert settings.effective(d) == ("sqlite", "duckdb", False) and not (d / settings.SETTINGS_FILE).exists()
    with datadir.writer(d):
        pass
    assert _record(d)["online_store"] == "sqlite"


def test_change_online_keeps_the_password_out_of_the_file(tmp_path, no_store_vars, monkeypatch):
    d = tmp_path / "data"
    with datadir.writer(d):
        assert settings.change_online(d, "rediss://:hunter2-pw@cache.example:6380/2") == (
            "sqlite", "rediss://cache.example:6380/2")
    assert "hunter2-pw" not in (d / settings.SETTINGS_FILE).read_text()
    assert _record(d)["online_store_password"] is True
    assert os.environ[settings.REDIS_PASSWORD_ENV] == "hunter2-pw"  # this process only
    monkeypatch.delenv(settings.REDIS_PASSWORD_ENV)
    with pytest.raises(InputError, match="wants a password: set MICROSTRUCTURE_REDIS_PASSWORD"):
        settings.effective(d)
    monkeypatch.setenv(settings.REDIS_PASSWORD_ENV, "hunter2-pw")
    assert settings.effective(d) == ("rediss://cache.example:6380/2", "duckdb", True)
    # The variable and the option must agree: nothing is written when they do not.
    monkeypatch.setenv("MICROSTRUCTURE_ONLINE_STORE", "redis://127.0.0.1:6379/0")
    with pytest.raises(InputError, match="disagrees with MICROSTRUCTURE_ONLINE_STORE"):
        settings.change_online(d, "sqlite")
    assert _record(d)["online_store"] == "rediss://cache.example:6380/2"


def test_the_offline_variable_picks_the_engine_for_one_command(tmp_path, no_store_vars, monkeypatch):
    d = tmp_path / "data"
    monkeypatch.setenv("MICROSTRUCTURE_OFFLINE_STORE", "SPARK")
    with datadir.writer(d):
        pass
    monkeypatch.delenv("MICROSTRUCTURE_OFFLINE_STORE")
    assert settings.effective(d).offline_store == "spark"  # recorded
    monkeypatch.setenv("MICROSTRUCTURE_OFFLINE_STORE", "duckdb")
    assert settings.effective(d).offline_store == "duckdb"  # the same lake through another engine
    assert _record(d)["offline_store"] == "spark"
    monkeypatch.setenv("MICROSTRUCTURE_OFFLINE_STORE", "oracle")
    with pytest.raises(InputError, match="offline_store"):
        settings.effective(d)


@pytest.mark.parametrize("body", [
    b"not json", b"[1, 2]", b'"sqlite"', b"null", b"\xff\xfe\x00",
    b'{"format": 1, "online_store": "sqlite", "offline_store": "duckdb", "extra": 1}',
    b'{"format": 2, "online_store": "sqlite", "offline_store": "duckdb"}',
    b'{"format": "1", "online_store": "sqlite", "offline_store": "duckdb"}',
    b'{"format": 1, "online_store": "mysql://x", "offline_store": "duckdb"}',
    b'{"format": 1, "online_store": "redis://:leaked-pw@h:1/0", "offline_store": "duckdb"}',
    b'{"format": 1, "online_store": "sqlite", "offline_store": "duckdb", "online_store_password": "yes"}',
    b'{"format": 1, "online_store": "sqlite"}',
    b" " * (settings.MAX_BYTES + 1),
])
def test_a_bad_record_is_one_line(tmp_path, no_store_vars, body):
    (tmp_path / settings.SETTINGS_FILE).write_bytes(body)
    with pytest.raises(InputError) as e:
        settings.effective(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and settings.SETTINGS_FILE in msg and "leaked-pw" not in msg


def test_a_symlinked_record_is_refused(tmp_path, no_store_vars):
    (tmp_path / "elsewhere.json").write_text('{"format": 1, "online_store": "sqlite", "offline_store": "duckdb"}')
    (tmp_path / settings.SETTINGS_FILE).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(InputError, match="not a regular file"):
        settings.effective(tmp_path)


# --- the CLI, in fresh shells ----------------------------------------------------------------------------------

@pytest.fixture
def redis_client():
    redis = pytest.importorskip("redis")
    client = redis.Redis(db=REDIS_DB)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.mark.integration  # a Redis server, and the CLI in subprocesses
def test_a_data_dir_made_with_redis_keeps_redis_in_a_shell_without_the_variable(tmp_path, redis_client):
    d = tmp_path / "data"
    p = cli("run", "--data-dir", d, "--cycles", 3, "--symbols", 3, "--json", MICROSTRUCTURE_ONLINE_STORE=REDIS_URL)
    assert p.returncode == 0, p.stderr
    assert redis_client.dbsize() == 3 and _record(d)["online_store"] == REDIS_URL
    yaml_path = d / "feast" / "feature_store.yaml"
    before = yaml_path.read_bytes()
    assert b"type: redis" in before

    p = cli("online", "MEGA01", "--data-dir", d, "--json")  # no variable: the recorded Redis
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)[0]["found"] is True
    assert yaml_path.read_bytes() == before and not (d / "feast" / "online_store.db").exists()

    p = cli("online", "MEGA01", "--data-dir", d, "--json", MICROSTRUCTURE_ONLINE_STORE="sqlite")
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: ") and REDIS_URL in p.stderr and "--online-store sqlite" in p.stderr
    assert yaml_path.read_bytes() == before and _record(d)["online_store"] == REDIS_URL

    # Changing it takes the writer's option, and says so.
    p = cli("run", "--data-dir", d, "--cycles", 2, "--symbols", 3, "--json", "--online-store", "sqlite")
    assert p.returncode == 0, p.stderr
    assert f"online store: {REDIS_URL} -> sqlite" in p.stderr
    assert _record(d)["online_store"] == "sqlite" and b"type: redis" not in yaml_path.read_bytes()
    p = cli("online", "MEGA01", "--data-dir", d, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)[0]["found"] is True, p.stderr

    # A read command on a data dir without a record records nothing.
    (d / settings.SETTINGS_FILE).unlink()
    assert cli("online", "MEGA01", "--data-dir", d, "--json").returncode == 0
    assert not (d / settings.SETTINGS_FILE).exists()

    # A corrupt record is one line, exit 2.
    (d / settings.SETTINGS_FILE).write_text("{not json")
    p = cli("online", "MEGA01", "--data-dir", d, "--json")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "settings.json" in p.stderr, p.stderr


@pytest.mark.integration  # a Redis server, and the CLI in subprocesses
def test_a_password_in_the_url_never_reaches_a_file_of_the_data_dir(tmp_path, redis_client):
    secret = "s3cret-Pw-7f1c"
    d = tmp_path / "data"
    url = f"redis://:{secret}@127.0.0.1:6379/{REDIS_DB}"
    p = cli("poll", "--data-dir", d, "--cycles", 3, "--symbols", 3, "--interval", 0, "--json",
            MICROSTRUCTURE_ONLINE_STORE=url)
    assert p.returncode == 0, p.stderr
    assert secret not in p.stdout + p.stderr
    assert _record(d) == {"format": 1, "online_store": REDIS_URL, "offline_store": "duckdb",
                          "online_store_password": True}
    held = [f for f in d.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]
    assert held == []
    assert b"${MICROSTRUCTURE_REDIS_PASSWORD}" in (d / "feast" / "feature_store.yaml").read_bytes()
    # A shell with neither the URL nor the password is told what is missing, in one line.
    p = cli("online", "MEGA01", "--data-dir", d, "--json")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "MICROSTRUCTURE_REDIS_PASSWORD" in p.stderr
    p = cli("online", "MEGA01", "--data-dir", d, "--json", MICROSTRUCTURE_REDIS_PASSWORD=secret)
    assert p.returncode == 0 and json.loads(p.stdout)[0]["found"] is True, p.stderr
