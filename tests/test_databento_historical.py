"""``backfill --from databento``: Databento's own SDK against a local stand-in of ``POST /v0/timeseries.get_range``
(HTTPS with a test certificate, HTTP basic auth with the key as user, form fields, a zstd DBN answer), driven
through the real CLI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from werkzeug import Request, Response

from microstructure.lake import paths as lake
from microstructure.lake.paths import LakePaths
from tests.dbn_files import NS, T0, exact, level, mbp, write_dbn

pytestmark = pytest.mark.integration  # a TLS server and the CLI in subprocesses

KEY = "db-TESTKEY0123456789abcdefXYZ"


def _cert(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (what REQUESTS_CA_BUNDLE trusts in the CLI's process)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    crt, pem = tmp / "stand-in.crt", tmp / "stand-in.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    from pytest_httpserver import HTTPServer

    crt, pem = _cert(tmp_path_factory.mktemp("tls"))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, pem)
    s = HTTPServer(host="127.0.0.1", port=0, ssl_context=ctx)
    s.start()
    yield s, crt
    s.clear()
    if s.is_running():
        s.stop()


@pytest.fixture
def stand_in(tls_server):
    s, crt = tls_server
    s.clear()
    return s, crt


def _env(url: str, crt: Path, key: str = KEY) -> dict[str, str]:
    return {**os.environ, "DATABENTO_API_KEY": key, "MICROSTRUCTURE_DATABENTO_HIST_URL": url,
            "REQUESTS_CA_BUNDLE": str(crt)}


def cli(*args, env):
    return subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def _books() -> list[tuple[int, int, list]]:
    """(instrument, ts_recv, levels): two symbols, three seconds each."""
    out = []
    for i in range(3):
        for iid, base in ((1, 189_123_456_789), (2, 411_987_654_321)):
            lv = [level(base - k * 10_000_000 - i, 100 + k + i, base + (k + 1) * 10_000_000 + i, 200 + k)
                  for k in range(10)]
            out.append((iid, T0 + i * NS + iid, lv))
    return out


def test_get_range_streams_into_the_lake_every_level_equal_to_the_served_records(stand_in, tmp_path):
    server, crt = stand_in
    books = _books()
    answer = write_dbn(tmp_path / "answer.dbn.zst", {"AAPL": 1, "MSFT": 2},
                       [mbp(iid, ts, lv) for iid, ts, lv in books]).read_bytes()
    seen: list[dict] = []

    def get_range(req: Request) -> Response:
        seen.append({"auth": (req.authorization.username, req.authorization.password) if req.authorization else None,
                     "form": dict(req.form)})
        if not req.authorization or req.authorization.username != KEY:
            return Response(json.dumps({"detail": "Authentication failed."}), 401, content_type="application/json")
        return Response(answer, 200, content_type="application/octet-stream")

    server.expect_request("/v0/timeseries.get_range", method="POST").respond_with_handler(get_range)
    d = tmp_path / "data"
    r = cli("backfill", "--from", "databento", "--dataset", "XNAS.ITCH", "--symbols", "AAPL,MSFT",
            "--start", "2025-11-24T16:00:00", "--end", "2025-11-24T16:01:00", "--data-dir", d, "--json",
            env=_env(server.url_for("").rstrip("/"), crt))
    assert r.returncode == 0, r.stderr
    assert seen == [{"auth": (KEY, ""), "form": {
        "dataset": "XNAS.ITCH", "start": "2025-11-24T16:00:00+00:00", "end": "2025-11-24T16:01:00+00:00",
        "symbols": "AAPL,MSFT", "schema": "mbp-10", "stype_in": "raw_symbol", "stype_out": "instrument_id",
        "encoding": "dbn", "compression": "zstd"}}]
    res = json.loads(r.stdout)
    res = res[0] if isinstance(res, list) else res
    assert res["written"] == 6 and res["symbols"] == 2, res
    rows = [row for f in sorted(LakePaths(d.resolve()).dataset(lake.SNAPSHOTS).rglob("*.parquet"))
            for row in pq.read_table(f).to_pylist()]
    got = sorted(((r["symbol"], int(r["received_ts"].timestamp() * 1e6)),
                  [(r[f"bid_px_{k}"], r[f"bid_sz_{k}"], r[f"ask_px_{k}"], r[f"ask_sz_{k}"]) for k in range(1, 11)])
                 for r in rows)
    want = sorted(((("AAPL", "MSFT")[iid - 1], ts // 1000),
                   [(exact(x.bid_px), float(x.bid_sz), exact(x.ask_px), float(x.ask_sz)) for x in lv])
                  for iid, ts, lv in books)
    assert got == want


def test_a_refused_key_is_one_error_line_with_the_key_scrubbed(stand_in, tmp_path):
    server, crt = stand_in
    # A hostile or careless server echoes the key in its refusal: it must never reach the terminal.
    server.expect_request("/v0/timeseries.get_range", method="POST").respond_with_json(
        {"detail": f"Authentication failed for key {KEY}."}, status=401)
    r = cli("backfill", "--from", "databento", "--dataset", "XNAS.ITCH", "--symbols", "AAPL",
            "--start", "2025-11-24T16:00", "--end", "2025-11-24T17:00", "--data-dir", tmp_path / "d",
            env=_env(server.url_for("").rstrip("/"), crt))
    err = one_error_line(r)
    assert "401 Authentication failed" in err and KEY not in err and KEY not in r.stdout, err


def test_a_plain_http_stand_in_off_loopback_is_refused_before_the_key_is_sent(stand_in, tmp_path):
    server, crt = stand_in
    for url, says in (("http://203.0.113.7:8080", "plain http is allowed only to a loopback host"),
                      ("http://127.0.0.1:9", "speaks https only")):
        r = cli("backfill", "--from", "databento", "--dataset", "XNAS.ITCH", "--symbols", "AAPL",
                "--start", "2025-11-24T16:00", "--end", "2025-11-24T17:00", "--data-dir", tmp_path / "d",
                env=_env(url, crt))
        assert says in one_error_line(r)
    assert server.log == []


def test_requests_past_the_bounds_are_refused_before_anything_is_sent(stand_in, tmp_path):
    server, crt = stand_in
    env = _env(server.url_for("").rstrip("/"), crt)
    base = ["backfill", "--from", "databento", "--dataset", "XNAS.ITCH", "--data-dir", tmp_path / "d"]
    r = cli(*base, "--symbols", "AAPL", "--start", "2025-01-01", "--end", "2025-03-01", env=env)
    assert "more than 7 days in one request (MAX_SPAN)" in one_error_line(r)
    r = cli(*base, "--symbols", ",".join(f"S{i}" for i in range(101)), "--start", "2025-01-01",
            "--end", "2025-01-02", env=env)
    assert "101 symbols: at most 100 in one request (MAX_SYMBOLS)" in one_error_line(r)
    assert server.log == [] and not (tmp_path / "d").exists()


def test_a_stand_in_that_streams_forever_is_stopped_at_the_download_bound(stand_in, tmp_path, monkeypatch):
    """The SDK writes the answer to disk with no limit: a hostile (or mistaken) server streaming forever must stop
    at MAX_DOWNLOAD_BYTES with one error, the temporary file removed, and the process's file-size limit put back."""
    import resource
    import tempfile

    from microstructure.recorded.databento_historical import HistoricalError, fetch_mbp10

    server, crt = stand_in
    head = write_dbn(tmp_path / "head.dbn.zst", {"AAPL": 1}, []).read_bytes()

    def forever():
        yield head
        block = os.urandom(1 << 16)  # incompressible: the bytes on disk are the bytes sent
        while True:
            yield block

    server.expect_request("/v0/timeseries.get_range", method="POST").respond_with_handler(
        lambda req: Response(forever(), 200, content_type="application/octet-stream"))
    for k, v in _env(server.url_for("").rstrip("/"), crt).items():
        monkeypatch.setenv(k, v)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    batches = fetch_mbp10("XNAS.ITCH", ["AAPL"], dt.datetime(2025, 11, 24, 16, tzinfo=dt.UTC),
                          dt.datetime(2025, 11, 24, 17, tzinfo=dt.UTC), 1.0, max_bytes=4 << 20)
    with pytest.raises(HistoricalError, match=r"passed 4,194,304 bytes on disk \(MAX_DOWNLOAD_BYTES\)"):
        next(iter(batches))
    assert list(tmp.iterdir()) == []  # the partial answer is gone
    assert resource.getrlimit(resource.RLIMIT_FSIZE) == limit


