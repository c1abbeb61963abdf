"""CDC behaviour against the real services: dead letters, a snapshot taken while rows change,
lost history (purged binlog, Mongo code 286), graceful stop, and real-mongod-only checks."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mysql.connector
import pymongo
import pytest

from cdc.config import CdcConfig
from cdc.pipeline import CdcPipeline
from cdc.source import HistoryLost
from qsfraud.stack import APP_USER, CDC_USER, DATABASE, MariaDBService, MongoService, Stack

MAPPING: dict[str, Any] = {
    "timezone": "UTC", "extras": ["version"], "static": {"currency": "EUR"},
    "fields": {"tx_id": "id", "customer_id": "customer_id", "payment_instrument": "card_hash",
               "amount": {"from": "amount", "type": "decimal"},
               "occurred_at": {"from": "created_at", "type": "datetime"},
               "device_id": {"from": "attrs", "type": "json", "path": "device"}},
}


def config(name: str, bootstrap: str, source: dict[str, Any], **kafka: Any) -> CdcConfig:
    fields = dict(MAPPING["fields"])
    if source["kind"] == "mongo":
        fields["tx_id"] = "_id"
    return CdcConfig.from_dict({
        "retailer": f"r{name}"[:60], "metrics_interval_s": 1,
        "source": {"id": f"src-{name}", **source},
        "kafka": {"bootstrap_servers": bootstrap, "offsets_topic": f"offsets-{name}",
                  "partitions": 2, **kafka},
        "mapping": {**MAPPING, "fields": fields},
    })


class Running:
    """A CdcPipeline in a thread of the test process."""

    def __init__(self, cfg: CdcConfig) -> None:
        self.pipeline = CdcPipeline(cfg, log=open("/dev/null", "w"))  # noqa: SIM115
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.pipeline.run()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.pipeline.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def running() -> Iterator[Any]:
    started: list[Running] = []

    def start(cfg: CdcConfig) -> Running:
        r = Running(cfg)
        started.append(r)
        return r

    yield start
    for r in started:
        if r.thread.is_alive():
            r.stop()


def mysql_table(mariadb: MariaDBService, name: str) -> Any:
    conn = mysql.connector.connect(host=mariadb.host, port=mariadb.port, user=APP_USER.user,
                                   password=APP_USER.password, database=DATABASE)
    conn.cursor().execute(
        f"CREATE TABLE {name} (id BIGINT PRIMARY KEY, customer_id VARCHAR(20), "
        "amount DECIMAL(12,2), created_at TIMESTAMP(6) NULL, card_hash VARCHAR(64), "
        "attrs JSON, version INT NOT NULL DEFAULT 1)")
    return conn


def mysql_source(mariadb: MariaDBService, table: str, **more: Any) -> dict[str, Any]:
    return {"kind": "mysql", "host": mariadb.host, "port": mariadb.port, "user": CDC_USER.user,
            "password": CDC_USER.password, "database": DATABASE, "table": table, **more}


def insert_rows(conn: Any, table: str, rows: list[tuple[Any, ...]]) -> None:
    conn.cursor().executemany(
        f"INSERT INTO {table} (id, customer_id, amount, created_at, card_hash, attrs) "
        "VALUES (%s, %s, %s, %s, %s, %s)", rows)
    conn.commit()


def good(i: int) -> tuple[Any, ...]:
    return (i, f"c{i % 7}", "10.00", datetime(2026, 1, 1), f"h{i}",
            json.dumps({"device": f"d{i}"}))


def test_mysql_bad_rows_go_to_the_dlq_and_the_source_goes_on(
    mariadb: MariaDBService, kafka_bootstrap: str, unique_name: str, running: Any,
    topic_reader: Any,
):
    conn = mysql_table(mariadb, unique_name)
    insert_rows(conn, unique_name, [good(1), (2, "c2", "-4.00", datetime(2026, 1, 1), "h2", None)])
    cfg = config(unique_name, kafka_bootstrap, mysql_source(mariadb, unique_name))
    out, dlq = topic_reader(kafka_bootstrap, cfg.topic), topic_reader(kafka_bootstrap,
                                                                      cfg.dlq_topic)
    r = running(cfg)
    assert dlq.wait_for(1, 60), r.error  # the snapshot is in: what follows is streamed
    insert_rows(conn, unique_name, [
        (3, "c3", "5.00", datetime(2026, 1, 1), "4111111111111111", None),  # a card number
        (4, "c4", None, datetime(2026, 1, 1), "h4", None),                  # no amount
        (5, "c5", "5.00", datetime(2026, 1, 1), "h5", '{"device": {"x": 1}}'),  # not a scalar
        good(6),
    ])
    assert out.wait_for(2, 60) and dlq.wait_for(4, 60), (out.records, dlq.records, r.error)
    r.stop()
    assert sorted(env["tx"]["tx_id"] for _, env, _ in out.records) == ["1", "6"]
    letters = {env["source"]["pk"]: env for _, env, _ in dlq.records}
    assert {pk: letters[pk]["field"] for pk in letters} == {
        "2": "amount", "3": "payment_instrument", "4": "amount", "5": "device_id"}
    assert "must be >= 0" in letters["2"]["error"] and letters["2"]["op"] == "r"
    assert letters["3"]["raw"]["after"]["card_hash"] == "4111111111111111"
    assert letters["3"]["raw"]["after"]["amount"] == "5.00"
    assert letters["4"]["source"]["position"]["file"].startswith("mysql-bin")
    assert letters["5"]["op"] == "c" and letters["5"]["committed_at"] > 0


def test_mongo_bad_documents_go_to_the_dlq(
    mongo_uri: str, kafka_bootstrap: str, unique_name: str, running: Any, topic_reader: Any,
):
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    coll = client["shop"][unique_name]
    doc = {"customer_id": "c1", "amount": "3.50", "created_at": datetime.now(UTC),
           "card_hash": "h", "version": 1}
    coll.insert_one({"_id": 1, **doc})
    cfg = config(unique_name, kafka_bootstrap,
                 {"kind": "mongo", "uri": mongo_uri, "database": "shop",
                  "collection": unique_name})
    out, dlq = topic_reader(kafka_bootstrap, cfg.topic), topic_reader(kafka_bootstrap,
                                                                      cfg.dlq_topic)
    r = running(cfg)
    assert out.wait_for(1, 60), r.error
    coll.insert_one({"_id": 2, **doc, "amount": {"$numberDecimal": "x"}})
    coll.insert_one({"_id": 3, **doc, "created_at": "last tuesday"})
    coll.insert_one({"_id": 4, **doc})
    coll.update_one({"_id": 4}, {"$set": {"customer_id": ["a", "list"]}})
    assert out.wait_for(2, 60) and dlq.wait_for(3, 60), (out.records, dlq.records, r.error)
    r.stop()
    assert [env["op"] for _, env, _ in out.records] == ["r", "c"]
    assert {env["source"]["pk"]: env["field"] for _, env, _ in dlq.records} == {
        "2": "amount", "3": "occurred_at", "4": "customer_id"}


def test_mongo_snapshot_while_rows_change_has_no_gap_and_no_overlap(
    mongo_uri: str, kafka_bootstrap: str, unique_name: str, running: Any, topic_reader: Any,
):
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    client["shop"].create_collection(unique_name, changeStreamPreAndPostImages={"enabled": True})
    coll = client["shop"][unique_name]
    n = 3000
    coll.insert_many([{"_id": i, "customer_id": f"c{i % 9}", "amount": 1, "card_hash": "h",
                       "created_at": datetime.now(UTC), "version": 1} for i in range(n)])
    cfg = config(unique_name, kafka_bootstrap,
                 {"kind": "mongo", "uri": mongo_uri, "database": "shop",
                  "collection": unique_name})
    out = topic_reader(kafka_bootstrap, cfg.topic)
    stop = threading.Event()
    updates: list[int] = []

    def churn() -> None:  # updates rows from the last one backwards while the snapshot runs
        i = n - 1
        while not stop.is_set() and i >= 0:
            coll.update_one({"_id": i}, {"$inc": {"version": 1}})
            updates.append(i)
            i -= 1

    writer = threading.Thread(target=churn, daemon=True)
    writer.start()
    r = running(cfg)
    assert out.wait_for(n, 60), r.error
    stop.set()
    writer.join(10)
    final = {d["_id"]: d["version"] for d in coll.find({}, {"version": 1})}

    def latest() -> dict[int, int]:
        return {int(env["source"]["pk"]): env["tx"]["extras"]["version"]
                for _, env, _ in list(out.records)}

    deadline = time.monotonic() + 60
    while latest() != final and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)
    r.stop()
    events: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for _, env, _ in out.records:
        events[int(env["source"]["pk"])].append((env["op"], env["tx"]["extras"]["version"]))
    assert set(events) == set(final)
    for pk, seq in events.items():
        versions = [v for _, v in seq]
        assert versions == list(range(versions[0], final[pk] + 1)), (pk, seq)
        assert seq[0][0] in ("r", "u") and all(op == "u" for op, _ in seq[1:]), (pk, seq)
    print(f"snapshot under churn: {len(updates)} updates, "
          f"{sum(1 for s in events.values() if s[0][0] == 'u')} rows resolved by the window")


def test_mysql_purged_binlog_fails_clearly_or_resnapshots(
    mariadb: MariaDBService, kafka_bootstrap: str, unique_name: str, running: Any,
    topic_reader: Any,
):
    conn = mysql_table(mariadb, unique_name)
    insert_rows(conn, unique_name, [good(1), good(2)])
    cfg = config(unique_name, kafka_bootstrap, mysql_source(mariadb, unique_name))
    out = topic_reader(kafka_bootstrap, cfg.topic)
    r = running(cfg)
    assert out.wait_for(2, 60), r.error
    r.stop()
    insert_rows(conn, unique_name, [good(3)])
    cur = conn.cursor()
    cur.execute("FLUSH BINARY LOGS")
    cur.execute("SHOW MASTER STATUS")
    current = cur.fetchone()[0]
    deadline = time.monotonic() + 20
    while True:  # MariaDB keeps a binlog until InnoDB's binlog checkpoint has moved past it
        cur.execute(f"PURGE BINARY LOGS TO '{current}'")
        cur.execute("SHOW BINARY LOGS")
        if [row[0] for row in cur.fetchall()] == [current]:
            break
        assert time.monotonic() < deadline, "the purge did not happen"
        time.sleep(0.5)

    r = running(cfg)
    r.thread.join(60)
    assert isinstance(r.error, HistoryLost), r.error
    assert "purged" in str(r.error) and "resnapshot" in str(r.error)

    cfg.source["on_history_lost"] = "resnapshot"
    r = running(cfg)
    assert out.wait_for(5, 60), r.error
    r.stop()
    assert [(env["op"], env["tx"]["tx_id"]) for _, env, _ in out.records][2:] == [
        ("r", "1"), ("r", "2"), ("r", "3")]


class SmallOplogMongo(MongoService):
    """The stack's MongoDB server with a tiny oplog, so that history is lost quickly."""

    name = "mongo_small_oplog"

    def command(self) -> list[str]:
        return [*super().command(), "--oplog-max-entries", "50"]


