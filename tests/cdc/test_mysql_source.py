"""The binlog source hands on another table's transactions only now and then, and the last
position when the stream goes quiet; its commit times are finer than the binlog's seconds."""

from __future__ import annotations

import threading
import time

import mysql.connector

from cdc.mysql_source import MySQLBinlogSource
from cdc.source import Position, SourceTransaction
from qsfraud.stack import APP_USER, CDC_USER, DATABASE, MariaDBService


def test_other_tables_transactions_move_the_position_without_a_transaction_each(
        mariadb: MariaDBService, unique_name: str) -> None:
    ours, theirs = unique_name, f"{unique_name}_other"
    conn = mysql.connector.connect(host=mariadb.host, port=mariadb.port, user=APP_USER.user,
                                   password=APP_USER.password, database=DATABASE,
                                   autocommit=True)
    cur = conn.cursor()
    for table in (ours, theirs):
        cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY)")
    source = MySQLBinlogSource(ours, host=mariadb.host, port=mariadb.port, user=CDC_USER.user,
                               password=CDC_USER.password, database=DATABASE, table=ours,
                               heartbeat_s=0.2)
    start = source.current_position()
    cur.execute(f"INSERT INTO {ours} VALUES (1)")
    for i in range(60):  # each its own transaction (autocommit)
        cur.execute(f"INSERT INTO {theirs} VALUES ({i})")
    cur.execute(f"INSERT INTO {ours} VALUES (2)")
    for i in range(60, 100):
        cur.execute(f"INSERT INTO {theirs} VALUES ({i})")
    conn.close()
    end = source.current_position()
    seen: list[SourceTransaction] = []
    ready: list[bool] = []

    def at_end(position: Position) -> bool:
        return (position["file"], position["pos"]) == (end["file"], end["pos"])

    def read() -> None:
        for tx in source.run(start):
            seen.append(tx)
            ready.append(source.ready())
            if at_end(tx.position):
                source.stop()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not (seen and at_end(seen[-1].position)) and time.monotonic() < deadline:
        time.sleep(0.05)
    source.stop()
    reader.join(10)
    assert [c.after for tx in seen for c in tx.changes] == [{"id": 1}, {"id": 2}]
    assert seen and at_end(seen[-1].position)  # handed on once the stream was quiet
    empty = [tx for tx in seen if not tx.changes]
    # 100 transactions of the other table: the first after each of ours (it tells the
    # reader to send what it holds), one a second while they stream in, and the last one at
    # the quiet stream's heartbeat
    assert seen[0].changes and not seen[1].changes
    assert 3 <= len(empty) <= 6, [tx.position for tx in empty]
    # ready() while the written binlog streamed in, not once it was all read
    assert ready[0] and not ready[-1], ready


def test_commit_time_is_not_before_the_commit_nor_after_the_read(
        mariadb: MariaDBService, unique_name: str) -> None:
    conn = mysql.connector.connect(host=mariadb.host, port=mariadb.port, user=APP_USER.user,
                                   password=APP_USER.password, database=DATABASE,
                                   autocommit=True)
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {unique_name} (id INT PRIMARY KEY)")
    source = MySQLBinlogSource(unique_name, host=mariadb.host, port=mariadb.port,
                               user=CDC_USER.user, password=CDC_USER.password,
                               database=DATABASE, table=unique_name, heartbeat_s=0.2)
    start = source.current_position()
    commits: list[tuple[float, float]] = []
    for i in range(5):  # the bare binlog second is before the commit almost always
        before = time.time()
        cur.execute(f"INSERT INTO {unique_name} VALUES ({i})")
        commits.append((before, time.time()))
        time.sleep(0.13)
    conn.close()
    seen: list[tuple[float, float]] = []  # (committed_at, read by then)

    def read() -> None:
        for tx in source.run(start):
            seen.extend((c.committed_at, time.time()) for c in tx.changes)
            if len(seen) == len(commits):
                source.stop()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    source.stop()
    assert len(seen) == len(commits)
    for (before, _), (committed, read_by) in zip(commits, seen, strict=True):
        assert before <= committed <= read_by
