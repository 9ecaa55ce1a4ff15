-- views: the lake as three relations for ad-hoc analysis; any DuckDB client can load this file.
--   duckdb -cmd "SET VARIABLE lake = 'data/lake'" -init transforms/views.sql
-- snapshots:  one row per accepted order-book snapshot; key (symbol, event_ts, source).
-- features:   one row per published feature row; key (symbol, event_ts).
-- quarantine: one row per rejected snapshot, with its reason.
CREATE OR REPLACE VIEW snapshots AS
SELECT * FROM read_parquet(getvariable('lake') || '/snapshots/*/*.parquet', hive_partitioning = true, union_by_name = true);

CREATE OR REPLACE VIEW features AS
SELECT * FROM read_parquet(getvariable('lake') || '/features/*/*.parquet', hive_partitioning = true, union_by_name = true);

CREATE OR REPLACE VIEW quarantine AS
SELECT * FROM read_parquet(getvariable('lake') || '/quarantine/*/*.parquet', hive_partitioning = true, union_by_name = true);

-- outcomes: one row per symbol per poll cycle: the source that served it (or NULL) and why not.
CREATE OR REPLACE VIEW outcomes AS
SELECT * FROM read_parquet(getvariable('lake') || '/outcomes/*/*.parquet', hive_partitioning = true, union_by_name = true);
