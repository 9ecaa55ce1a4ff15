-- features: one row per (symbol, event_ts) order-book snapshot, the single definition of every feature.
-- Key: (symbol, event_ts). Input: a relation named `snapshots` (book.SNAPSHOT_SCHEMA) holding each
-- (symbol, event_ts, source) once, as the lake does. The offline build runs
-- this over a date of the lake (plus the HALT_WINDOW + GAP_WINDOW before it); the online path runs
-- it over the trailing window buffer of the cycle just polled. Same text, same numbers.
--
-- This file is also the features' declaration (microstructure/contract/catalogue.py reads it): every output column
-- carries, on the line that names it, `-- <entity|timestamp|feature>: [unit=..] [range=..] [not_null] | text`,
-- and every INTERVAL carries `-- window: <NAME>`. The Arrow schema, the Feast fields, the range checks and the
-- docs' feature table are derived from it: a new feature is one annotated line here.
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
    symbol,  -- entity: | The instrument's ticker as the source spells it (AAPL, BTC/USD, MEGA01)
    event_ts,  -- feature: | The source's time of the book (UTC)
    -- Feast keeps a timestamp feature online to the whole second; this integer carries the book's time exactly, so
    -- the age every online read reports is exact (microstructure.store.lookup).
    epoch_us(event_ts)
        AS event_ts_us,  -- feature: unit=µs range=[0,) not_null | event_ts in µs since 1970 UTC: the book's exact time online
    received_ts,  -- timestamp: | When the book reached us (UTC); Feast's event time
    source,  -- feature: | The source that served the book (two at the same instant: the first received)
    book_levels,  -- feature: unit=levels | Levels the source really gave, deeper side (1 = L1 only)
    halted,  -- feature: | The source says trading is halted (null: it cannot tell)
    locked,  -- feature: | Best bid equals best ask
    best_bid,  -- feature: unit=USD/share range=(0,) | Level-1 bid price
    best_ask,  -- feature: unit=USD/share range=(0,) | Level-1 ask price
    bid_size,  -- feature: unit=shares | Size at the best bid
    ask_size,  -- feature: unit=shares | Size at the best ask
    mid,  -- feature: unit=USD/share range=(0,) | (best_bid + best_ask) / 2
    (best_ask - best_bid) / mid * 10000
        AS spread_bps,  -- feature: unit=bps range=[0,) not_null | (best_ask - best_bid) / mid * 10000
    bid_depth,  -- feature: unit=shares range=[0,) | Size on the top 5 bid levels
    ask_depth,  -- feature: unit=shares range=[0,) | Size on the top 5 ask levels
    CASE WHEN bid_size + ask_size > 0 THEN (bid_size - ask_size) / (bid_size + ask_size) ELSE 0 END
        AS order_imbalance,  -- feature: range=[-1,1] not_null | (bid_size - ask_size) / (bid_size + ask_size), or 0
    CASE WHEN bid_depth + ask_depth > 0 THEN (bid_depth - ask_depth) / (bid_depth + ask_depth) ELSE 0 END
        AS depth_imbalance,  -- feature: range=[-1,1] | (bid_depth - ask_depth) / (bid_depth + ask_depth), or 0
    bid_depth_dollars,  -- feature: unit=USD | Price x size summed over the top 5 bid levels
    ask_depth_dollars,  -- feature: unit=USD | Price x size summed over the top 5 ask levels
    bid_depth_dollars + ask_depth_dollars
        AS depth_dollars,  -- feature: unit=USD range=[0,) | Top-5 notional, both sides
    -- Size-weighted mid: leans toward the side with the thinner queue (where the price is likelier to go); the mid
    -- when both queues are empty. The imbalances are 0 then.
    CASE WHEN bid_size + ask_size > 0 THEN (best_bid * ask_size + best_ask * bid_size) / (bid_size + ask_size)
         ELSE mid END
        AS microprice,  -- feature: unit=USD/share | (best_bid*ask_size + best_ask*bid_size) / (bid_size + ask_size), or mid
    (max(mid) OVER w_gap - min(mid) OVER w_gap) / min(mid) OVER w_gap
        AS gap_pct,  -- feature: unit=fraction range=[0,) | (max mid - min mid) / min mid over the trailing {GAP_WINDOW}
    -- The latest halted book so far is a running max (keys are unique per symbol and time), cheaper than a
    -- HALT_WINDOW frame.
    coalesce(max(CASE WHEN halted THEN event_ts END) OVER w_all
             >= event_ts - INTERVAL 30 MINUTES, false)  -- window: HALT_WINDOW
        AS has_recent_halt  -- feature: not_null | A book flagged halted (true, not null) in the trailing {HALT_WINDOW}
FROM book
WINDOW
    w_gap AS (PARTITION BY symbol ORDER BY event_ts
              RANGE BETWEEN INTERVAL 5 MINUTES PRECEDING AND CURRENT ROW),  -- window: GAP_WINDOW
    w_all AS (PARTITION BY symbol ORDER BY event_ts ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
