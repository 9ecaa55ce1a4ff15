"""Spark for the batch path: the same ``transforms/features.sql`` over the same lake, on a Spark session.

The SQL is written for DuckDB and transpiled to Spark SQL by ``sqlglot`` (the feature definitions stay in one
file); ``tests/test_spark.py`` proves the features identical to DuckDB's on the test lake. The session is
``local[2]`` unless ``MICROSTRUCTURE_SPARK_MASTER`` says otherwise (``spark://host:7077``, ``yarn``,
``k8s://...``); ``MICROSTRUCTURE_SPARK_CONF`` adds ``key=value`` pairs separated by commas. Session time zone
is UTC: every timestamp in the lake is UTC.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from typing import Any

import pyarrow as pa

MASTER_ENV = "MICROSTRUCTURE_SPARK_MASTER"
CONF_ENV = "MICROSTRUCTURE_SPARK_CONF"

BASE_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.enabled": "false",
    "spark.sql.shuffle.partitions": "8",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    # A day's features come back to the driver to be checked and published (~0.3 GB for 150 symbols at 2 s):
    # the 1 GB defaults lose the result ("TaskResultLost") from ~1.75M rows a day.
    "spark.driver.memory": "4g",
    "spark.driver.maxResultSize": "0",
}


def spark_conf() -> dict[str, str]:
    conf = dict(BASE_CONF)
    conf["spark.master"] = os.environ.get(MASTER_ENV) or "local[2]"
    for pair in filter(None, (p.strip() for p in os.environ.get(CONF_ENV, "").split(","))):
        key, _, value = pair.partition("=")
        conf[key.strip()] = value.strip()
    return conf


@functools.cache
def session() -> Any:
    """The process's Spark session (started once; ~5-10 s on first use)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError as e:  # the spark extra is optional
        from microstructure.contract.inputs import InputError

        raise InputError("Spark is not installed: pip install --require-hashes -r requirements-spark.lock "
                         "(needs Java 17+)") from e
    builder = SparkSession.builder.appName("microstructure")
    for k, v in spark_conf().items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


@functools.cache
def features_sql() -> str:
    """``features.sql`` in Spark's dialect."""
    import sqlglot
    from sqlglot import exp

    from microstructure.contract.schemas import sql

    def epoch_us(node: exp.Expression) -> exp.Expression:
        # sqlglot reads DuckDB's epoch_us as an unknown function (it would reach Spark as EPOCH_US, which Spark
        # lacks); it is Spark's unix_micros, the same integer.
        if isinstance(node, exp.Anonymous) and node.name.upper() == "EPOCH_US" and len(node.expressions) == 1:
            return exp.UnixMicros(this=node.expressions[0])
        return node

    return sqlglot.parse_one(sql("features"), read="duckdb").transform(epoch_us).sql("spark")


def compute_features(files: list[str], start: dt.datetime, end: dt.datetime) -> pa.Table:
    """Features of the snapshots in ``files`` with ``start <= event_ts < end`` (the caller widens ``start``
    by the windows' reach and trims the result), as an Arrow table of ``FEATURES_SCHEMA``."""
    from pyspark.sql import functions as F

    from microstructure.contract.schemas import FEATURES_SCHEMA

    spark = session()
    snaps = spark.read.parquet(*files).where((F.col("event_ts") >= F.lit(start)) & (F.col("event_ts") < F.lit(end)))
    if "date" in snaps.columns:
        snaps = snaps.drop("date")
    snaps.createOrReplaceTempView("snapshots")
    out = spark.sql(features_sql()).orderBy("symbol", "event_ts").toArrow()
    return out.select(FEATURES_SCHEMA.names).cast(FEATURES_SCHEMA)