def test_a_missing_key_or_refused_url_creates_no_data_dir(stand_in, tmp_path):
    server, crt = stand_in
    env = _env(server.url_for("").rstrip("/"), crt)
    no_key = {k: v for k, v in env.items() if k != "DATABENTO_API_KEY"}
    base = ["backfill", "--from", "databento", "--dataset", "XNAS.ITCH", "--symbols", "AAPL",
            "--start", "2025-11-24T16:00", "--end", "2025-11-24T17:00", "--data-dir", tmp_path / "d"]
    assert "DATABENTO_API_KEY is not set" in one_error_line(cli(*base, env=no_key))
    assert "speaks https only" in one_error_line(cli(*base, env={**env, "MICROSTRUCTURE_DATABENTO_HIST_URL":
                                                                 "http://127.0.0.1:9"}))
    assert not (tmp_path / "d").exists() and server.log == []


def test_a_dataset_holding_a_path_is_refused_and_writes_nothing_outside_the_temp_dir(stand_in, tmp_path, monkeypatch):
    """The answer's temporary file was named after --dataset: "../x" put the download beside the temporary
    directory, where it stayed after the run."""
    import tempfile

    from microstructure.recorded.databento_historical import HistoricalError, fetch_mbp10

    server, crt = stand_in
    answer = write_dbn(tmp_path / "a.dbn.zst", {"AAPL": 1}, [mbp(1, T0, [level(189 * NS, 1, 190 * NS, 1)])])
    server.expect_request("/v0/timeseries.get_range", method="POST").respond_with_data(
        answer.read_bytes(), content_type="application/octet-stream")
    for k, v in _env(server.url_for("").rstrip("/"), crt).items():
        monkeypatch.setenv(k, v)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with pytest.raises(HistoricalError, match="is not a Databento dataset code"):
        for _ in fetch_mbp10("../escape", ["AAPL"], dt.datetime(2025, 11, 24, 16, tzinfo=dt.UTC),
                             dt.datetime(2025, 11, 24, 17, tzinfo=dt.UTC)):
            pass
    assert list(tmp.iterdir()) == [] and server.log == []


