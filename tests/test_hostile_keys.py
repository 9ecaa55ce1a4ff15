"""Keys go to the vendors only, and no stored or printed error text carries one.

- A sources file (above all one inside a data dir, which may come from anyone) cannot say where a key is sent:
  ``base_url`` is refused before any request is made.
- Only the environment may point a vendor at a stand-in, and plain http only to a loopback host.
- A vendor whose error answers echo our request headers leaves no key in lake/outcomes, the quarantine, stdout
  or stderr.

The stand-in vendor is pytest-httpserver on 127.0.0.1 (real HTTP, the official clients unpatched).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from werkzeug import Request, Response

from microstructure.sources.chain_config import build_chain
from microstructure.sources.secrets import scrub
from microstructure.sources.vendor import ConfigError, base_url_from_env
from tests.vendor_server import (
    ALPACA_CRYPTO,
    ALPACA_STOCKS,
    POLY_STOCKS,
    SECRET_ID,
    SECRET_KEY,
    SECRET_POLY,
    chain_file,
    good_alpaca,
    poly_crypto_path,
    poly_quote,
    poly_snapshot,
    respond,
)

SECRETS = (SECRET_POLY, SECRET_ID, SECRET_KEY)
BASE_VARS = ("MICROSTRUCTURE_POLYGON_BASE_URL", "MICROSTRUCTURE_ALPACA_DATA_URL")
FAST = "timeout_s = 0.8\nrate_per_s = 1000.0\nburst = 1000.0"


def cli(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def keys_env(**extra: str) -> dict[str, str]:
    """The user's environment: vendor keys set, no base-URL override (unless given)."""
    env = {k: v for k, v in os.environ.items() if k not in BASE_VARS}
    env.update(POLYGON_API_KEY=SECRET_POLY, APCA_API_KEY_ID=SECRET_ID, APCA_API_SECRET_KEY=SECRET_KEY, **extra)
    return env


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def record_everything(server) -> list[dict[str, str]]:
    """Answer every request with 200 {} and keep its headers: what a stub run by an attacker would collect."""
    seen: list[dict[str, str]] = []

    def handler(request: Request) -> Response:
        seen.append(dict(request.headers))
        return Response("{}", content_type="application/json")

    server.expect_request(re.compile(".*")).respond_with_handler(handler)
    return seen


def sources_toml(path: Path, base_url: str | None = None) -> Path:
    line = "" if base_url is None else f'base_url = "{base_url}"\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""
