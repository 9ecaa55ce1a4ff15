"""Data Docs render offline and name the batch they validated (real GE build, real files)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pyarrow as pa
import pytest

from microstructure.checks.datadocs import _rewrite, remote_references
from microstructure.checks.ge import Checker
from microstructure.contract.book import table_from_quotes, validate
from tests.conftest import T0, book


def _local_refs(html: str) -> list[str]:
    return [r for r in re.findall(r'<(?:script|link)\b[^>]*?(?:src|href)="([^"#]+)"', html) if "://" not in r]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    checker = Checker(tmp_path_factory.mktemp("gx"))
    good = validate(table_from_quotes([book("A", event_ts=T0 + dt.timedelta(seconds=i)) for i in range(3)])).clean
    stale = validate(table_from_quotes([book("S", event_ts=T0, received_ts=T0 + dt.timedelta(minutes=20))])).clean
    assert checker.check("snapshots", good.to_pandas(), batch="snapshots 2026-03-02").success
    assert not checker.check("snapshots", pa.concat_tables([good, stale]).to_pandas(),
                             batch="snapshots 2026-03-03").success
    assert checker.docs_index() is not None
    return checker.site()


def test_every_page_renders_from_local_files_only(site):
    pages = [p for p in site.rglob("*.html") if "offline" not in p.parts]
    assert len(pages) >= 4  # index, the suite, two validations
    for page in pages:
        html = page.read_text()
        assert remote_references(html) == [], page.name
        refs = _local_refs(html)
        assert any("bootstrap.min.css" in r for r in refs), page.name
        for ref in refs:
            assert (page.parent / ref).resolve().is_file(), f"{page.name}: {ref}"
    # The fonts the icon stylesheet points at are there too.
    assert (site / "static" / "offline" / "webfonts" / "fa-solid-900.woff2").is_file()


def test_each_validation_names_its_dataset_and_date(site):
    pages = sorted(site.glob("validations/**/*.html"))
    headers = [re.search(r"Data asset:\s*</span>\s*([^<]+)<", p.read_text()) or
               re.search(r"Data asset:\s*([^<]+)<", p.read_text()) for p in pages]
    names = sorted(h.group(1).strip() for h in headers if h)
    assert names == ["snapshots 2026-03-02", "snapshots 2026-03-03"]
    index = (site / "index.html").read_text()
    assert "snapshots 2026-03-03" in index and "None" not in re.sub(r"<script.*?</script>", "", index, flags=re.S)


def test_rewrite_points_cdn_tags_at_the_bundle_and_drops_integrity():
    html = ('<script src="https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js" '
            'integrity="sha384-x" crossorigin="anonymous"></script>'
            '<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/'
            'bootstrap-prefers-dark.css" />'
            "<style>.logo{background: url('https://example.com/logo.png') 0 0}</style>")
    out = _rewrite(html, "../../")
    assert out == ('<script src="../../static/offline/js/bootstrap.min.js"></script>'
                   "<style>.logo{background: none 0 0}</style>")
    assert remote_references(out) == []
