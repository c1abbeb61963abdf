"""Helpers for the streams tests: a worker subprocess, producing and collecting records."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from pqc.keys import KeyStore, init_keystore
from qsfraud.worker_process import WorkerProcess


def transaction(i: int, retailer: str, customer: str | None = None, **extra: Any) -> dict:
    """A valid bare transaction; ``i`` makes the id and varies the fields."""
    return {
        "tx_id": f"tx-{i}",
        "retailer_id": retailer,
        "amount": round(5 + (i * 37) % 400 + (i % 7) / 10, 2),
        "customer_id": customer or f"c{i % 300}",
        "payment_instrument": f"pi{i % 350}",
        "device_id": f"d{i % 280}",
        "ip": f"10.0.{i % 250}.{i % 7}",
        "occurred_at": 1767225600.0 + i,
        **extra,
    }


def producer(bootstrap: str) -> Producer:
    # murmur2: the partitioner of faust/aiokafka and of the Java clients (and of qsfraud's CDC)
    return Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random",
                     "linger.ms": 5, "enable.idempotence": True})


def produce_transactions(bootstrap: str, retailer: str, txs: list[dict]) -> None:
    p = producer(bootstrap)
    for tx in txs:
        while True:
            try:
                p.produce(f"{retailer}.transactions", key=tx["customer_id"],
                          value=json.dumps(tx).encode())
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(30) == 0


def collect(
    bootstrap: str, topic: str, done: Callable[[list[Any]], bool], timeout: float = 120.0,
) -> list[Any]:
    """Messages of ``topic`` from the start (read_committed) until ``done(messages)``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{time.time_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "isolation.level": "read_committed"})
    consumer.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while not done(out) and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.2):
                if msg.error() is None:
                    out.append(msg)
    finally:
        consumer.close()
    return out


def decisions_by_tx(messages: list[Any]) -> dict[str, list[bytes]]:
    by_tx: dict[str, list[bytes]] = {}
    for msg in messages:
        by_tx.setdefault(json.loads(msg.value())["tx_id"], []).append(msg.value())
    return by_tx


@pytest.fixture
def worker_factory(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def make(retailer: str, *extra: str) -> WorkerProcess:
        w = WorkerProcess(kafka_bootstrap, retailer, tmp_path, "--checkpoint-interval", "1",
                          *extra)
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.stop()


@pytest.fixture
def admin(tmp_path: Path) -> KeyStore:
    """An admin key store; its registry (which trusts the admin) is what workers trust."""
    return init_keystore(tmp_path / "admin-keys", "admin-1", "admin")


def group_positions(bootstrap: str, group: str, topic: str) -> dict[int, tuple[int | None, int]]:
    """``{partition: (committed offset or None, high watermark)}`` of ``group`` on ``topic``:
    what a failing test shows of where a consumer group stands."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        committed = consumer.committed(tps, timeout=10)
        return {tp.partition: (tp.offset if tp.offset >= 0 else None,
                               consumer.get_watermark_offsets(tp, timeout=10)[1])
                for tp in committed}
    finally:
        consumer.close()


class Kit:
    """The helpers above, handed to tests as a fixture (test modules do not import conftest)."""

    transaction = staticmethod(transaction)
    producer = staticmethod(producer)
    produce_transactions = staticmethod(produce_transactions)
    collect = staticmethod(collect)
    decisions_by_tx = staticmethod(decisions_by_tx)
    group_positions = staticmethod(group_positions)


@pytest.fixture
def kit() -> type[Kit]:
    return Kit