cycle_deadline_s = 2.0
[sources.polygon]
kind = "polygon"
asset = "stocks"
retries = 0
{line}{FAST}
[sources.alpaca]
kind = "alpaca"
asset = "stocks"
{line}{FAST}
[groups.stocks]
chain = ["polygon", "alpaca"]
symbols = ["AAPL", "MSFT"]
""")
    return path


def poll_args(data_dir: Path, *extra: object) -> list[object]:
    return ["poll", "--source", "chain", "--interval", "1", "--cycles", "1", "--no-online", "--json",
            "--data-dir", data_dir, *extra]


# ---- a sources file cannot choose where a key goes ---------------------------------------------------------
@pytest.mark.integration
def test_data_dir_sources_toml_base_url_to_a_loopback_stub_never_receives_a_key(server, tmp_path):
    seen = record_everything(server)
    d = tmp_path / "data"
    sources_toml(d / "sources.toml", server.url_for("/").rstrip("/"))
    line = one_error_line(cli(*poll_args(d), env=keys_env()))
    assert "base_url cannot be set in a sources file" in line
    assert re.search(r"set MICROSTRUCTURE_(POLYGON_BASE_URL|ALPACA_DATA_URL) in the environment", line), line
    assert seen == [] and server.log == []  # not one request, so not one key


@pytest.mark.integration
def test_data_dir_sources_toml_base_url_to_an_external_host_is_refused_before_any_request(server, tmp_path):
    # Even with a legitimate loopback stand-in set by the environment, the file's host is refused outright.
    seen = record_everything(server)
    d = tmp_path / "data"
    sources_toml(d / "sources.toml", "http://vendor-mirror.example.net:8080")
    stand_in = server.url_for("/").rstrip("/")
    env = keys_env(MICROSTRUCTURE_POLYGON_BASE_URL=stand_in, MICROSTRUCTURE_ALPACA_DATA_URL=stand_in)
    line = one_error_line(cli(*poll_args(d), env=env))
    assert "base_url cannot be set" in line and "example.net" not in line
    assert seen == [] and server.log == []
    for k in SECRETS:
        assert k not in line


@pytest.mark.parametrize("url", ["https://api.polygon.io", "http://127.0.0.1:1"])
def test_any_sources_file_with_base_url_is_refused_in_process(tmp_path, url, monkeypatch):
    monkeypatch.setenv("POLYGON_API_KEY", SECRET_POLY)
    with pytest.raises(ConfigError, match=r"base_url cannot be set in a sources file.*environment"):
        build_chain(sources_toml(tmp_path / "anywhere" / "chain.toml", url))


# ---- only the environment may move a vendor, and plain http only to loopback -------------------------------
@pytest.mark.parametrize("url", ["http://10.1.2.3", "http://169.254.169.254/latest", "http://0.0.0.0:8080",
                                 "http://127.0.0.1.nip.io", "http://localhost.evil.example", "ftp://127.0.0.1",
                                 "http://user:pw@127.0.0.1:1", "https://127.0.0.1:1/?apiKey=x", "127.0.0.1:80",
                                 "http://[::ffff:10.0.0.1]", "http://127.0.0.1:notaport"])
def test_env_base_url_off_loopback_or_malformed_is_refused(url, monkeypatch):
    monkeypatch.setenv("MICROSTRUCTURE_POLYGON_BASE_URL", url)
    with pytest.raises(ConfigError, match="MICROSTRUCTURE_POLYGON_BASE_URL"):
        base_url_from_env("MICROSTRUCTURE_POLYGON_BASE_URL")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/", "http://127.9.9.9", "http://[::1]:8080", "http://localhost:1",
                                 "https://api.polygon.io", "https://data.alpaca.markets"])
def test_env_base_url_https_or_loopback_http_is_allowed(url, monkeypatch):
    monkeypatch.setenv("MICROSTRUCTURE_ALPACA_DATA_URL", url)
    assert base_url_from_env("MICROSTRUCTURE_ALPACA_DATA_URL") == url.rstrip("/")


@pytest.mark.integration
def test_env_base_url_http_10_1_2_3_makes_poll_exit_2_and_loopback_stub_works(server, tmp_path):
    server.expect_request(POLY_STOCKS).respond_with_json(
        poly_snapshot(poly_quote("AAPL", 189.50, 189.52), poly_quote("MSFT", 410.0, 410.05)))
    cfg = sources_toml(tmp_path / "chain.toml")
    bad = keys_env(MICROSTRUCTURE_POLYGON_BASE_URL="http://10.1.2.3")
    line = one_error_line(cli(*poll_args(tmp_path / "d1", "--sources-config", cfg), env=bad))
    assert "MICROSTRUCTURE_POLYGON_BASE_URL" in line and "loopback" in line
    assert server.log == []
    stand_in = server.url_for("/").rstrip("/")
    good = keys_env(MICROSTRUCTURE_POLYGON_BASE_URL=stand_in, MICROSTRUCTURE_ALPACA_DATA_URL=stand_in)
    r = cli(*poll_args(tmp_path / "d2", "--sources-config", cfg), env=good)
    assert r.returncode == 0, r.stderr
    # The stand-in the environment chose got the key, in the header Polygon documents.
    assert server.log and server.log[0][0].headers["Authorization"] == f"Bearer {SECRET_POLY}"


# ---- a vendor that echoes our headers in its errors --------------------------------------------------------
KEY_HEADERS = ("authorization", "apca-api-key-id", "apca-api-secret-key")


def echo(status: int, shape: str = "error"):
    """Answer ``status`` with a body that repeats the request's key headers (first, so no truncation hides
    them), the bare values, and the URL."""

    def handler(request: Request) -> Response:
        hdrs = {k: v for k, v in request.headers.items() if k.lower() in KEY_HEADERS}
        bare = [v.removeprefix("Bearer ") for v in hdrs.values()]
        if shape == "bad_row":  # a 200 whose ticker row is unreadable: kept for quarantine with its text
            body = poly_snapshot({"ticker": "AAPL", "lastQuote": f"echo {hdrs} {bare}"},
                                 poly_quote("MSFT", 410.0, 410.05))
            return Response(json.dumps(body), content_type="application/json")
        if shape == "bad_quote":  # Alpaca quotes whose prices are our keys: the SDK's validation error quotes them
            body = {"quotes": {s: {"t": "2025-11-24T16:00:00Z", "ap": bare[0], "as": 1, "bp": bare[-1], "bs": 1,
                                   "ax": "V", "bx": "V", "c": [], "z": "C"} for s in ("AAPL", "MSFT")}}
            return Response(json.dumps(body), content_type="application/json")
        body = {"headers": hdrs, "you sent": bare, "url": request.url, "status": status}
        return Response(json.dumps(body), status=status, content_type="application/json")

    return handler


def chain_toml(tmp_path: Path) -> Path:
    p = tmp_path / "echo.toml"
    p.write_text(f"""
