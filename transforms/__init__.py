"""The DuckDB SQL of our derived relations, one file each: every feature and its declaration (``features.sql``),
the entry model's base inputs (``base_features.sql``) and the lake's views (``views.sql``).

Installed as the package ``microstructure.transforms`` so a wheel carries the SQL beside the code.
"""