@pytest.fixture(scope="module")
def small_oplog_mongo(stack: Stack) -> Iterator[str]:
    """A second server of the same kind with ``--oplog-max-entries 50`` (module-scoped)."""
    from qsfraud.stack import free_port

    service = SmallOplogMongo(stack.config.root, stack.config.host, free_port())
    service.start()
    try:
        yield service.uri
    finally:
        service.stop()


def test_mongo_history_lost_fails_clearly_or_resnapshots(
    small_oplog_mongo: str, kafka_bootstrap: str, unique_name: str, running: Any,
    topic_reader: Any,
):
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(small_oplog_mongo)
    coll = client["shop"][unique_name]
    doc = {"customer_id": "c1", "amount": 1, "created_at": datetime.now(UTC), "card_hash": "h"}
    coll.insert_one({"_id": 0, **doc})
    cfg = config(unique_name, kafka_bootstrap,
                 {"kind": "mongo", "uri": small_oplog_mongo, "database": "shop",
                  "collection": unique_name})
    out = topic_reader(kafka_bootstrap, cfg.topic)
    r = running(cfg)
    assert out.wait_for(1, 60), r.error
    coll.insert_one({"_id": 1, **doc})
    assert out.wait_for(2, 60), r.error
    r.stop()
    other = client["shop"][f"{unique_name}_noise"]
    for start in range(0, 2500, 500):  # pruning runs every 1,000 writes
        other.insert_many([{"_id": start + i} for i in range(500)])
    coll.insert_one({"_id": 2, **doc})

    r = running(cfg)
    r.thread.join(60)
    assert isinstance(r.error, HistoryLost), r.error
    assert "oplog" in str(r.error) and "resnapshot" in str(r.error)

    cfg.source["on_history_lost"] = "resnapshot"
    r = running(cfg)
    assert out.wait_for(5, 60), (out.records, r.error)
    r.stop()
    assert sorted(env["tx"]["tx_id"] for _, env, _ in out.records[2:]) == ["0", "1", "2"]
    assert {env["op"] for _, env, _ in out.records[2:]} == {"r"}