cycle_deadline_s = 2.0
[sources.polygon]
kind = "polygon"
asset = "stocks"
retries = 0
{FAST}
[sources.alpaca]
kind = "alpaca"
asset = "stocks"
{FAST}
[sources.alpaca_crypto]
kind = "alpaca"
asset = "crypto"
{FAST}
[sources.polygon_crypto]
kind = "polygon"
asset = "crypto"
retries = 0
{FAST}
[groups.stocks]
chain = ["alpaca", "polygon"]  # an outcome keeps the last source's detail: Polygon's (it quotes the body)
symbols = ["AAPL", "MSFT", "NVDA"]
[groups.crypto]
chain = ["alpaca_crypto", "polygon_crypto"]
symbols = ["BTC/USD"]
""")
    return p


def strings_of(f: Path) -> list[str]:
    t = pq.read_table(f)
    out: list[str] = []
    for col in t.columns:
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out += [s for s in col.to_pylist() if s]
    return out


@pytest.mark.integration
@pytest.mark.parametrize("stocks", ["error_403", "bad_row"])
def test_vendor_echoing_request_headers_leaves_no_key_in_the_lake_or_the_terminal(env, tmp_path, stocks):
    if stocks == "error_403":
        env.expect_request(POLY_STOCKS).respond_with_handler(echo(403))
        env.expect_request(ALPACA_STOCKS).respond_with_handler(echo(500))
    else:
        env.expect_request(POLY_STOCKS).respond_with_handler(echo(200, "bad_row"))
        env.expect_request(ALPACA_STOCKS).respond_with_handler(echo(200, "bad_quote"))
    env.expect_request(ALPACA_CRYPTO).respond_with_handler(echo(403))
    env.expect_request(poly_crypto_path("X:BTCUSD")).respond_with_handler(echo(500))
    d = tmp_path / "data"
    r = cli("poll", "--source", "chain", "--sources-config", chain_toml(tmp_path), "--interval", "1", "--cycles", "2",
            "--no-online", "--json", "--data-dir", d, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    # The attack happened: the stand-in's answers carried the keys back to us.
    answered = b"".join(resp.get_data() for _, resp in env.log)
    for k in SECRETS:
        assert k.encode() in answered, k
    files = sorted((d / "lake").rglob("*.parquet"))
    outcomes = [f for f in files if "outcomes" in f.parts]
    assert outcomes, files
    stored = [s for f in files for s in strings_of(f)]
    details = [s for f in outcomes for s in strings_of(f)]
    # The echoing answers reached the stored texts, scrubbed (without the scrubber they held the keys).
    assert any("***" in s for s in stored), "\n".join(details)
    for k in SECRETS:
        for f in files:
            assert k.encode() not in f.read_bytes(), (k, f)
        for s in stored:
            assert k not in s, (k, s)
        assert k not in r.stdout and k not in r.stderr


@pytest.mark.integration
def test_error_line_printed_by_the_cli_never_shows_a_key(tmp_path):
    # A message that would quote a key (here the path of a missing file named after it) is printed scrubbed.
    missing = tmp_path / f"{SECRET_POLY}.toml"
    line = one_error_line(cli(*poll_args(tmp_path / "d", "--sources-config", missing), env=keys_env()))
    assert "sources file not found" in line and "***.toml" in line and SECRET_POLY not in line


@pytest.mark.parametrize("text", [
    f'{{"Authorization": "Bearer {SECRET_POLY}"}}',
    f"[('APCA-API-KEY-ID', '{SECRET_ID}'), ('APCA-API-SECRET-KEY', '{SECRET_KEY}')]",
    f"Authorization: Bearer {SECRET_POLY}",
    f"GET /v2/snapshot?apiKey={SECRET_POLY}&tickers=AAPL",
    f"GET /x?api_key={SECRET_POLY}",
    f"upstream said: {SECRET_KEY}",
    f"input_value='{SECRET_ID}'",
    f"redis://:{SECRET_KEY}@cache:6379/0",
])
def test_scrub_removes_keys_headers_query_params_and_bearer_tokens(text, monkeypatch):
    for name, v in (("POLYGON_API_KEY", SECRET_POLY), ("APCA_API_KEY_ID", SECRET_ID),
                    ("APCA_API_SECRET_KEY", SECRET_KEY)):
        monkeypatch.setenv(name, v)
    out = scrub(text)
    assert "***" in out and not any(k in out for k in SECRETS), out


def test_scrub_catches_tokens_it_was_not_told_about_and_leaves_plain_text_alone(monkeypatch):
    monkeypatch.setenv("DATABENTO_API_KEY", "db-UNLISTED-key-123")
    monkeypatch.setenv("MICROSTRUCTURE_SOMETHING_TOKEN", "tok-UNLISTED-456")
    assert scrub("a db-UNLISTED-key-123 b tok-UNLISTED-456") == "a *** b ***"
    assert scrub("Bearer abc.def-ghi") == "Bearer ***"
    plain = "polygon: server_error | HTTP 500 after the client's retries; Authorization header refused"
    assert scrub(plain) == plain


@pytest.mark.parametrize("where", ["../secrets/credentials", "/etc/hostname", "link/credentials"])
def test_sources_toml_symbols_file_cannot_read_a_users_file_outside_its_folder(tmp_path, where, monkeypatch):
    # A secret made of "ticker" characters would pass the symbol check and go to the vendor as a ticker.
    monkeypatch.setenv("POLYGON_API_KEY", SECRET_POLY)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "credentials").write_text("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "link").symlink_to(secrets)  # a symlink inside the folder reaches outside it: refused too
    cfg = data / "sources.toml"
    cfg.write_text('[sources.poly]\nkind = "polygon"\n\n[groups.stocks]\nchain = ["poly"]\n'
                   f'symbols_file = "{where}"\n')
    with pytest.raises(ConfigError, match="symbols_file must be inside the sources file's folder"):
        build_chain(cfg)
    (data / "mine.txt").write_text("AAPL\nMSFT\n")
    cfg.write_text('[sources.poly]\nkind = "polygon"\n\n[groups.stocks]\nchain = ["poly"]\nsymbols_file = "mine.txt"\n')
    chain = build_chain(cfg)
    try:
        assert chain.symbols == ["AAPL", "MSFT"]
    finally:
        chain.close()


# ---- a poll through the CLI with every log at DEBUG ------------------------------------------------
@pytest.mark.integration
def test_no_key_reaches_logs_lake_or_prefect_results(env, tmp_path, caplog):
    import logging

    env.expect_request(POLY_STOCKS).respond_with_handler(respond({"status": "ERROR"}, status=500))
    good_alpaca(env)
    cfg = chain_file(tmp_path)
    d = tmp_path / "data"
    caplog.set_level(logging.DEBUG)
    envv = {**os.environ, "PREFECT_LOGGING_LEVEL": "DEBUG"}
    r = subprocess.run([sys.executable, "-m", "microstructure", "poll", "--source", "chain", "--sources-config",
                        str(cfg), "--cycles", "2", "--interval", "0", "--no-online", "--json", "--data-dir", str(d)],
                       capture_output=True, text=True, env=envv, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["served_by"] == {"alpaca": 4, "alpaca_crypto": 2}  # the keys were used
    texts = [r.stdout, r.stderr, caplog.text]
    texts += [f.read_bytes().decode("latin-1") for f in d.rglob("*") if f.is_file()]
    for secret in (SECRET_POLY, SECRET_ID, SECRET_KEY):
        assert not any(secret in t for t in texts), secret
