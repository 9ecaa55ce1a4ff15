"""The DuckDB SQL that defines every feature (``features.sql``) and the lake's views (``views.sql``).

Installed as the package ``microstructure.transforms`` so a wheel carries the SQL beside the code.
"""
