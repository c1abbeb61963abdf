"""qsfraud CDC: committed database changes into Kafka, exactly once, resumable.

Sources: :class:`cdc.mysql_source.MySQLBinlogSource` (ROW binlog of MySQL 8 / MariaDB, via
``mysql-replication``) and :class:`cdc.mongo_source.MongoChangeStreamSource` (change streams,
``full_document="updateLookup"``, pre-images when the collection has them). Each first takes a
consistent snapshot (``snapshot = "initial" | "never" | "when_needed"``), then streams from the
position of that snapshot: no gap, no overlap. Run one with ``qsfraud cdc run --config FILE``
(samples in ``examples/cdc/``).

Kafka output (see :mod:`cdc.envelope`), on topic ``<retailer>.transactions``, key = the
canonical ``customer_id`` (configurable), so one customer's changes stay in order; value::

    {"v": 1,                       # envelope version
     "op": "c",                    # r = snapshot read, c = create, u = update, d = delete
     "tx": {...},                  # fraud.schema.Transaction.to_dict() after the change; null for d
     "before": {...} | null,       # canonical row before (u: when known; d: always when known)
     "source": {"connector": "mysql" | "mongo", "id": "<source id>", "db": "shop",
                "table": "orders", "pk": "42", "snapshot": false,
                "position": {"file": "mysql-bin.000003", "pos": 1234, "gtid": "0-1-77"}
                            | {"resume_token": {"_data": "..."}} | {"start_at": [secs, inc]}},
     "committed_at": 1767225600.0, # source commit time, epoch seconds (MySQL: see cdc.mysql_source)
     "produced_at": 1767225600.08} # when CDC wrote it, epoch seconds

A delete is followed by a tombstone (same key, null value) when the topic is compacted
(``kafka.tombstones = "auto"``), or always/never. Rows that cannot be mapped go to
``<retailer>.transactions.dlq`` as ``{"v", "error", "field", "op", "raw": {"before",
"after"}, "source", "committed_at", "failed_at"}``.

Exactly once: records, dead letters and the source position (compacted topic
``qsfraud.cdc.offsets``, key = source id) are written in one Kafka transaction, committed at a
source-transaction boundary, by a producer whose ``transactional.id`` is
``qsfraud-cdc-<source id>``. Consumers must read with ``isolation.level=read_committed``.
"""
