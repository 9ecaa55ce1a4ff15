-- views: the lake as four relations for ad-hoc analysis; any DuckDB client (1.1 or later) can load this file.
--   duckdb -init transforms/views.sql                       (from the repo root: the lake is data/lake)
--   duckdb -cmd "SET VARIABLE lake = '/srv/data/lake'" -cmd ".read transforms/views.sql"
-- (`-init` runs before `-cmd`: to set `lake`, read this file with a second `-cmd`.)
-- Every dataset holds `_schema/empty.parquet`, a zero-row file with its schema, so a view exists, empty and
-- typed, before its first row is written. `date` is the partition's date (UTC), computed from the row.
-- snapshots:  one row per accepted order-book snapshot; key (symbol, event_ts, source).
-- features:   one row per published feature row; key (symbol, event_ts).
-- quarantine: one row per rejected snapshot, with its reason.
-- outcomes:   one row per symbol per poll cycle: the source that served it (or NULL) and why not.
CREATE OR REPLACE VIEW snapshots AS
SELECT *, CAST(timezone('UTC', event_ts) AS DATE) AS date
FROM read_parquet(coalesce(getvariable('lake'), 'data/lake') || '/snapshots/*/*.parquet', union_by_name = true);

CREATE OR REPLACE VIEW features AS
SELECT *, CAST(timezone('UTC', event_ts) AS DATE) AS date
FROM read_parquet(coalesce(getvariable('lake'), 'data/lake') || '/features/*/*.parquet', union_by_name = true);

CREATE OR REPLACE VIEW quarantine AS
SELECT *, CAST(timezone('UTC', coalesce(event_ts, received_ts)) AS DATE) AS date
FROM read_parquet(coalesce(getvariable('lake'), 'data/lake') || '/quarantine/*/*.parquet', union_by_name = true);

CREATE OR REPLACE VIEW outcomes AS
SELECT *, CAST(timezone('UTC', cycle_ts) AS DATE) AS date
FROM read_parquet(coalesce(getvariable('lake'), 'data/lake') || '/outcomes/*/*.parquet', union_by_name = true);
