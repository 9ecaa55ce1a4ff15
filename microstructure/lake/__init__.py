"""The Parquet lake: hive-partitioned by date, written atomically, deduplicated on its key.

Layout under ``<data-dir>/lake/``::

    snapshots/date=YYYY-MM-DD/part-*.parquet     clean snapshots (book.SNAPSHOT_SCHEMA)
    quarantine/date=YYYY-MM-DD/part-*.parquet    rejected snapshots with a reason
    features/date=YYYY-MM-DD/features.parquet    published features (what Feast reads)
    features_quarantine/date=.../*.parquet       feature batches that failed their checks (+ .json reason)
    outcomes/date=YYYY-MM-DD/part-*.parquet      per cycle and symbol: source used, levels, latency, error

A file becomes visible only by ``rename`` of a fully written, fsynced temporary file, so a reader (or a
crash) never sees half a file. A snapshot is *acknowledged* once its file has been renamed into place.

Compaction replaces many files by one, which no rename makes atomic for a reader that lists a folder. So
each partition carries a generation number (``.gen``) and, while a compaction is under way or was cut
short by a crash, its plan (``.compacting/plan.json``: the merged file and the files it replaces). A
reader lists the files between two reads of the generation and drops the replaced files whenever the
merged one is in its list (:func:`partition_files`); if the generation moved, it lists again. Readers take
no lock and never wait for a compaction; a crashed compaction is finished by the next one. We measured
this against moving the lake to Delta Lake (docs/lake.md, "Why not Delta Lake?"): this costs two tiny reads
per partition.
"""
