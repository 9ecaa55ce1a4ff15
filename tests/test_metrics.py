"""The poll's Prometheus metrics (jobs/metrics.py) and the Grafana dashboard built on them
(docs/grafana/microstructure.json), read with prometheus_client's own text parser."""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import T0

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "microstructure.json"
FAMILIES = {"microstructure_cycle_seconds", "microstructure_snapshots_written_total",
            "microstructure_quarantined_total", "microstructure_source_errors_total",
            "microstructure_skipped_slots_total", "microstructure_online_age_seconds",
            "microstructure_coverage_symbols", "microstructure_coverage_symbols_by_source"}


def _free_port() -> int:
    """A port free now, from a range of its own per xdist worker: an OS-chosen port is free only until someone binds
    it, and the other worker's poll may be about to (two workers once scraped each other's endpoint)."""
    import os
    import random

    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    base = 20_000 + 2_000 * (worker % 8)
    for port in random.sample(range(base, base + 2_000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port")


def _scrape(port: int) -> list[Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return list(text_string_to_metric_families(r.read().decode()))


def _values(families: list[Any]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def _v(families: list[Any], name: str, **labels: str) -> float | None:
    return _values(families).get((name, frozenset(labels.items())))


def _names(families: list[Any]) -> set[str]:
    """Every name a query can use: the samples', and the series names of families declared without samples yet
    (a labelled counter before its first increment)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    out = {s.name for f in families for s in f.samples}
    for f in families:
        out |= {f.name + sfx for sfx in suffixes.get(f.type, ("",))}
    return out


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once strings, label matchers, ranges and
    ``by (...)`` label lists are removed, other than functions (followed by ``(``) and keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[m.end():].lstrip().startswith("(") or m.group() in PROMQL_WORDS:
            continue
        names.add(m.group())
    return names


def dashboard_metrics() -> set[str]:
    d = json.loads(DASHBOARD.read_text())
    names: set[str] = set()
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    assert exprs and all(e.strip() for e in exprs)
    for e in exprs:
        found = promql_metrics(e)
        assert found, f"no metric in {e!r}"
        names |= found
    for var in d["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            q = q.get("query", "")
        m = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)\s*", q or "")
        if var["type"] == "query":
            assert m, f"unparsed variable query {q!r}"
            names.add(m.group(1))
    return names


def test_promql_names_are_read_out_of_expressions() -> None:
    e = ('histogram_quantile(0.95, sum by (le) (rate(microstructure_cycle_seconds_bucket{instance=~"$instance"}'
         '[$__rate_interval]))) / on (job) group_left up or vector(0)')
    assert promql_metrics(e) == {"microstructure_cycle_seconds_bucket", "up"}


def test_the_dashboard_loads_and_uses_every_family() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["schemaVersion"] >= 36 and d["panels"]
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
    # Every panel reads the data source picked at import (no hard-coded uid from another Grafana).
    assert all(p["datasource"]["uid"] == "${datasource}" for p in d["panels"])
    used = dashboard_metrics()
    assert all(n.startswith("microstructure_") for n in used), used
    fams = {re.sub(r"_(bucket|count|sum)$", "", n) for n in used}
    assert fams == FAMILIES


# ---- one cycle, in process -----------------------------------------------------------------------
def _outcomes(rows: list[tuple[str, str | None, int, str | None, str]]) -> pa.Table:
    from microstructure.contract.outcomes import OUTCOMES_SCHEMA

    return pa.Table.from_pylist(
        [{"cycle_ts": T0, "symbol": s, "source": src, "book_levels": lv, "latency_ms": None, "error_class": err,
          "detail": det} for s, src, lv, err, det in rows], schema=OUTCOMES_SCHEMA)


def test_a_cycle_updates_each_family_from_what_it_knows() -> None:
    from prometheus_client import REGISTRY

    from microstructure.jobs.metrics import PollMetrics
    from microstructure.jobs.poll import PollStats

    m = PollMetrics()
    v = m.registry.get_sample_value
    stats = PollStats()
    stats.count_outcomes(_outcomes([
        ("AAA", "polygon", 10, None, "polygon: ok"),
        ("BBB", "alpaca", 3, None, "polygon: timeout; alpaca: ok"),  # a fallback served it: polygon's error counts
        ("CCC", "polygon", 1, None, "polygon: ok"),
        ("DDD", None, 0, "rate_limited", "polygon: server_error; alpaca: rate_limited | HTTP 429"),
        ("EEE", None, 0, "not_configured", "no group in the sources file takes this symbol"),
        ("FFF", None, 0, "invalid_book", "simulated: crossed_book"),  # jobs.ingest.outcomes_from's shape
    ]))
    stats.written = 3
    stats.quarantined.update({"crossed_book": 2})
    ts = pa.array([T0, T0 + dt.timedelta(seconds=1), T0 + dt.timedelta(seconds=1.5)], pa.timestamp("us", tz="UTC"))
    online = pa.table({"symbol": ["AAA", "BBB", "CCC"], "event_ts": ts})
    now = (T0 + dt.timedelta(seconds=2)).timestamp()
    m.observe(stats, 0.12, skipped_slots=1, online=online, now=now)

    assert v("microstructure_cycle_seconds_count") == 1
    assert v("microstructure_cycle_seconds_bucket", {"le": "0.1"}) == 0
    assert v("microstructure_cycle_seconds_bucket", {"le": "0.25"}) == 1
    assert v("microstructure_snapshots_written_total") == 3
    assert v("microstructure_quarantined_total", {"reason": "crossed_book"}) == 2
    assert v("microstructure_skipped_slots_total") == 1
    errors = {(s.labels["source"], s.labels["error_class"]): s.value for f in m.registry.collect()
              if f.name == "microstructure_source_errors" for s in f.samples if s.name.endswith("_total")}
    assert errors == {("polygon", "timeout"): 1, ("polygon", "server_error"): 1, ("alpaca", "rate_limited"): 1,
                      ("none", "not_configured"): 1, ("simulated", "invalid_book"): 1}
    cov = {b: v("microstructure_coverage_symbols", {"depth": b}) for b in ("l2", "shallow", "l1_only", "none")}
    assert cov == {"l2": 1, "shallow": 1, "l1_only": 1, "none": 3}
    by_source = {(s.labels["source"], s.labels["depth"]): s.value for f in m.registry.collect()
                 if f.name == "microstructure_coverage_symbols_by_source" for s in f.samples if s.value}
    assert by_source == {("polygon", "l2"): 1, ("polygon", "l1_only"): 1, ("alpaca", "shallow"): 1,
                         ("none", "none"): 3}
    assert [v("microstructure_online_age_seconds", {"stat": s}) for s in ("min", "median", "max")] == [0.5, 1.0, 2.0]

    # The next cycle: PollStats' running totals become increments; the books online age a second.
    stats.count_outcomes(_outcomes([(s, "polygon", 10, None, "polygon: ok") for s in ("AAA", "BBB", "CCC")]))
    stats.written = 10
    stats.quarantined.update({"crossed_book": 1, "empty_book": 1})
    m.observe(stats, 3.0, skipped_slots=1, online=online, now=now + 1)
    assert v("microstructure_cycle_seconds_count") == 2
    assert v("microstructure_cycle_seconds_bucket", {"le": "2.0"}) == 1
    assert v("microstructure_snapshots_written_total") == 10
    assert v("microstructure_quarantined_total", {"reason": "crossed_book"}) == 3
    assert v("microstructure_quarantined_total", {"reason": "empty_book"}) == 1
    assert v("microstructure_skipped_slots_total") == 1
    assert v("microstructure_source_errors_total", {"source": "polygon", "error_class": "timeout"}) == 1
    assert v("microstructure_coverage_symbols", {"depth": "l2"}) == 3
    assert v("microstructure_coverage_symbols", {"depth": "none"}) == 0
    # Per source: alpaca served nothing this cycle, so it reads 0 (not its last cycle's 1); no "none" left.
    assert v("microstructure_coverage_symbols_by_source", {"source": "polygon", "depth": "l2"}) == 3
    assert v("microstructure_coverage_symbols_by_source", {"source": "alpaca", "depth": "shallow"}) == 0
    assert v("microstructure_coverage_symbols_by_source", {"source": "none", "depth": "none"}) == 0
    assert v("microstructure_online_age_seconds", {"stat": "max"}) == 3.0
    # A private registry: Prefect's default one never carries the poll's metrics (nor the poll Prefect's).
    assert REGISTRY.get_sample_value("microstructure_snapshots_written_total") is None


def test_the_endpoint_serves_and_stops_and_a_taken_port_is_one_error() -> None:
    from microstructure.jobs.metrics import MetricsError, PollMetrics, serve

    port = _free_port()
    stop = serve(PollMetrics(), port)
    try:
        fams = _scrape(port)
        assert _v(fams, "microstructure_snapshots_written_total") == 0.0
        assert _v(fams, "microstructure_coverage_symbols", depth="l2") == 0.0
        with pytest.raises(MetricsError, match=f"127.0.0.1:{port}"):
            serve(PollMetrics(), port)
    finally:
        stop()
    with pytest.raises(urllib.error.URLError):
        _scrape(port)
    with pytest.raises(MetricsError, match="1-65535"):
        serve(PollMetrics(), 70000)


# ---- a real poll, scraped over HTTP --------------------------------------------------------------
def _scrape_when(port: int, proc: subprocess.Popen[str], ready: Any, timeout_s: float = 180.0) -> list[Any]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            errs = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"the poll exited ({proc.returncode}) first: {errs[-2000:]}")
        try:
            fams = _scrape(port)
            if ready(fams):
                return fams
        except (urllib.error.URLError, ConnectionError):
            pass  # not serving yet
        time.sleep(0.1)
    raise AssertionError("no scrape showed the poll's cycles in time")


@pytest.mark.integration
def test_a_live_poll_is_scraped_twice_and_its_counts_grow(tmp_path: Path) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "microstructure", "poll", "--data-dir", str(tmp_path / "data"), "--symbols", "4",
           "--interval", "0.2", "--cycles", "60", "--metrics-port", str(port), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = _scrape_when(port, proc, lambda f: (_v(f, "microstructure_cycle_seconds_count") or 0) >= 5)
        time.sleep(2.0)  # ~10 more cycles at 0.2 s
        second = _scrape(port)
        out, errs = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, errs[-2000:]
    summary = json.loads(out)

    for name in ("microstructure_cycle_seconds_count", "microstructure_cycle_seconds_sum",
                 "microstructure_snapshots_written_total"):
        a, b = _v(first, name), _v(second, name)
        assert a is not None and b is not None and 0 < a < b, (name, a, b)
    n2 = _v(second, "microstructure_cycle_seconds_count")
    assert n2 is not None and n2 < 60 == summary["cycles"]  # the second scrape was mid-poll
    assert _v(second, "microstructure_cycle_seconds_bucket", le="+Inf") == n2
    written = _v(second, "microstructure_snapshots_written_total")
    assert written is not None and written <= summary["written"]
    assert _v(second, "microstructure_skipped_slots_total") is not None
    # Every cycle asked for the same 4 simulated symbols, 10 levels deep (one may be quarantined: a rare fault).
    depth = {b: _v(second, "microstructure_coverage_symbols", depth=b) for b in ("l2", "shallow", "l1_only", "none")}
    assert sum(x or 0 for x in depth.values()) == 4 and (depth["l2"] or 0) >= 3, depth
    # Ages in seconds, at the end of the latest cycle: the youngest book is that cycle's (its event time is the
    # cycle's slot), the oldest no older than the poll (a stale quote keeps its time; a loaded box: slack).
    young = _v(second, "microstructure_online_age_seconds", stat="min")
    old = _v(second, "microstructure_online_age_seconds", stat="max")
    assert young is not None and old is not None and 0 <= young < 5 and young <= old < 60, (young, old)

    # The dashboard's queries read only metrics this scrape has.
    missing = dashboard_metrics() - _names(second)
    assert not missing, missing
    declared = {f.name + ("_total" if f.type == "counter" else "") for f in second}
    assert not FAMILIES - declared, FAMILIES - declared
    # The poll has returned: its endpoint is gone, the port free.
    with pytest.raises(urllib.error.URLError):
        _scrape(port)


@pytest.mark.integration
def test_a_taken_metrics_port_from_the_environment_is_a_usage_error(tmp_path: Path) -> None:
    """``MICROSTRUCTURE_METRICS_PORT`` is the option's default; a port another process holds is one ``error:``
    line and exit 2, before any market is made."""
    import os

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {**os.environ, "MICROSTRUCTURE_METRICS_PORT": str(port)}
        p = subprocess.run([sys.executable, "-m", "microstructure", "poll", "--data-dir", str(tmp_path / "data"),
                            "--symbols", "2", "--interval", "0.1", "--cycles", "2"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"error: cannot serve metrics on 127.0.0.1:{port}"), p.stderr[-2000:]
    assert not (tmp_path / "data" / "sim").exists()  # no market was made


@pytest.mark.integration
def test_the_poll_flow_serves_the_poll_metrics_only(tmp_path: Path) -> None:
    """The Prefect poll flow's ``metrics_port``: the endpoint carries the poll's families, not Prefect's own
    metrics (they live in prometheus_client's default registry, in the same process)."""
    import threading

    from microstructure.flows.pipeline import poll_flow
    from prefect.testing.utilities import prefect_test_harness

    port = _free_port()
    got: dict[str, Any] = {}
    with prefect_test_harness(server_startup_timeout=120):
        def run() -> None:
            try:
                got["stats"] = poll_flow(str(tmp_path / "data"), cycles=40, interval=0.1, symbols=3, session=False,
                                         metrics_port=port)
            except BaseException as e:  # re-raised below, in the test's thread
                got["error"] = e

        t = threading.Thread(target=run)
        t.start()
        try:
            end = time.monotonic() + 180
            fams: list[Any] = []
            while time.monotonic() < end and t.is_alive():
                try:
                    fams = _scrape(port)
                    if (_v(fams, "microstructure_cycle_seconds_count") or 0) >= 3:
                        break
                except (urllib.error.URLError, ConnectionError):
                    pass
                time.sleep(0.1)
        finally:
            t.join(timeout=300)
    assert "error" not in got, got.get("error")
    assert got["stats"]["cycles"] == 40
    assert (_v(fams, "microstructure_cycle_seconds_count") or 0) >= 3
    names = {f.name for f in fams}
    assert all(n.startswith("microstructure_") for n in names), names