def test_sigterm_commits_and_exits_zero(
    mariadb: MariaDBService, kafka_bootstrap: str, unique_name: str, tmp_path: Path,
    cdc_process: Any, topic_reader: Any, harness: Any,
):
    conn = mysql_table(mariadb, unique_name)
    insert_rows(conn, unique_name, [good(i) for i in range(1, 51)])
    cfg = config(unique_name, kafka_bootstrap, mysql_source(mariadb, unique_name))
    path = harness.write_config(tmp_path / "c.toml", cfg.raw)
    out = topic_reader(kafka_bootstrap, cfg.topic)
    proc = cdc_process(path)
    proc.start()
    assert out.wait_for(50, 60), proc.log_tail()
    insert_rows(conn, unique_name, [good(i) for i in range(51, 61)])
    assert out.wait_for(60, 60), proc.log_tail()
    assert proc.terminate() == 0, proc.log_tail()
    log = proc.log_tail()
    assert "SIGTERM" in log and '"event": "stop"' in log and '"events_per_s"' in log
    # the restarted process resumes after the last change: nothing new is written
    proc.start()
    time.sleep(4)
    assert proc.terminate() == 0
    assert len(out.records) == 60


def test_bad_config_is_one_clear_line(tmp_path: Path, cdc_process: Any):
    path = tmp_path / "bad.toml"
    path.write_text('retailer = "acme"\n[source]\nkind = "mysql"\nid = "x"\n[kafka]\n'
                    'bootstrap_servers = "h:1"\n[mapping.fields]\ntx_id = "id"\n')
    proc = cdc_process(path)
    proc.start()
    assert proc.wait(60) == 2
    assert proc.log_tail().strip().splitlines() == [
        "qsfraud cdc: mapping: no source for amount, customer_id, occurred_at, "
        "payment_instrument"]


