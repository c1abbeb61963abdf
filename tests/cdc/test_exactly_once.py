"""Nothing lost, nothing doubled: SIGKILL the CDC process three times while a writer works.

Per source: 2,000 rows exist before the first start (they arrive through the snapshot), then
8,000 more inserts, 1,000 updates (each bumps a ``version`` column) and 100 deletes are
committed while ``qsfraud cdc run`` is killed with SIGKILL at three random moments and restarted.
A read_committed consumer must then see every change exactly once, in commit order per key.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import mysql.connector
import pymongo
from bson.decimal128 import Decimal128

from qsfraud.stack import APP_USER, CDC_USER, DATABASE, MariaDBService

PRE_ROWS = 2_000
INSERTS = 8_000
UPDATES = 1_000
DELETES = 100
CUSTOMERS = 50

MAPPING = {
    "timezone": "UTC",
    "extras": ["version"],
    "static": {"currency": "EUR"},
    "fields": {
        "tx_id": "id", "customer_id": "customer_id", "payment_instrument": "card_hash",
        "amount": {"from": "amount", "type": "decimal"},
        "occurred_at": {"from": "created_at", "type": "datetime"},
    },
}


class Writer(Protocol):
    def insert(self, ids: list[int]) -> None: ...
    def update(self, ids: list[int]) -> None: ...
    def delete(self, ids: list[int]) -> None: ...


class MySQLWriter:
    def __init__(self, mariadb: MariaDBService, table: str) -> None:
        self.table = table
        self.conn = mysql.connector.connect(host=mariadb.host, port=mariadb.port,
                                            user=APP_USER.user, password=APP_USER.password,
                                            database=DATABASE)
        cur = self.conn.cursor()
        cur.execute(f"CREATE TABLE {table} (id BIGINT PRIMARY KEY, customer_id VARCHAR(20), "
                    "amount DECIMAL(12,2), created_at DATETIME(6), card_hash VARCHAR(64), "
                    "version INT NOT NULL)")
        self.conn.commit()

    def insert(self, ids: list[int]) -> None:
        now = datetime.now(UTC).replace(tzinfo=None)
        self.conn.cursor().executemany(
            f"INSERT INTO {self.table} VALUES (%s, %s, %s, %s, %s, 1)",
            [(i, f"c{i % CUSTOMERS}", Decimal(i % 997) + Decimal("0.25"), now, f"h{i}")
             for i in ids])
        self.conn.commit()

    def update(self, ids: list[int]) -> None:
        cur = self.conn.cursor()
        for i in ids:
            cur.execute(f"UPDATE {self.table} SET version = version + 1, amount = amount + 1 "
                        "WHERE id = %s", (i,))
        self.conn.commit()

    def delete(self, ids: list[int]) -> None:
        cur = self.conn.cursor()
        for i in ids:
            cur.execute(f"DELETE FROM {self.table} WHERE id = %s", (i,))
        self.conn.commit()


class MongoWriter:
    def __init__(self, uri: str, collection: str) -> None:
        self.client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri)
        db = self.client["shop"]
        db.create_collection(collection, changeStreamPreAndPostImages={"enabled": True})
        self.coll = db[collection]

    def insert(self, ids: list[int]) -> None:
        now = datetime.now(UTC)
        self.coll.insert_many([
            {"_id": i, "customer_id": f"c{i % CUSTOMERS}",
             "amount": Decimal128(str(Decimal(i % 997) + Decimal("0.25"))), "created_at": now,
             "card_hash": f"h{i}", "version": 1} for i in ids])

    def update(self, ids: list[int]) -> None:
        for i in ids:
            self.coll.update_one({"_id": i}, {"$inc": {"version": 1}, "$set": {"touched": True}})

    def delete(self, ids: list[int]) -> None:
        for i in ids:
            self.coll.delete_one({"_id": i})


def plan(rng: random.Random) -> list[tuple[str, list[int]]]:
    """The writer's steps after the first start: insert batches, updates, deletes, mixed."""
    steps: list[tuple[str, list[int]]] = []
    next_id = PRE_ROWS + 1
    live = list(range(1, PRE_ROWS + 1))
    updates_left, deletes_left = UPDATES, DELETES
    while next_id <= PRE_ROWS + INSERTS or updates_left or deletes_left:
        if next_id <= PRE_ROWS + INSERTS:
            batch = list(range(next_id, min(next_id + 200, PRE_ROWS + INSERTS + 1)))
            next_id += len(batch)
            live.extend(batch)
            steps.append(("insert", batch))
        if updates_left:
            n = min(25, updates_left)
            # the same row may be updated several times in one transaction
            steps.append(("update", [rng.choice(live) for _ in range(n)]))
            updates_left -= n
        if deletes_left and rng.random() < 0.3:
            n = min(5, deletes_left)
            gone = rng.sample(live, n)
            for g in gone:
                live.remove(g)
            steps.append(("delete", gone))
            deletes_left -= n
    return steps


