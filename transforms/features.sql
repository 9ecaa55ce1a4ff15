-- features: one row per (symbol, event_ts) order-book snapshot, the single definition of every feature.
-- Key: (symbol, event_ts). Input: a relation named `snapshots` (book.SNAPSHOT_SCHEMA) holding each
-- (symbol, event_ts, source) once, as the lake does. The offline build runs
-- this over a date of the lake (plus the 35 minutes before it, HALT_WINDOW + GAP_WINDOW); the online path runs
-- it over the trailing window buffer of the cycle just polled. Same text, same numbers.
--
-- Depth is "top 5 levels" of what the source gave: an L1 source (book_levels = 1) yields top-of-book depth
-- only, which `book_levels` makes visible rather than hiding.
WITH dup_keys AS (
    -- Two sources may serve the same instant of the same symbol: keep the first we received (ties: by source).
    -- Ranked only where a key repeats: sorting every row with its 40 level columns cost more than the features.
    SELECT symbol, event_ts FROM snapshots GROUP BY symbol, event_ts HAVING count(*) > 1
),
losers AS (
    SELECT symbol, event_ts, received_ts, source
    FROM snapshots SEMI JOIN dup_keys USING (symbol, event_ts)
    QUALIFY row_number() OVER (PARTITION BY symbol, event_ts ORDER BY received_ts, source) > 1
),
ranked AS (
    SELECT * FROM snapshots ANTI JOIN losers USING (symbol, event_ts, received_ts, source)
),
book AS (
    SELECT
        symbol, event_ts, received_ts, source, book_levels, halted, locked,
        bid_px_1 AS best_bid,
        ask_px_1 AS best_ask,
        bid_sz_1 AS bid_size,
        ask_sz_1 AS ask_size,
        (bid_px_1 + ask_px_1) / 2 AS mid,
        coalesce(bid_sz_1, 0) + coalesce(bid_sz_2, 0) + coalesce(bid_sz_3, 0)
            + coalesce(bid_sz_4, 0) + coalesce(bid_sz_5, 0) AS bid_depth,
        coalesce(ask_sz_1, 0) + coalesce(ask_sz_2, 0) + coalesce(ask_sz_3, 0)
            + coalesce(ask_sz_4, 0) + coalesce(ask_sz_5, 0) AS ask_depth,
        coalesce(bid_px_1 * bid_sz_1, 0) + coalesce(bid_px_2 * bid_sz_2, 0) + coalesce(bid_px_3 * bid_sz_3, 0)
            + coalesce(bid_px_4 * bid_sz_4, 0) + coalesce(bid_px_5 * bid_sz_5, 0) AS bid_depth_dollars,
        coalesce(ask_px_1 * ask_sz_1, 0) + coalesce(ask_px_2 * ask_sz_2, 0) + coalesce(ask_px_3 * ask_sz_3, 0)
            + coalesce(ask_px_4 * ask_sz_4, 0) + coalesce(ask_px_5 * ask_sz_5, 0) AS ask_depth_dollars
    FROM ranked
)
SELECT
    symbol,
    event_ts,
    received_ts,
    source,
    book_levels,
    halted,
    locked,
    best_bid,
    best_ask,
    bid_size,
    ask_size,
    mid,
    (best_ask - best_bid) / mid * 10000 AS spread_bps,
    bid_depth,
    ask_depth,
    -- Queue imbalance at the top of the book; 0 when both queues are empty.
    CASE WHEN bid_size + ask_size > 0 THEN (bid_size - ask_size) / (bid_size + ask_size) ELSE 0 END
        AS order_imbalance,
    CASE WHEN bid_depth + ask_depth > 0 THEN (bid_depth - ask_depth) / (bid_depth + ask_depth) ELSE 0 END
        AS depth_imbalance,
    bid_depth_dollars,
    ask_depth_dollars,
    bid_depth_dollars + ask_depth_dollars AS depth_dollars,
    -- Size-weighted mid: leans toward the side with the thinner queue (where the price is likelier to go).
    CASE WHEN bid_size + ask_size > 0 THEN (best_bid * ask_size + best_ask * bid_size) / (bid_size + ask_size)
         ELSE mid END AS microprice,
    -- Range of the mid over the trailing 5 minutes (this snapshot included), relative to its low.
    (max(mid) OVER w5 - min(mid) OVER w5) / min(mid) OVER w5 AS gap_pct,
    -- Any snapshot flagged halted in the trailing 30 minutes (unknown counts as not halted): the latest halted
    -- book so far is a running max (keys are unique per symbol and time), cheaper than a 30-minute frame.
    coalesce(max(CASE WHEN halted THEN event_ts END) OVER w_all >= event_ts - INTERVAL 30 MINUTES, false)
        AS has_recent_halt
FROM book
WINDOW
    w5 AS (PARTITION BY symbol ORDER BY event_ts RANGE BETWEEN INTERVAL 5 MINUTES PRECEDING AND CURRENT ROW),
    w_all AS (PARTITION BY symbol ORDER BY event_ts ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