def test_real_mongod_post_images_are_exact(real_mongod_uri: str, kafka_bootstrap: str,
                                           unique_name: str, running: Any, topic_reader: Any):
    """mongod (6.0+) with pre-images: every update carries exactly the version it wrote."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(real_mongod_uri)
    client["shop"].create_collection(unique_name, changeStreamPreAndPostImages={"enabled": True})
    coll = client["shop"][unique_name]
    doc = {"customer_id": "c1", "amount": 1, "created_at": datetime.now(UTC), "card_hash": "h"}
    cfg = config(unique_name, kafka_bootstrap,
                 {"kind": "mongo", "uri": real_mongod_uri, "database": "shop",
                  "collection": unique_name})
    out = topic_reader(kafka_bootstrap, cfg.topic)
    r = running(cfg)
    time.sleep(3)
    coll.insert_one({"_id": 1, **doc, "version": 1})
    for _ in range(5):
        coll.update_one({"_id": 1}, {"$inc": {"version": 1}})
    coll.delete_one({"_id": 1})
    assert out.wait_for(7, 60), r.error
    r.stop()
    seq = [(env["op"], (env["tx"] or env["before"])["extras"]["version"])
           for _, env, _ in out.records]
    assert seq == [("c", 1), *[("u", v) for v in range(2, 7)], ("d", 6)]


def test_the_next_kafka_transaction_waits_commit_gap_ms_and_nothing_is_lost_or_repeated(
    mariadb: MariaDBService, kafka_bootstrap: str, unique_name: str, running: Any,
    topic_reader: Any,
):
    conn = mysql_table(mariadb, unique_name)
    cfg = config(unique_name, kafka_bootstrap, mysql_source(mariadb, unique_name),
                 commit_gap_ms=300)
    out = topic_reader(kafka_bootstrap, cfg.topic)
    commits: list[float] = []
    r = running(cfg)
    r.pipeline.on_commit = lambda position: commits.append(time.monotonic())
    deadline = time.monotonic() + 60
    while not commits and time.monotonic() < deadline:  # the (empty) snapshot's checkpoint
        time.sleep(0.02)
    for i in range(1, 61):  # one row per source transaction, ~50 per second
        insert_rows(conn, unique_name, [good(i)])
        time.sleep(0.02)
    assert out.wait_for(60, 60), (len(out.records), r.error)
    r.stop()
    streamed = commits[1:]
    gaps = [b - a for a, b in itertools.pairwise(streamed)]
    assert gaps and min(gaps) >= 0.29, gaps  # each waited for the gap, then committed a batch
    assert len(streamed) <= 10, len(streamed)  # ~1.2 s of changes in 300 ms steps
    assert sorted(int(env["tx"]["tx_id"]) for _, env, _ in out.records) == list(range(1, 61))
