"""Helpers for the streams tests: a worker subprocess, producing and collecting records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from pqc.keys import KeyStore, init_keystore
from qsfraud.stack import free_port

ROOT = Path(__file__).resolve().parents[2]


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


class WorkerProcess:
    """``python -m qsfraud worker`` as a subprocess, with its log file and metrics port."""

    def __init__(self, bootstrap: str, retailer: str, tmp: Path, *extra: str) -> None:
        self.bootstrap = bootstrap
        self.retailer = retailer
        self.tmp = tmp
        self.extra = list(extra)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.tmp / f"worker-{self.retailer}-{self.starts}.log"

    def start(self, wait: bool = True) -> WorkerProcess:
        self.starts += 1
        self.port = free_port()
        cmd = [sys.executable, "-m", "qsfraud", "worker", "--retailer", self.retailer,
               "--bootstrap", self.bootstrap, "--web-port", str(self.port),
               "--datadir", str(self.tmp / "data"), "--checkpoint-interval", "1",
               *self.extra]
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        if wait:
            self.wait_ready()
        return self

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until the worker has its partitions (the lag gauge appears)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited:\n{self.log_tail()}")
            try:
                if f'topic="{self.retailer}.transactions"' in self.metrics():
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"worker not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


@pytest.fixture
def worker_factory(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def make(retailer: str, *extra: str) -> WorkerProcess:
        w = WorkerProcess(kafka_bootstrap, retailer, tmp_path, *extra)
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.stop()


@pytest.fixture
def admin(tmp_path: Path) -> KeyStore:
    """An admin key store; its registry (which trusts the admin) is what workers trust."""
    return init_keystore(tmp_path / "admin-keys", "admin-1", "admin")


class Kit:
    """The helpers above, handed to tests as a fixture (test modules do not import conftest)."""

    transaction = staticmethod(transaction)
    producer = staticmethod(producer)
    produce_transactions = staticmethod(produce_transactions)
    collect = staticmethod(collect)
    decisions_by_tx = staticmethod(decisions_by_tx)


@pytest.fixture
def kit() -> type[Kit]:
    return Kit
