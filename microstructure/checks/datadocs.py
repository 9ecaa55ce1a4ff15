"""Data Docs that render offline and name what they validated.

GE's Data Docs templates load bootstrap, jQuery, vega and Font Awesome from public CDNs: on an offline desk the
pages come up unstyled, with the validation list (a bootstrap-table) empty. GE has no setting for local assets,
so after each docs build we copy the same releases (bundled in ``datadocs_static/``, see its README) next to the
site and point every page at them. Hand-written because no library does this; it is a URL map, nothing more.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

STATIC = Path(__file__).with_name("datadocs_static")
VENDOR_DIR = "static/offline"  # under the site root

# CDN address (as GE's templates write it) -> bundled file. ``None``: dropped (optional theme, remote logo).
ASSETS: dict[str, str | None] = {
    "https://cdn.jsdelivr.net/npm/vega@5": "js/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "js/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "js/vega-embed.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": "css/all.min.css",
    "https://code.jquery.com/jquery-3.7.1.min.js": "js/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "js/popper.min.js",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "js/bootstrap.min.js",
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "css/bootstrap.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "js/bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "css/bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "js/bootstrap-table-filter-control.min.js",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "css/bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "css/bootstrap-table-filter-control.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "js/bootstrap-datepicker.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "css/bootstrap-datepicker.min.css",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css": None,
}
_TAG = re.compile(r'<(script|link)\b[^>]*?(?:src|href)="(https?://[^"]+)"[^>]*>(?:\s*</script>)?', re.I)
_REMOTE_IMG = re.compile(r'<img\b[^>]*src="https?://[^"]*"[^>]*>', re.I)
_REMOTE_CSS_URL = re.compile(r"url\(\s*['\"]?(https?://[^)'\"]+)['\"]?\s*\)", re.I)  # GE's navbar logo


def remote_references(html: str) -> list[str]:
    """Addresses a page would fetch from the network to render (scripts, styles, images)."""
    refs = [m.group(2) for m in _TAG.finditer(html)]
    refs += re.findall(r'<img\b[^>]*src="(https?://[^"]*)"', html, re.I)
    refs += [m.group(1) for m in _REMOTE_CSS_URL.finditer(html)]
    return refs


def _rewrite(html: str, prefix: str) -> str:
    def local(m: re.Match[str]) -> str:
        url = m.group(2)
        if url not in ASSETS:
            return m.group(0)  # unknown: left alone, and the offline test will name it
        target = ASSETS[url]
        if target is None:
            return ""
        tag = m.group(0)
        # Subresource-integrity hashes are for the CDN copies; the bundled files are the same releases but the
        # browser must not refuse a local copy over a hash/crossorigin mismatch.
        tag = re.sub(r'\s(?:integrity|crossorigin)="[^"]*"', "", tag)
        return tag.replace(url, f"{prefix}{VENDOR_DIR}/{target}")

    html = _TAG.sub(local, html)
    # GE's validation pages point one folder too high for the favicon; point every page at the site's copy.
    html = re.sub(r'href="(?:\.\./)*static/images/favicon\.ico"', f'href="{prefix}static/images/favicon.ico"', html)
    html = _REMOTE_IMG.sub("", html)
    return _REMOTE_CSS_URL.sub("none", html)


def make_offline(site: Path) -> int:
    """Bundle the assets under ``site`` and rewrite every page to use them. Returns pages rewritten."""
    if not site.is_dir():
        return 0
    vendor = site / VENDOR_DIR
    shutil.copytree(STATIC, vendor, dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md"))
    n = 0
    for page in site.rglob("*.html"):
        if vendor in page.parents:
            continue
        html = page.read_text(encoding="utf-8")
        depth = len(page.relative_to(site).parts) - 1
        new = _rewrite(html, "../" * depth)
        if new != html:
            tmp = page.with_suffix(".html.tmp")
            tmp.write_text(new, encoding="utf-8")
            os.replace(tmp, page)
            n += 1
    return n
