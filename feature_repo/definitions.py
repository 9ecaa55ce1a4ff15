"""The catalogue of what we serve: the symbol entity, the order-book feature view and its consumers.

The offline source is the published features in the lake (``lake/features/date=*/``), written by the
``build_features`` flow from ``transforms/features.sql``. Every poll cycle pushes the same SQL's output for
the fresh snapshots through ``order_book_push``, so the online store is as fresh as the last cycle.

The timestamp Feast joins on is ``received_ts`` (when the snapshot reached us), not the vendor's
``event_ts``: a training row at time T only sees books we actually had in hand at T.
"""

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.data_format import ParquetFormat
from feast.on_demand_feature_view import on_demand_feature_view
from feast.type_map import pa_to_feast_value_type
from feast.types import Bool, Float64, from_value_type

from microstructure.contract.catalogue import FRESHNESS_S
from microstructure.contract.schemas import DECLARATION, ENTITY, EVENT_TIMESTAMP, ML_FEATURES

# The data dir: $MICROSTRUCTURE_DATA_DIR, else the checkout's ./data beside this folder (where the Feast CLI,
# run from feature_repo/, finds the registry and online store of feature_store.yaml).
DATA_DIR = Path(os.environ.get("MICROSTRUCTURE_DATA_DIR") or Path(__file__).resolve().parents[1] / "data").resolve()

symbol = Entity(
    name="symbol",
    join_keys=[ENTITY],
    value_type=ValueType.STRING,
    description="A traded instrument's ticker as the source spells it (AAPL, BTC/USD, MEGA01).",
)

# The same Parquet files, read by the offline store the configuration picks: DuckDB (the default, our ASOF store)
# or Spark (MICROSTRUCTURE_OFFLINE_STORE=spark), whose store reads only Spark sources.
_FEATURES_GLOB = str(DATA_DIR / "lake" / "features" / "*" / "*.parquet")
_SOURCE_DOC = "Published feature rows, one per (symbol, event_ts); see transforms/features.sql."
if os.environ.get("MICROSTRUCTURE_OFFLINE_STORE", "").strip().lower() == "spark":
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

    order_book_source = SparkSource(
        name="order_book_features_source", path=_FEATURES_GLOB, file_format="parquet",
        timestamp_field=EVENT_TIMESTAMP, created_timestamp_column="event_ts", description=_SOURCE_DOC)
else:
    order_book_source = FileSource(
        name="order_book_features_source",
        path=_FEATURES_GLOB,
        file_format=ParquetFormat(),
        timestamp_field=EVENT_TIMESTAMP,
        # Two books received in the same instant: the newer one (by the source's time) wins, in every store.
        created_timestamp_column="event_ts",
        description=_SOURCE_DOC,
    )

order_book_push = PushSource(name="order_book_push", batch_source=order_book_source)

order_book = FeatureView(
    name="order_book",
    entities=[symbol],
    # Offline: a training row sees no book older than this. Online reads ignore TTL (feast#6821);
    # microstructure.store reports the age of every online row and flags stale ones itself.
    ttl=timedelta(minutes=5),
    # Every served column of features.sql, as declared there (type from the SQL, description from its annotation):
    # a feature added to the SQL is served without an edit here.
    schema=[Field(name=c.name, dtype=from_value_type(pa_to_feast_value_type(str(c.type))), description=c.description)
            for c in DECLARATION.features],
    online=True,
    source=order_book_push,
    description="Order-book features per symbol, fresh every poll cycle.",
)

# What a scoring model reads. Feast answers with features by name (a map), not by position: clients read
# them by name; ML_FEATURES (order_imbalance, bid_depth, ask_depth, spread_bps, depth_imbalance) is the
# documented model order, and microstructure.trading.scoring.ml_features returns them in it.
scoring = FeatureService(name="scoring", features=[order_book[ML_FEATURES]],
                         description="The five microstructure features for ML scoring; read them by name.")
order_book_all = FeatureService(name="order_book_all", features=[order_book],
                                description="Every order-book feature, for the service and filters.")


@on_demand_feature_view(
    sources=[order_book[["event_ts", "event_ts_us"]]],
    # No field descriptions: Feast matches these against the fields it infers from a trial call.
    schema=[Field(name="age_s", dtype=Float64), Field(name="stale", dtype=Bool)],
    mode="pandas",
    description="How old each online book is when it is read (age_s: seconds since its event_ts, to the microsecond "
                "from event_ts_us; stale: no book or older than "
                f"{FRESHNESS_S:g} s). Feast ignores TTL online (feast#6821), so every `feast serve` "
                "client gets the age and the stale flag from Feast itself.",
)
def freshness(inputs):  # type: ignore[no-untyped-def]
    # Imports inside: Feast rebuilds this function from its source text alone (feast.transformation.udf_rehydrate),
    # without this module's globals.
    import numbers

    import pandas as pd

    from microstructure.contract.book import AHEAD, EARLIEST
    from microstructure.contract.catalogue import FRESHNESS_S

    # The book's time from event_ts_us (exact); Feast keeps event_ts online to the whole second, so it serves only
    # for a row written before event_ts_us existed (that age errs old by up to 1 s). Two times that disagree (a
    # hand-pushed row), an event_ts_us that is not a whole number of µs (bool, string, out of range) or one without
    # an event_ts, and a book time the online read calls impossible, give no age: stale, as
    # microstructure.store.lookup reports such rows bad. (Feast hands a column with nulls to this view as float64:
    # a whole float is read, NaN is null and falls back to event_ts, which only errs old.)
    col = next(c for c in inputs.columns if c.endswith("event_ts"))
    us_col = next(c for c in inputs.columns if c.endswith("event_ts_us"))
    floor = pd.to_datetime(inputs[col], utc=True, errors="coerce")
    raw = inputs[us_col].astype(object)
    null = raw.isna()
    whole = raw.map(lambda v: (isinstance(v, numbers.Integral) and not isinstance(v, bool))
                    or (isinstance(v, float) and v.is_integer()))
    exact = pd.to_datetime(pd.to_numeric(raw.where(whole), errors="coerce"), unit="us", utc=True, errors="coerce")
    off = exact - floor
    agree = exact.notna() & floor.notna() & (off >= pd.Timedelta(0)) & (off < pd.Timedelta(seconds=1))
    now = pd.Timestamp.now(tz="UTC")
    ts = exact.where(agree, floor.where(null))
    ts = ts.where((ts >= EARLIEST) & (ts <= now + AHEAD))
    age = (now - ts).dt.total_seconds()
    return pd.DataFrame({"age_s": age.astype("float64"), "stale": (age.isna() | (age > FRESHNESS_S)).astype(bool)})


# For online clients (`feast serve`): every feature plus its age and stale flag, computed when read.
order_book_live = FeatureService(name="order_book_live", features=[order_book, freshness],
                                 description="Every order-book feature with its age and stale flag (online).")