def test_a_warning_header_echoing_the_key_is_scrubbed_one_line(stand_in, tmp_path):
    """The SDK prints the server's X-Warning header through warnings.warn, as sent: a server echoing the key (or
    sending terminal escapes) reached stderr."""
    server, crt = stand_in
    answer = write_dbn(tmp_path / "a.dbn.zst", {"AAPL": 1}, [mbp(1, T0, [level(189 * NS, 1, 190 * NS, 1)])])
    warning = json.dumps([f"Warning: your key {KEY} is \x1b[31mold\nsecond line"])
    server.expect_request("/v0/timeseries.get_range", method="POST").respond_with_data(
        answer.read_bytes(), content_type="application/octet-stream", headers={"X-Warning": warning})
    r = cli("backfill", "--from", "databento", "--dataset", "XNAS.ITCH", "--symbols", "AAPL",
            "--start", "2025-11-24T16:00", "--end", "2025-11-24T17:00", "--data-dir", tmp_path / "d", "--json",
            env=_env(server.url_for("").rstrip("/"), crt))
    assert r.returncode == 0, r.stderr
    assert KEY not in r.stderr + r.stdout and "\x1b" not in r.stderr
    told = [ln for ln in r.stderr.splitlines() if "Databento:" in ln]
    assert told == ["Databento: your key *** is \\x1b[31mold second line"], r.stderr


def test_all_symbols_which_asks_for_the_whole_dataset_is_refused_before_anything_is_sent(stand_in, tmp_path):
    """``ALL_SYMBOLS`` is Databento's word for every symbol of the dataset: one "symbol" under MAX_SYMBOLS that
    requested (and billed) all of them."""
    server, crt = stand_in
    for word in ("ALL_SYMBOLS", "AAPL,all_symbols"):
        r = cli("backfill", "--from", "databento", "--dataset", "XNAS.ITCH", "--symbols", word, "--start",
                "2025-11-24T16:00", "--end", "2025-11-24T17:00", "--data-dir", tmp_path / "d",
                env=_env(server.url_for("").rstrip("/"), crt))
        assert "asks for every symbol of the dataset" in one_error_line(r)
    assert server.log == [] and not (tmp_path / "d").exists()
