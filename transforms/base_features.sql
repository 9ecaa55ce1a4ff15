-- base_features: the entry model's inputs beyond the served features, from the mid series. One row per row of
-- `features` that has a row of its symbol at least 60 s before it. Key: (symbol, event_ts).
-- Input: a relation named `features` (the published feature rows of features.sql, or any subset of them, such as
-- the last minutes of a few symbols). Point in time: a row sees only rows at or before its own event_ts.
-- Run by microstructure/features/model_inputs.py (`evaluate` trains on it, `picks --score` scores with it).
WITH r AS (
    -- One-step log return of the mid, in bps.
    SELECT symbol, event_ts, received_ts, mid,
           ln(mid / lag(mid) OVER (PARTITION BY symbol ORDER BY event_ts)) * 1e4 AS r1
    FROM features
),
w AS (
    SELECT *, stddev_samp(r1) OVER (PARTITION BY symbol ORDER BY event_ts
                                    RANGE BETWEEN INTERVAL 300 SECOND PRECEDING AND CURRENT ROW) AS vol_5m_bps
    FROM r
)
SELECT w.symbol, w.event_ts, w.received_ts, w.mid,
       w.vol_5m_bps,  -- volatility of the one-step returns over the trailing 5 minutes, bps
       ln(w.mid / p.mid) * 1e4 AS ret_60s_bps  -- log return of the mid since the last row 60 s or more before, bps
FROM w ASOF JOIN features p ON p.symbol = w.symbol AND p.event_ts <= w.event_ts - INTERVAL 60 SECOND
