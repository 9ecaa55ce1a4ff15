"""Databento historical MBP-10, fetched with Databento's own SDK and read like a DBN file (``recorded.dbn``).

``databento.Historical(key).timeseries.get_range(..., path=<temp file>)`` streams the answer (zstd DBN) to a
file in chunks; the file is then read by the bounded DBN reader and removed. Memory is the SDK's chunk plus the
reader's (a DBNStore held in memory would hold the whole answer). The key comes from ``DATABENTO_API_KEY`` only
and never appears in an error (``sources.secrets.scrub``); the host moves to a stand-in only through
``MICROSTRUCTURE_DATABENTO_HIST_URL`` (``sources.vendor.base_url_from_env``: plain http is refused off loopback
as for every vendor, and on loopback too, since the SDK only speaks https; a local stand-in serves TLS and
``REQUESTS_CA_BUNDLE`` names its certificate).

A request is bounded before it is sent (it costs money and disk): at most MAX_SPAN of time and MAX_SYMBOLS
symbols, never ``ALL_SYMBOLS``. The answer is bounded on disk while it downloads: the SDK writes it with no
limit of its own, so the process's file-size limit (``RLIMIT_FSIZE``) is lowered to MAX_DOWNLOAD_BYTES for the
download (a larger answer, or a stand-in that streams forever, fails the write: one error, the temporary file
removed); its decompressed size is bounded by the DBN reader.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from microstructure.contract.inputs import InputError
from microstructure.recorded.batch import Batch
from microstructure.recorded.bounds import MAX_FIELD_BYTES

_log = logging.getLogger(__name__)
KEY_ENV = "DATABENTO_API_KEY"
HIST_URL_ENV = "MICROSTRUCTURE_DATABENTO_HIST_URL"
SCHEMA = "mbp-10"
# One request: a day of MBP-10 of a liquid future is several GB of DBN; a week of a few symbols is the most a
# laptop should download in one go (split longer backfills into several runs: each is idempotent).
MAX_SPAN = dt.timedelta(days=7)
MAX_SYMBOLS = 100  # the SDK takes 2,000; more than this in one answer is more instruments than one run should hold
# The zstd answer on disk (in the temporary directory, TMPDIR). MBP-10 compresses ~5x, so this is about what the
# DBN reader's MAX_DECOMPRESSED_BYTES (64 GiB) lets through anyway: a larger answer could not be read.
MAX_DOWNLOAD_BYTES = 16 * 2**30


class HistoricalError(InputError):
    """A request refused before it is sent, or Databento's (or the stand-in's) refusal: one line, key scrubbed."""


def check_request(dataset: str, symbols: list[str], start: dt.datetime, end: dt.datetime) -> None:
    """Refuses a request past the bounds (MAX_SPAN, MAX_SYMBOLS) or without a dataset, before it costs anything."""
    if not dataset or len(dataset) > MAX_FIELD_BYTES:
        raise HistoricalError("--dataset is required (e.g. XNAS.ITCH, GLBX.MDP3)")
    if not re.fullmatch(r"[A-Za-z0-9]+(?:[.-][A-Za-z0-9]+)*", dataset):
        raise HistoricalError(f"--dataset {dataset[:40]!r} is not a Databento dataset code (e.g. XNAS.ITCH, "
                              "GLBX.MDP3)")
    if not symbols:
        raise HistoricalError("--symbols is required: a comma-separated list (e.g. AAPL,MSFT)")
    if len(symbols) > MAX_SYMBOLS:
        raise HistoricalError(f"{len(symbols)} symbols: at most {MAX_SYMBOLS} in one request (MAX_SYMBOLS); "
                              "split it into several runs")
    if any(not s or len(s) > MAX_FIELD_BYTES for s in symbols):
        raise HistoricalError("--symbols holds an empty or overlong symbol")
    if any(s.upper() == "ALL_SYMBOLS" for s in symbols):
        # Databento's word for every symbol of the dataset: one "symbol" past MAX_SYMBOLS, and the cost of all.
        raise HistoricalError("--symbols ALL_SYMBOLS asks for every symbol of the dataset: name the symbols (at most "
                              f"{MAX_SYMBOLS}, MAX_SYMBOLS)")
    if end <= start:
        raise HistoricalError(f"--end {end.isoformat()} is not after --start {start.isoformat()}")
    if end - start > MAX_SPAN:
        raise HistoricalError(f"--start .. --end spans {end - start}, more than {MAX_SPAN.days} days in one request "
                              "(MAX_SPAN); split it into several runs (each is idempotent)")


def check_config() -> tuple[str, str | None]:
    """(key, https gateway or None) from the environment, or HistoricalError: checked before anything is locked or
    created, so a run without a key leaves no data dir behind."""
    from microstructure.sources.vendor import ConfigError, base_url_from_env, env_key

    try:
        key = env_key(KEY_ENV, True, "the Databento historical API needs a key")
        gateway = base_url_from_env(HIST_URL_ENV)
    except ConfigError as e:
        raise HistoricalError(str(e)) from None
    if gateway is not None and not gateway.startswith("https://"):
        # The SDK rewrites every gateway to https (databento.common.validation.validate_gateway): say so rather
        # than send the key somewhere the user did not write.
        raise HistoricalError(f"{HIST_URL_ENV}: the Databento historical client speaks https only; give an https:// "
                              "URL (a local stand-in serves TLS, its certificate named by REQUESTS_CA_BUNDLE)")
    assert key is not None
    return key, gateway


def fetch_mbp10(dataset: str, symbols: list[str], start: dt.datetime, end: dt.datetime, cadence_s: float = 1.0,
                max_bytes: int = MAX_DOWNLOAD_BYTES) -> Iterator[Batch]:
    """The request's MBP-10 records, sampled at ``cadence_s`` (see ``recorded.dbn``), in ``Batch``es. The request
    is checked (bounds, key, host) now; the download happens when the first batch is asked for, and the temporary
    file is removed when the iteration ends."""
    from microstructure.recorded.bounds import check_cadence

    check_cadence(cadence_s)
    check_request(dataset, symbols, start, end)
    key, gateway = check_config()
    return _download_and_read(key, gateway, dataset, symbols, start, end, cadence_s, max_bytes)


@contextlib.contextmanager
def _file_size_limit(max_bytes: int) -> Iterator[None]:
    """No file this process writes grows past ``max_bytes`` while inside (a write past it fails with EFBIG:
    CPython ignores SIGXFSZ from start-up, so the write raises instead of the signal killing the process). The
    SDK's download loop has no bound of its own, and is not ours to patch; the limit is per file, so the lake's
    files (far smaller) are not affected by it."""
    import resource
    import signal

    if signal.getsignal(signal.SIGXFSZ) != signal.SIG_IGN:
        raise HistoricalError("SIGXFSZ is not ignored in this process: the download could not be bounded")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    new = max_bytes if soft == resource.RLIM_INFINITY else min(soft, max_bytes)
    resource.setrlimit(resource.RLIMIT_FSIZE, (new, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _download_and_read(key: str, gateway: str | None, dataset: str, symbols: list[str], start: dt.datetime,
                       end: dt.datetime, cadence_s: float, max_bytes: int) -> Iterator[Batch]:
    import databento as db

    from microstructure.contract.text import visible
    from microstructure.recorded.dbn import read_dbn
    from microstructure.sources.secrets import scrub

    with tempfile.TemporaryDirectory(prefix="microstructure-databento-") as tmp:
        path = Path(tmp) / "answer.dbn.zst"  # never a name from input: a "../" in it would leave the directory
        try:
            client = db.Historical(key, gateway=gateway) if gateway else db.Historical(key)
            # The SDK turns the server's X-Warning header into warnings.warn: printed as sent, unscrubbed (a
            # server may echo the key) and with its control characters. Caught here, and retold below.
            with _file_size_limit(max_bytes), warnings.catch_warnings(record=True) as told:
                warnings.simplefilter("always")
                client.timeseries.get_range(dataset=dataset, symbols=symbols, schema=SCHEMA, start=start, end=end,
                                            stype_in="raw_symbol", path=path)
        except Exception as e:  # the SDK's BentoError family, requests' and OSErrors: one line, key scrubbed
            if path.exists() and path.stat().st_size >= max_bytes:
                raise HistoricalError(f"the Databento answer passed {max_bytes:,} bytes on disk (MAX_DOWNLOAD_BYTES) "
                                      "and was stopped: request fewer symbols or a shorter span") from None
            detail = " ".join(str(e).split())[:300] or type(e).__name__
            raise HistoricalError(scrub(f"Databento timeseries.get_range failed: {detail}")) from None
        from databento.common.error import BentoWarning

        told = [w for w in told if issubclass(w.category, BentoWarning)]
        for w in told[:10]:  # each one line, scrubbed, control characters escaped (a failed request: its error only)
            _log.warning("Databento: %s", visible(scrub(" ".join(str(w.message).split())[:300])))
        yield from read_dbn([path], cadence_s, None)
