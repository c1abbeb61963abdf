"""Each real service of the local stack, talked to over TCP by the client the project uses."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import mysql.connector
import pymongo
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.row_event import WriteRowsEvent

from qsfraud.stack import APP_USER, CDC_USER, DATABASE, KafkaService, MariaDBService


def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        future.result(timeout=30)


def consume(bootstrap: str, topic: str, group: str, n: int, timeout: float = 60) -> list[Any]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                out.append(msg)
        if out:
            consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return out


def test_kafka_produce_consume_with_committed_offsets(kafka_bootstrap: str, unique_name: str):
    create_topic(kafka_bootstrap, unique_name, partitions=3)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for i in range(100):
        producer.produce(unique_name, key=f"k{i % 7}", value=f"v{i}")
    assert producer.flush(30) == 0

    group = f"g-{unique_name}"
    first = consume(kafka_bootstrap, unique_name, group, 100)
    assert sorted(m.value().decode() for m in first) == sorted(f"v{i}" for i in range(100))

    # The group's committed offsets cover everything: a new member of the group sees nothing old.
    producer.produce(unique_name, key="k0", value="after")
    producer.flush(30)
    second = consume(kafka_bootstrap, unique_name, group, 1)
    assert [m.value() for m in second] == [b"after"]

    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    committed = probe.committed([TopicPartition(unique_name, p) for p in range(3)], timeout=10)
    probe.close()
    assert sum(tp.offset for tp in committed) == 101


FAUST_APP = textwrap.dedent(
    """
    import os
    import faust

    app = faust.App(
        "qsfraud-smoke-" + os.environ["SMOKE_ID"],
        broker="kafka://" + os.environ["BOOTSTRAP"],
        datadir=os.environ["DATADIR"],
        web_enabled=False,
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        topic_partitions=1,
    )
    source = app.topic(os.environ["IN_TOPIC"], value_serializer="raw")
    sink = app.topic(os.environ["OUT_TOPIC"], value_serializer="raw")

    @app.agent(source)
    async def upper(stream):
        async for value in stream:
            await sink.send(value=value.upper())

    if __name__ == "__main__":
        app.main()
    """
)


def test_faust_agent_consumes_one_topic_and_writes_another(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
):
    source, sink = f"{unique_name}_in", f"{unique_name}_out"
    create_topic(kafka_bootstrap, source)
    create_topic(kafka_bootstrap, sink)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(10):
        producer.produce(source, value=f"event-{i}")
    producer.flush(30)

    app_file = tmp_path / "smoke_app.py"
    app_file.write_text(FAUST_APP)
    env = {**os.environ, "SMOKE_ID": uuid.uuid4().hex[:8], "BOOTSTRAP": kafka_bootstrap,
           "DATADIR": str(tmp_path / "faust"), "IN_TOPIC": source, "OUT_TOPIC": sink}
    started = time.monotonic()
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, str(app_file), "worker", "-l", "info",
                               "--without-web"],
                              env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        out = consume(kafka_bootstrap, sink, f"g-{unique_name}", 10, timeout=90)
        ready_s = time.monotonic() - started
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()
    assert out, (tmp_path / "worker.log").read_text()[-3000:]
    assert sorted(m.value() for m in out) == sorted(f"EVENT-{i}".encode() for i in range(10))
    print(f"faust worker start to first output: {ready_s:.1f} s")


def test_mariadb_insert_is_seen_as_binlog_write_rows(mariadb: MariaDBService, unique_name: str):
    conn = mysql.connector.connect(host=mariadb.host, port=mariadb.port, user=APP_USER.user,
                                   password=APP_USER.password, database=DATABASE)
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {unique_name} (id INT PRIMARY KEY, amount DECIMAL(10,2), "
                "note VARCHAR(40))")
    cur.execute("SHOW MASTER STATUS")
    log_file, log_pos = cur.fetchone()[:2]  # type: ignore[index]
    cur.execute(f"INSERT INTO {unique_name} VALUES (1, 12.50, 'hello')")
    conn.commit()
    conn.close()

    stream = BinLogStreamReader(
        connection_settings={"host": mariadb.host, "port": mariadb.port,
                             "user": CDC_USER.user, "passwd": CDC_USER.password},
        server_id=4242, blocking=False, resume_stream=True, log_file=log_file, log_pos=log_pos,
        only_events=[WriteRowsEvent], only_tables=[unique_name], is_mariadb=False,
    )
    try:
        rows = [row["values"] for event in stream for row in event.rows]
    finally:
        stream.close()
    assert len(rows) == 1
    assert rows[0]["id"] == 1 and str(rows[0]["amount"]) == "12.50" and rows[0]["note"] == "hello"


def test_mongo_watch_resumes_from_saved_token(mongo_uri: str, unique_name: str):
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    coll = client["shop"][unique_name]
    coll.insert_one({"_id": "seed"})
    seen: list[str] = []
    with coll.watch(full_document="updateLookup") as changes:
        coll.insert_one({"_id": "a", "amount": 1})
        coll.insert_one({"_id": "b", "amount": 2})
        for change in changes:
            seen.append(change["documentKey"]["_id"])
            if len(seen) == 1:
                token = changes.resume_token
                break
    client.close()

    writer: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    writer["shop"][unique_name].insert_many([{"_id": "c"}, {"_id": "d"}])
    writer.close()

    resumed: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    with resumed["shop"][unique_name].watch(resume_after=token) as changes:
        for change in changes:
            seen.append(change["documentKey"]["_id"])
            if len(seen) == 4:
                break
    resumed.close()
    assert seen == ["a", "b", "c", "d"]


def test_services_listen_on_loopback(kafka: KafkaService, mariadb: MariaDBService):
    assert kafka.host == mariadb.host == "127.0.0.1"


def test_kafka_warm_up_writes_and_reads_transactions_then_leaves_no_topic(
        kafka_bootstrap: str) -> None:
    from qsfraud.stack.kafka import WARM_UP_TOPIC, warm_up

    assert warm_up(kafka_bootstrap, seconds=1.0) >= 100
    ready = threading.Event()
    threading.Timer(1.5, ready.set).start()
    started = time.monotonic()
    assert warm_up(kafka_bootstrap, seconds=0.2, until=ready) >= 100  # on until it is set
    assert time.monotonic() - started >= 1.5
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    deadline = time.monotonic() + 30  # a deleted topic leaves the metadata a moment later
    while WARM_UP_TOPIC in admin.list_topics(timeout=10).topics:
        assert time.monotonic() < deadline, f"{WARM_UP_TOPIC} still there"
        time.sleep(0.2)