def check_exactly_once(records: list[tuple[str | None, dict[str, Any] | None, int]],
                       expected: dict[int, list[tuple[str, int]]]) -> None:
    """Every expected (op, version) per row exactly once and in order; nothing else."""
    seen: dict[int, list[tuple[str, int]]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for key, env, partition in records:
        assert env is not None, "no tombstones expected on a non-compacted topic"
        row = env["before"] if env["op"] == "d" else env["tx"]
        assert key == row["customer_id"]
        partitions[key].add(partition)
        seen[int(env["source"]["pk"])].append((env["op"], int(row["extras"]["version"])))
    assert all(len(p) == 1 for p in partitions.values()), "one customer, one partition"
    missing = {pk: ev for pk, ev in expected.items() if seen.get(pk) != ev}
    extra = set(seen) - set(expected)
    if missing or extra:
        sample = [(pk, expected[pk], seen.get(pk)) for pk in list(missing)[:5]]
        raise AssertionError(f"{len(missing)} rows differ, {len(extra)} unexpected: {sample}")


def expected_events(steps: list[tuple[str, list[int]]]) -> dict[int, list[tuple[str, int]]]:
    events: dict[int, list[tuple[str, int]]] = {i: [("r", 1)] for i in range(1, PRE_ROWS + 1)}
    version: dict[int, int] = dict.fromkeys(range(1, PRE_ROWS + 1), 1)
    for op, ids in steps:
        for i in ids:
            if op == "insert":
                version[i] = 1
                events[i] = [("c", 1)]
            elif op == "update":
                version[i] += 1
                events[i].append(("u", version[i]))
            else:
                events[i].append(("d", version[i]))
    return events


def run_kill_test(kind: str, writer: Writer, source: dict[str, Any], mapping: dict[str, Any],
                  name: str, kafka_bootstrap: str, tmp_path: Path, cdc_process: Any,
                  topic_reader: Any, harness: Any) -> None:
    rng = random.Random(hash(name) & 0xFFFF)
    retailer = f"r{name}"[:60]
    topic = f"{retailer}.transactions"
    harness.create_topics(kafka_bootstrap, (topic, 3))
    config = harness.write_config(tmp_path / f"{kind}.toml", {
        "retailer": retailer, "source": {"kind": kind, "id": f"src-{name}", **source},
        "kafka": {"bootstrap_servers": kafka_bootstrap, "partitions": 3,
                  "offsets_topic": f"offsets-{name}", "commit_interval_ms": 50},
        "mapping": mapping,
    })
    writer.insert(list(range(1, PRE_ROWS + 1)))
    reader = topic_reader(kafka_bootstrap, topic)
    proc = cdc_process(config)
    proc.start()
    assert reader.wait_for(PRE_ROWS, 90), f"snapshot not seen:\n{proc.log_tail()}"

    steps = plan(rng)
    progress = [0]
    done = threading.Event()

    def write() -> None:
        try:
            for i, (op, ids) in enumerate(steps):
                getattr(writer, op)(ids)
                progress[0] = i + 1
                time.sleep(0.03)
        finally:
            done.set()

    thread = threading.Thread(target=write, daemon=True)
    t0 = time.monotonic()
    thread.start()
    kill_at = sorted(rng.uniform(0.1, 0.9) for _ in range(3))
    seen_at_restart = len(reader.records)
    for fraction in kill_at:
        while progress[0] < fraction * len(steps) and not done.is_set():
            time.sleep(0.005)
        # kill a process that is working: it has written something since it (re)started
        reader.wait_for(seen_at_restart + 1, 30)
        time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        time.sleep(rng.uniform(0, 0.5))
        seen_at_restart = len(reader.records)
        proc.start()
    thread.join(300)
    assert done.is_set()
    write_s = time.monotonic() - t0
    expected = expected_events(steps)
    total = sum(len(v) for v in expected.values())
    reader.wait_for(total, 120)
    time.sleep(2.0)  # anything doubled would show up now
    assert proc.terminate() == 0, proc.log_tail()
    print(f"{kind}: {total} changes, writer {write_s:.1f} s, kills at {kill_at}, "
          f"restarts {proc.starts - 1}")
    assert len(reader.records) == total, (len(reader.records), total, proc.log_tail())
    check_exactly_once(reader.records, expected)


def test_mysql_exactly_once_across_three_sigkills(
    mariadb: MariaDBService, kafka_bootstrap: str, unique_name: str, tmp_path: Path,
    cdc_process: Any, topic_reader: Any, harness: Any,
):
    writer = MySQLWriter(mariadb, unique_name)
    source = {"host": mariadb.host, "port": mariadb.port, "user": CDC_USER.user,
              "password": CDC_USER.password, "database": DATABASE, "table": unique_name}
    run_kill_test("mysql", writer, source, MAPPING, unique_name, kafka_bootstrap, tmp_path,
                  cdc_process, topic_reader, harness)


def test_mongo_exactly_once_across_three_sigkills(
    mongo_uri: str, kafka_bootstrap: str, unique_name: str, tmp_path: Path,
    cdc_process: Any, topic_reader: Any, harness: Any,
):
    writer = MongoWriter(mongo_uri, unique_name)
    source = {"uri": mongo_uri, "database": "shop", "collection": unique_name}
    mapping = {**MAPPING, "fields": {**MAPPING["fields"], "tx_id": "_id"}}
    run_kill_test("mongo", writer, source, mapping, unique_name, kafka_bootstrap, tmp_path,
                  cdc_process, topic_reader, harness)
