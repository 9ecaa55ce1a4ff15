"""MkDocs hook: the feature table of ``docs/features.md``, generated from the declaration in features.sql.

``mkdocs.yml`` lists this file under ``hooks:``. The page holds :data:`MARKER` where the table goes; the table
lists every output column of ``transforms/features.sql`` as ``microstructure.contract.schemas.DECLARATION`` reads it
(its type from the zero-row run, unit, range and description from the column's annotation). A features page
without the marker (or with it twice), or the marker on another page, fails the build.
"""

from __future__ import annotations

import re
from typing import Any

from mkdocs.exceptions import PluginError

MARKER = "<!-- feature-table (generated from transforms/features.sql by docs/hooks/feature_table.py) -->"
PAGE = "features.md"
ROLE_NOTE = {"entity": " (Feast entity)", "timestamp": " (Feast timestamp)", "feature": ""}


def _md(text: str) -> str:
    """Plain text as Markdown text: characters Markdown would read as markup are escaped."""
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", text)


def table() -> str:
    import pyarrow as pa

    from microstructure.contract.schemas import DECLARATION

    rows = ["| column | type | unit | checked | description |", "|---|---|---|---|---|"]
    for c in DECLARATION.columns:
        # As checks.suites derives them: the declared range, else "finite" for a float feature; not null.
        checked = []
        if c.role == "feature" and (c.range or pa.types.is_floating(c.type)):
            checked.append(str(c.range) if c.range else "finite")
        if c.not_null:
            checked.append("not null")
        rows.append(f"| `{c.name}`{ROLE_NOTE[c.role]} | {_md(str(c.type))} | {_md(c.unit or '')} | "
                    f"{', '.join(checked)} | {_md(c.description)} |")
    return "\n".join(rows)


def render(markdown: str) -> str:
    """``markdown`` (the features page) with its marker replaced by the table."""
    n = markdown.count(MARKER)
    if n != 1:
        raise PluginError(f"docs/{PAGE} must hold the feature-table marker exactly once, found {n}: {MARKER}")
    return markdown.replace(MARKER, table())


def on_page_markdown(markdown: str, *, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri == PAGE:
        return render(markdown)
    if MARKER in markdown:
        raise PluginError(f"the feature-table marker belongs in docs/{PAGE}, not docs/{page.file.src_uri}")
    return markdown
