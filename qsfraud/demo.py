"""The end-to-end demo: three retailers' databases -> CDC -> Kafka -> workers -> decisions,
federated learning through the aggregator, and the analysts' UI.

* ``acme``: a Walmart-like chain on MariaDB (database ``shop``, binlog CDC);
* ``globex``: a Flipkart-like marketplace on a MongoDB server (change-stream CDC);
* ``initech``: a second MariaDB shop, its own database ``initech`` on the same server.

Generated purchases (``fraud.generator``, with its cross-retailer stolen-card campaign) are
committed into each retailer's own database at ``--rate`` per retailer; labels (analyst
verdicts within hours, chargebacks weeks later, in replayed time) follow on ``<R>.labels``.
Key stores for the three retailers, the aggregator and an admin are made at start; the
aggregator runs; workers join federated learning when ``qsfraud worker`` has the FL flags.

The demo runs on a stack of its own (free ports, under ``.qsfraud/demo/``, wiped at start) so
that each run starts from empty topics, tables and models, and it stops everything it started.
At the end it writes ``audit.json`` there: every written transaction's decisions, and what the
FL topics carried.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import heapq
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import orjson

from fraud.generator import GeneratorConfig, generate
from fraud.metrics import average_precision
from fraud.schema import Label
from fraud.topics import (
    CONFIG,
    CONFIG_REJECTED,
    FL_GLOBAL,
    FL_UPDATES,
    RetailerTopics,
)
from qsfraud.stack import APP_USER, CDC_USER, DATABASE, Stack, StackConfig, free_port
from qsfraud.stack.kafka import warm_up
from qsfraud.stack.service import port_is_free
from qsfraud.worker_process import worker_metrics, worker_ready
from streams.garbage import collect_youngest_generation_only

ORDERS = "orders"
INSERT_ORDER = f"INSERT INTO {ORDERS} VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
ATTACK = "card_cross_retailer"
FLAGGED = ("verify", "hold", "block")
ACTIONS = ("allow", *FLAGGED)
FL_FLAGS = ("--fl-identity", "--fl-aggregator", "--fl-trust")
# Shares of --duration: the faults come in its first 40 % (the broker's restart takes ~20 s
# on a loaded machine), so that federated rounds complete again before the writes end; the
# hostile inputs come between the first two kills, long before the broker's restart, so that
# a role they made exit would be seen as such (restarts before it are the SIGKILLed roles').
FAULT_PLAN = ((0.1, "kill -9", "cdc-acme"), (0.2, "kill -9", "worker-globex"),
              (0.3, "kill -9", "aggregator"), (0.4, "restart", "kafka"))
HOSTILE_AT = 0.15
HOPS = ("encoded", "produced", "visible", "received", "decided")
# of transactional writes and reads before the first purchase, and on while the workers start:
# the full JIT compiles the hot paths after tens of thousands of calls
WARM_UP_S = 5.0
MODEL_COMPILE = "model-compile"
FULL_COLLECTION_S = 3600.0


class DemoError(Exception):
    """A role of the demo failed; the message says which and shows its log's tail."""


@dataclass(frozen=True)
class DemoSettings:
    root: Path = Path(".qsfraud/demo")
    rate: float = 100.0  # purchases committed per second, per retailer
    duration: float = 0.0  # seconds; 0 runs until Ctrl-C
    days: int = 365  # at 100 tx/s per retailer (500 a day) a generated year lasts 30 minutes
    # per retailer per generated day: at 100 tx/s a day replays in 5 s, so analyst verdicts
    # (hours) come within seconds and chargebacks (5-45 days) within minutes
    tx_per_day: int = 500
    seed: int = 7
    report_every: float = 5.0
    # the UI (`qsfraud ui`) on this port, or a free one if taken or 0; None: no UI
    ui_port: int | None = 8501
    fl_interval_s: float = 10.0  # fl.sync_interval_s in the signed config the demo publishes
    drain_s: float = 30.0  # after the last write, how long to wait for the last decisions
    headless: bool = False
    # kill -9 acme's CDC, globex's worker and the aggregator once each and restart the broker
    # once, spread over --duration; every role that exits is then started again
    faults: bool = False
    # malformed rows in every database, garbage and oversized records on the retailers'
    # topics, unsigned and untrusted config, 15 % into --duration
    hostile: bool = False
    # of each retailer's topics: the demo runs one worker a retailer, and on 2 cores every
    # partition costs the broker (each CDC transaction and each worker batch writes to all
    # of them): 4 took the demo at 200/s per retailer from 150 to 184 % of the two cores
    partitions: int = 1


def worker_fl_flags() -> bool:
    """Whether ``qsfraud worker`` takes the federated-learning key flags (``--help`` lists
    them): the demo passes them only then."""
    from qsfraud.commands import worker

    sub = argparse.ArgumentParser().add_subparsers()
    worker.register(sub)
    help_text = sub.choices["worker"].format_help()
    return all(flag in help_text for flag in FL_FLAGS)


class OrdersDatabase(ABC):
    """A retailer's own order store, which the demo writes to and CDC reads from."""

    @abstractmethod
    def reset(self) -> None: ...

    @abstractmethod
    def insert(self, rows: list[dict[str, Any]]) -> None:
        """Commit each of ``rows`` (generator rows: purchases) as its own database
        transaction, as a shop's checkouts do; returns when the last one is committed."""

    @abstractmethod
    def ids(self) -> set[str]:
        """The ids of every order in the store (the written transactions)."""

    @abstractmethod
    def insert_hostile(self, prefix: str) -> dict[str, str]:
        """Commit rows no transaction can be made of; ``{id: what is wrong}``."""

    @abstractmethod
    def cdc_config(self, retailer: str, bootstrap: str, partitions: int) -> str:
        """The ``qsfraud cdc run`` TOML for this database."""

    @abstractmethod
    def describe(self) -> str: ...

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def cdc_toml(retailer: str, bootstrap: str, partitions: int, source: str,
             fields: str) -> str:
    """A ``qsfraud cdc run`` config: the source's own settings and field mapping, the rest
    shared (columns named alike in both databases are mapped here)."""
    return f"""\
retailer = "{retailer}"
metrics_interval_s = 10

[source]
{source}
[kafka]
bootstrap_servers = "{bootstrap}"
partitions = {partitions}
commit_interval_ms = 50
key = "customer_id"

[mapping]
timezone = "UTC"

[mapping.fields]
{fields}currency = "currency"
occurred_at = {{ from = "created_at", type = "datetime" }}
channel = "channel"
store_id = "store_id"
terminal_id = "terminal_id"
address_mismatch = {{ from = "address_mismatch", type = "bool" }}
"""


class MariaDBOrders(OrdersDatabase):
    """``<database>.orders`` in MariaDB; device and IP live in a JSON column, as in many
    shops. Several retailers can share one server, each with its own database."""

    def __init__(self, host: str, port: int, database: str = DATABASE) -> None:
        import mysql.connector

        self.host, self.port, self.database = host, port, database
        self.conn = mysql.connector.connect(host=host, port=port, user=APP_USER.user,
                                            password=APP_USER.password, autocommit=True)
        cur = self.conn.cursor()
        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        cur.execute(f"USE `{database}`")

    def describe(self) -> str:
        return f"MariaDB {self.host}:{self.port}/{self.database}"

    def reset(self) -> None:
        cur = self.conn.cursor()
        cur.execute(f"DROP TABLE IF EXISTS {ORDERS}")
        cur.execute(
            f"CREATE TABLE {ORDERS} (id VARCHAR(40) PRIMARY KEY, customer_id VARCHAR(64) NOT NULL,"
            " card_hash VARCHAR(64) NOT NULL, amount DECIMAL(12,2) NOT NULL,"
            " currency CHAR(3) NOT NULL, created_at DATETIME(6) NOT NULL, channel VARCHAR(8),"
            " store_id VARCHAR(32), terminal_id VARCHAR(32), coupon_code VARCHAR(32),"
            " item_count INT, address_mismatch TINYINT(1), attrs JSON)"
        )

    def insert(self, rows: list[dict[str, Any]]) -> None:
        # autocommit (set at connect): each INSERT is its own transaction (its own binlog
        # GTID and XID); the statements travel together, one round trip for all of them
        cur = self.conn.cursor()
        cur.execute(";".join([INSERT_ORDER] * len(rows)), [
            value for r in rows for value in (
                r["tx_id"], r["customer_id"], r["payment_instrument"],
                Decimal(str(r["amount"])).quantize(Decimal("0.01")), r["currency"],
                _utc(r["occurred_at"]).replace(tzinfo=None), r["channel"], r["store_id"],
                r["terminal_id"], r["coupon_code"], r["item_count"], int(r["address_mismatch"]),
                json.dumps({"device": {"id": r["device_id"]}, "ip": r["ip"]}))])
        while cur.nextset():  # a result per statement, all read before the next command
            pass

    def insert_hostile(self, prefix: str) -> dict[str, str]:
        now = datetime.now(UTC).replace(tzinfo=None)
        bad = {
            f"{prefix}-negative": ("negative amount", Decimal("-5.00"), now, {}),
            f"{prefix}-future": ("timestamp in 2099", Decimal("10.00"), datetime(2099, 1, 1), {}),
            f"{prefix}-huge": ("100 KB ip string", Decimal("10.00"), now, {"ip": "9" * 100_000}),
        }
        cur = self.conn.cursor()
        cur.executemany(
            INSERT_ORDER,
            [(tx_id, "c-hostile", "card-hostile", amount, "USD", created, "web", None, None,
              None, 1, 0, json.dumps({"device": {"id": "dev-hostile"}, "ip": "10.0.0.1", **attrs}))
             for tx_id, (_, amount, created, attrs) in bad.items()],
        )
        return {tx_id: what for tx_id, (what, *_) in bad.items()}

    def ids(self) -> set[str]:
        cur = self.conn.cursor()
        cur.execute(f"SELECT id FROM {ORDERS}")
        return {str(row[0]) for row in cur.fetchall()}  # type: ignore[index]

    def cdc_config(self, retailer: str, bootstrap: str, partitions: int) -> str:
        source = f"""\
kind = "mysql"
id = "{retailer}-orders"
snapshot = "initial"
on_history_lost = "fail"
host = "{self.host}"
port = {self.port}
user = "{CDC_USER.user}"
password = "{CDC_USER.password}"
database = "{self.database}"
table = "{ORDERS}"
"""
        fields = """\
tx_id = "id"
customer_id = "customer_id"
payment_instrument = "card_hash"
amount = { from = "amount", type = "decimal" }
coupon_code = "coupon_code"
item_count = { from = "item_count", type = "int", default = 1 }
device_id = { from = "attrs", type = "json", path = "device.id" }
ip = { from = "attrs", type = "json", path = "ip" }
"""
        return cdc_toml(retailer, bootstrap, partitions, source, fields)

    def close(self) -> None:
        self.conn.close()


class MongoOrders(OrdersDatabase):
    """``shop.orders`` documents with nested customer, payment and device sub-documents."""

    def __init__(self, uri: str) -> None:
        import pymongo

        self.uri = uri
        self.client: Any = pymongo.MongoClient(uri)
        self.coll = self.client[DATABASE][ORDERS]

    def describe(self) -> str:
        return f"MongoDB {self.uri} {DATABASE}.{ORDERS}"

    def reset(self) -> None:
        self.coll.drop()

    def insert(self, rows: list[dict[str, Any]]) -> None:
        from bson.decimal128 import Decimal128

        self.coll.insert_many([
            {"_id": r["tx_id"], "customer": {"id": r["customer_id"]},
             "payment": {"token": r["payment_instrument"]},
             "total": Decimal128(str(round(r["amount"], 2))), "currency": r["currency"],
             "created_at": _utc(r["occurred_at"]), "channel": r["channel"],
             "device": {"id": r["device_id"], "ip": r["ip"]}, "store_id": r["store_id"],
             "terminal_id": r["terminal_id"], "coupon": r["coupon_code"],
             "items": r["item_count"], "address_mismatch": bool(r["address_mismatch"])}
            for r in rows
        ], ordered=True)  # each document its own write: no multi-document transaction

    def ids(self) -> set[str]:
        return {str(d["_id"]) for d in self.coll.find({}, {"_id": 1})}

    def insert_hostile(self, prefix: str) -> dict[str, str]:
        from bson.decimal128 import Decimal128

        def doc(tx_id: str, **changes: Any) -> dict[str, Any]:
            d = {"_id": tx_id, "customer": {"id": "c-hostile"}, "payment": {"token": "card-h"},
                 "total": Decimal128("10.00"), "currency": "USD",
                 "created_at": datetime.now(UTC), "channel": "web",
                 "device": {"id": "dev-hostile", "ip": "10.0.0.1"}, "items": 1,
                 "address_mismatch": False}
            d.update(changes)
            return {k: v for k, v in d.items() if v is not None}

        bad = {
            f"{prefix}-type": ("amount is a word", doc(f"{prefix}-type", total="abc")),
            f"{prefix}-missing": ("no customer", doc(f"{prefix}-missing", customer=None)),
            f"{prefix}-nan": ("NaN amount", doc(f"{prefix}-nan", total=Decimal128("NaN"))),
            f"{prefix}-huge": ("100 KB ip string", doc(
                f"{prefix}-huge", device={"id": "dev-hostile", "ip": "9" * 100_000})),
        }
        self.coll.insert_many([d for _, d in bad.values()], ordered=True)
        return {tx_id: what for tx_id, (what, _) in bad.items()}

    def cdc_config(self, retailer: str, bootstrap: str, partitions: int) -> str:
        source = f"""\
kind = "mongo"
id = "{retailer}-orders"
snapshot = "initial"
on_history_lost = "resnapshot"
uri = "{self.uri}"
database = "{DATABASE}"
collection = "{ORDERS}"
max_await_ms = 50
"""
        fields = """\
tx_id = { from = "_id", type = "string" }
customer_id = "customer.id"
payment_instrument = "payment.token"
amount = { from = "total", type = "decimal" }
coupon_code = "coupon"
item_count = { from = "items", type = "int", default = 1 }
device_id = "device.id"
ip = "device.ip"
"""
        return cdc_toml(retailer, bootstrap, partitions, source, fields)

    def close(self) -> None:
        self.client.close()


@dataclass
class RetailerTally:
    """What the demo has seen for one retailer; decisions are kept per ``tx_id`` (the first
    one), so redelivered ones are counted apart and never twice."""

    committed: int = 0
    captured: set[str] = field(default_factory=set)
    decisions: dict[str, tuple[str, float]] = field(default_factory=dict)
    redelivered: int = 0  # the same decision again (at-least-once)
    conflicting: list[str] = field(default_factory=list)  # a second, different decision
    labels: dict[str, bool] = field(default_factory=dict)  # sent so far
    # kept as decisions and labels come (the status line reads them every few seconds:
    # recounting every decision and label there took tens of ms per retailer after a few
    # minutes, holding the lock the writer and the topic watcher wait for)
    action_counts: Counter[str] = field(default_factory=Counter)
    labelled_truth: list[int] = field(default_factory=list)  # decided and labelled, in order
    labelled_scores: list[float] = field(default_factory=list)
    frauds: int = 0
    frauds_flagged: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    # per hop of the commit -> decision path: epoch seconds each stage reached, by tx_id
    stamps: dict[str, dict[str, float]] = field(default_factory=dict)
    first_decision_at: float | None = None  # epoch seconds
    decided_at_report: int = 0

    def stamp(self, tx_id: str, **stages: float) -> None:
        self.stamps.setdefault(tx_id, {}).update(stages)

    def hops_ms(self) -> dict[str, dict[str, float | None]]:
        """Percentiles of the time from the database commit to each stage: ``encoded`` (the
        CDC read and mapped the change), ``produced`` (handed to its Kafka producer),
        ``visible`` (readable under read_committed: the CDC's Kafka transaction committed),
        ``received`` (the worker took it), ``decided``."""
        out: dict[str, dict[str, float | None]] = {}
        for stage in HOPS:
            values = [(s[stage] - s["committed"]) * 1000 for s in self.stamps.values()
                      if stage in s and "committed" in s]
            out[stage] = {"p50": _number(_percentile(values, 0.5), 1),
                          "p99": _number(_percentile(values, 0.99), 1), "n": len(values)}
        return out

    def decide(self, tx_id: str, action: str, score: float) -> None:
        """The first decision of ``tx_id``."""
        self.decisions[tx_id] = (action, score)
        self.action_counts[action] += 1
        if tx_id in self.labels:
            self._join(self.labels[tx_id], action, score)

    def label(self, tx_id: str, is_fraud: bool) -> None:
        """``tx_id``'s label was sent."""
        if tx_id in self.labels:
            return
        self.labels[tx_id] = is_fraud
        decision = self.decisions.get(tx_id)
        if decision is not None:
            self._join(is_fraud, *decision)

    def _join(self, is_fraud: bool, action: str, score: float) -> None:
        self.labelled_truth.append(int(is_fraud))
        self.labelled_scores.append(score)
        if is_fraud:
            self.frauds += 1
            self.frauds_flagged += action in FLAGGED

    def actions(self) -> Counter[str]:
        return Counter(self.action_counts)

    def label_metrics(self) -> tuple[float, float]:
        """Average precision and recall (flagged = verify, hold or block) over the decided
        transactions whose label has come (call it holding the demo's lock: it copies)."""
        return label_metrics(list(self.labelled_truth), list(self.labelled_scores),
                             self.frauds, self.frauds_flagged)


def label_metrics(truth: list[int], scores: list[float], frauds: int,
                  flagged: int) -> tuple[float, float]:
    """Average precision of ``scores`` against ``truth`` and the share of ``frauds`` that
    were ``flagged``: nan where there is no fraud yet."""
    if not frauds:
        return float("nan"), float("nan")
    return average_precision(truth, scores), flagged / frauds


@dataclass
class FlTally:
    """What the FL topics carried: sealed updates, signed global models, anything else."""

    updates: int = 0
    updates_opened: int = 0  # sealed to the aggregator and signed by a retailer: opened
    updates_refused: list[str] = field(default_factory=list)
    globals: int = 0
    globals_verified: int = 0
    globals_refused: list[str] = field(default_factory=list)
    round: int = 0
    version: str | None = None
    contributors: Counter[str] = field(default_factory=Counter)


class TopicWatcher(threading.Thread):
    """Reads ``<R>.transactions``, ``<R>.decisions`` and the FL topics (read_committed) and
    tallies them against the ground truth the demo wrote."""

    def __init__(self, demo: Demo, bootstrap: str) -> None:
        super().__init__(name="topic-watcher", daemon=True)
        from confluent_kafka import Consumer

        self.demo = demo
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"qsfraud-demo-{os.getpid()}",
            "auto.offset.reset": "earliest", "isolation.level": "read_committed",
            "enable.auto.commit": False,
            # connection errors while a broker restarts would flood the status (they pass)
            "log_level": 2,
            # the workers and the aggregator create their topics when they start: notice them
            "topic.metadata.refresh.interval.ms": 1000,
        })
        self.topics = {}
        for r in demo.retailers:
            self.topics[RetailerTopics(r).transactions] = ("transactions", r)
            self.topics[RetailerTopics(r).decisions] = ("decisions", r)
        self.topics[FL_UPDATES] = ("fl.updates", "")
        self.topics[FL_GLOBAL] = ("fl.global", "")
        if demo.settings.hostile:
            for r in demo.retailers:
                self.topics[RetailerTopics(r).transactions_dlq] = ("dlq", r)
                self.topics[RetailerTopics(r).streams_dlq] = ("dlq", r)
            self.topics[CONFIG_REJECTED] = ("dlq", "")
        self.consumer.subscribe(list(self.topics))
        self.stopping = threading.Event()
        self.keys = demo.root / "keys"

    def run(self) -> None:
        from pqc.keys import load_keystore

        aggregator = load_keystore(self.keys / "aggregator")
        while not self.stopping.is_set():
            # poll returns at the first record, consume(timeout=0) takes what else is there:
            # consume(500, timeout) would hold the first record until 500 came or the timeout
            # passed, and the time a transaction became readable would be that late
            first = self.consumer.poll(0.2)
            if first is None:
                continue
            seen = time.time()
            for msg in [first, *self.consumer.consume(500, timeout=0)]:
                if msg.error() is not None:
                    continue
                kind, retailer = self.topics.get(msg.topic() or "", ("", ""))
                value = msg.value() or b""
                if kind == "fl.updates":
                    self.fl_update(value, aggregator)
                elif kind == "fl.global":
                    self.fl_global(value, aggregator)
                elif kind == "dlq":
                    with self.demo.lock:
                        self.demo.dead_letters.append((msg.topic() or "", value))
                elif kind:
                    try:  # orjson: this thread reads every transaction and decision
                        record = orjson.loads(value)
                    except (TypeError, ValueError):
                        continue
                    if not isinstance(record, dict):
                        continue
                    if kind == "transactions":
                        self.transaction(retailer, record, msg.timestamp()[1] / 1000, seen)
                    else:
                        self.decision(retailer, record, seen)
        self.consumer.close()

    def transaction(self, retailer: str, envelope: dict[str, Any], produced: float,
                    seen: float) -> None:
        """A captured change; ``produced`` is its Kafka timestamp (the CDC's produce call),
        ``seen`` when it became readable here under read_committed."""
        tx = envelope.get("tx")
        if envelope.get("op") in ("r", "c") and isinstance(tx, dict):
            tx_id = str(tx.get("tx_id"))
            encoded = envelope.get("produced_at")  # set by the CDC's encoder
            with self.demo.lock:
                tally = self.demo.tallies[retailer]
                tally.captured.add(tx_id)
                tally.stamp(tx_id, produced=produced, visible=seen)
                if isinstance(encoded, int | float):
                    tally.stamp(tx_id, encoded=float(encoded))

    def decision(self, retailer: str, d: dict[str, Any], seen: float) -> None:
        tally = self.demo.tallies[retailer]
        tx_id = str(d.get("tx_id"))
        action, score = str(d.get("action")), float(d.get("score", 0.0))
        decided = (d.get("timings") or {}).get("decided")
        with self.demo.lock:
            first = tally.decisions.get(tx_id)
            if first is not None:
                if first == (action, score):
                    tally.redelivered += 1
                else:
                    tally.conflicting.append(tx_id)
                return
            tally.decide(tx_id, action, score)
            if tally.first_decision_at is None:
                tally.first_decision_at = seen
                self.demo.say(f"{retailer:8} first decision {seen - self.demo.started_at:.1f} s "
                              "after the demo started")
            # from the demo's own commit, not the decision's `committed`: the binlog's event
            # times are whole seconds (cdc.mysql_source takes the latest the commit can have
            # been: the read delay late)
            committed = self.demo.commit_times.pop(tx_id, None)
            if committed is not None and isinstance(decided, int | float):
                tally.latencies_ms.append((decided - committed) * 1000)
                received = (d.get("timings") or {}).get("received")
                tally.stamp(tx_id, committed=committed, decided=float(decided))
                if isinstance(received, int | float):
                    tally.stamp(tx_id, received=float(received))

    def fl_update(self, blob: bytes, aggregator: Any) -> None:
        from fl.client import open_update
        from pqc.freshness import InMemoryFreshness

        fl = self.demo.fl
        try:
            # a fresh freshness store each: a redelivered update is still a sealed one
            open_update(blob, aggregator.kem, aggregator.registry, InMemoryFreshness())
        except Exception as exc:  # any failure to open is what is counted
            with self.demo.lock:
                fl.updates += 1
                fl.updates_refused.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        with self.demo.lock:
            fl.updates += 1
            fl.updates_opened += 1

    def fl_global(self, blob: bytes, aggregator: Any) -> None:
        from fl.client import open_global
        from pqc.freshness import InMemoryFreshness

        fl = self.demo.fl
        try:
            model = open_global(blob, aggregator.registry, InMemoryFreshness())
        except Exception as exc:  # any failure to verify is what is counted
            with self.demo.lock:
                fl.globals += 1
                fl.globals_refused.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        with self.demo.lock:
            fl.globals += 1
            fl.globals_verified += 1
            if model.round >= fl.round:
                fl.round, fl.version = model.round, model.version
            fl.contributors.update(model.contributors)


def process_started_at() -> float:
    """When this process started (epoch seconds): the command's start, interpreter start-up
    and imports included; now, where /proc does not say."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        # /proc/uptime to the hundredth: the boot time in /proc/stat is whole seconds
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def _percentile(values: list[float], q: float) -> float:
    """The value at rank ``int(q * n)`` of the sorted ``values``, found without sorting them
    all (the status line asks for it every few seconds over every latency so far).

    >>> _percentile([5.0, 1.0, 4.0, 2.0, 3.0], 0.5), _percentile([], 0.99)
    (3.0, nan)
    """
    if not values:
        return float("nan")
    k = min(len(values) - 1, int(q * len(values)))
    return float(np.partition(np.asarray(values, dtype=float), k)[k])


def _number(x: float, digits: int) -> float | None:
    """JSON has no NaN: an undefined figure is null."""
    return None if math.isnan(x) else round(x, digits)


class Demo:
    """Starts the stack, the keys and the roles, replays purchases and labels, reports, and
    cleans up."""

    RETAILERS = ("acme", "globex", "initech")
    SHOPS = {"acme": "Walmart-like, MariaDB", "globex": "Flipkart-like, MongoDB",
             "initech": "second MariaDB database"}

    def __init__(self, settings: DemoSettings, out: TextIO = sys.stdout) -> None:
        self.settings = settings
        self.out = out
        self.root = settings.root.resolve()
        self.retailers = list(self.RETAILERS)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.child_args: dict[str, list[str]] = {}
        self.restarts: Counter[str] = Counter()
        self.restart_events: list[dict[str, Any]] = []  # role, exit code, when (as faults)
        self.writing_started = time.monotonic()  # set again when the writes start
        self.restarted_at: dict[str, float] = {}
        self.fault_events: list[dict[str, Any]] = []
        self.hostile_sent: list[dict[str, str]] = []  # where, what, token (id or SHA-256)
        self.hostile_at_s: float | None = None  # after the writes started
        self.dead_letters: list[tuple[str, bytes]] = []  # (topic, value) of DLQs, rejections
        self.stack: Stack | None = None
        self.lock = threading.Lock()
        self.tallies = {r: RetailerTally() for r in self.retailers}
        self.fl = FlTally()
        self.truth: dict[str, tuple[bool, str]] = {}  # tx_id -> (is_fraud, scenario)
        self.commit_times: dict[str, float] = {}  # tx_id -> when its COMMIT returned
        self.written: dict[str, set[str]] = {}  # read back from each database at the end
        self.metrics_ports: dict[str, int] = {}
        self.fl_enabled = False
        self.ui_url: str | None = None
        self.stop_requested = threading.Event()
        self.writing = threading.Event()  # in the write loop, which checks stop_requested
        self.interrupted = False
        self.reporting_done = threading.Event()
        self.last_report = time.monotonic()
        self.started_at = process_started_at()
        self.milestones: dict[str, float] = {}  # seconds after started_at: stack, workers, UI

    def milestone(self, name: str) -> float:
        """Note that ``name`` happened now; the seconds since the command started."""
        after = round(time.time() - self.started_at, 1)
        with self.lock:
            self.milestones[name] = after
        return after

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self) -> int:
        previous = signal.signal(signal.SIGTERM, lambda *_: self.stop_requested.set())
        previous_int = signal.signal(signal.SIGINT, self.on_ctrl_c)
        try:
            self._run()
        except KeyboardInterrupt:
            self.interrupted = True
            self.say("\nstopping (Ctrl-C)...")
        finally:
            self.shutdown()
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
        if self.settings.headless and not self.interrupted:
            self.say(json.dumps(self.summary(), sort_keys=False))
        return 0

    def on_ctrl_c(self, signum: int, frame: Any) -> None:
        """While purchases are written, Ctrl-C ends the write loop at its next tick: raised
        there, it could land inside a database client's call (a fresh-clone run once hung on
        Ctrl-C with every child still running). Anywhere else, and a second time, it
        interrupts at once."""
        if self.writing.is_set() and not self.stop_requested.is_set():
            self.interrupted = True  # said by replay(): no print inside a signal handler
            self.stop_requested.set()
            return
        raise KeyboardInterrupt

    def _run(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        (self.root / "logs").mkdir(parents=True)
        # the full JIT, its request paths compiled by warm_broker before the first purchase
        # (KafkaService.command has the figures against C1 only, the tests' broker)
        self.stack = Stack(StackConfig.ephemeral(self.root / "stack", kafka_full_jit=True))
        t0 = time.monotonic()
        self.compile_model_loops()
        self.stack.up()
        bootstrap = self.stack.kafka.bootstrap
        self.say(f"stack ready in {time.monotonic() - t0:.1f} s "
                 f"({self.milestone('stack_ready_s'):.1f} s after start): kafka {bootstrap}")
        mariadb = self.stack.mariadb
        databases: dict[str, OrdersDatabase] = {
            "acme": MariaDBOrders(mariadb.host, mariadb.port),
            "globex": MongoOrders(self.stack.mongo.uri),
            "initech": MariaDBOrders(mariadb.host, mariadb.port, database="initech"),
        }
        try:
            self.make_keys()
            self.publish_config(bootstrap)
            self.fl_enabled = worker_fl_flags()
            self.spawn("aggregator", self.aggregator_args(bootstrap))
            self.wait_for_model_loops()
            for retailer, db in databases.items():
                db.reset()
                config = self.root / f"cdc-{retailer}.toml"
                config.write_text(db.cdc_config(retailer, bootstrap, self.settings.partitions))
                self.say(f"{retailer:8} {self.SHOPS[retailer]}: {db.describe()}")
                self.spawn(f"cdc-{retailer}", self.cdc_args(config))
                self.metrics_ports[retailer] = free_port()
                self.spawn(f"worker-{retailer}", self.worker_args(retailer, bootstrap))
            self.say("started: " + ", ".join(f"{n} (pid {p.pid})"
                                              for n, p in self.children.items())
                     + f"; logs in {self.root / 'logs'}")
            self.say("federated learning: " + (
                f"on (workers sync every {self.settings.fl_interval_s:g} s)" if self.fl_enabled
                else "the aggregator runs, but `qsfraud worker` has no --fl-identity yet: "
                     "workers do not federate"))
            # the broker's JIT compiles its request paths while the workers start, not on the
            # first purchases (qsfraud.stack.kafka.warm_up)
            workers_ready = threading.Event()
            warming = threading.Thread(target=self.warm_broker, args=(bootstrap, workers_ready),
                                       name="broker-warm-up", daemon=True)
            warming.start()
            t0 = time.monotonic()
            try:
                self.wait_for_workers()
            finally:
                workers_ready.set()
            warming.join()
            self.say(f"workers ready in {time.monotonic() - t0:.1f} s "
                     f"({self.milestone('workers_ready_s'):.1f} s after start)")
            if not self.settings.headless:
                # after the workers, not while they join: started together, streamlit's
                # start-up slowed theirs (first decisions 54 s after the command instead of
                # 47-50 s, one run each on the loaded VM)
                self.start_ui(bootstrap)
            watcher = TopicWatcher(self, bootstrap)
            watcher.start()
            try:
                self.replay(databases, bootstrap)
                if not self.stop_requested.is_set():
                    self.drain()
                for retailer, db in databases.items():
                    self.written[retailer] = db.ids()
                # what was decided while the ids were read counts too
                time.sleep(1.0)
            finally:
                self.reporting_done.set()
                watcher.stopping.set()
                watcher.join(5)
            self.report()
            self.write_audit()
        finally:
            for db in databases.values():
                db.close()

    def warm_broker(self, bootstrap: str, workers_ready: threading.Event) -> None:
        started = time.monotonic()
        try:
            written = warm_up(bootstrap, WARM_UP_S, until=workers_ready)
        except Exception as exc:  # only the first purchases' latency depends on it
            self.say(f"broker warm-up failed ({exc}): the first purchases may wait longer")
            return
        self.say(f"broker warmed up: {written} records in {time.monotonic() - started:.1f} s")

    def make_keys(self) -> None:
        """Key stores as `qsfraud keys init` makes them, and the trust each party needs:
        the aggregator trusts the retailers, the retailers trust the aggregator and the admin,
        the workers' config registry holds the admin's keys."""
        from fl.watchlist import new_key, seal_watch_key
        from pqc.keys import init_keystore, public_bundle, read_bundle, save_store_registry

        keys = self.root / "keys"
        stores = {name: init_keystore(keys / name, name, role) for name, role in
                  [*((r, "retailer") for r in self.retailers),
                   ("aggregator", "aggregator"), ("admin", "admin")]}
        bundles = {}
        for name, store in stores.items():
            bundle = public_bundle(store)
            (keys / f"{name}.pub.json").write_text(json.dumps(bundle, indent=2) + "\n")
            bundles[name] = read_bundle(bundle)
        trusts = {"aggregator": list(self.retailers), "admin": list(self.retailers),
                  **{r: ["aggregator", "admin"] for r in self.retailers}}
        for name, others in trusts.items():
            for other in others:
                stores[name].registry.trust(bundles[other])
            save_store_registry(stores[name])
        # the federated watchlist's consortium key, sealed by the admin to each retailer
        # (`qsfraud watch-key`): in its key store, the worker turns the watchlist on
        key, admin = new_key(), stores["admin"]
        for i, r in enumerate(self.retailers):
            sealed = seal_watch_key(key, admin.identity,
                                    admin.registry.current_kem_key(r), time.time_ns() + i)
            (keys / r / "watch-key.sealed").write_bytes(sealed)
        self.say(f"keys: {', '.join(stores)} in {keys}; a watchlist key sealed to each retailer")

    def publish_config(self, bootstrap: str) -> None:
        """Version 1 of the live config, signed by the admin: the FL sync interval."""
        from confluent_kafka import Producer

        from pqc.keys import load_keystore
        from streams.config_stream import ConfigDocument, sign_config

        admin = load_keystore(self.root / "keys" / "admin")
        doc = ConfigDocument.default().updated(
            {"fl.sync_interval_s": self.settings.fl_interval_s}, version=1, scope="*",
            issued_by=admin.identity.name)
        producer = Producer({"bootstrap.servers": bootstrap})
        producer.produce(CONFIG, key=b"*", value=sign_config(doc, admin.identity))
        if producer.flush(30):
            raise DemoError(f"could not publish the signed config to {CONFIG}")

    # The roles' command lines (tests/qsfraud/test_docker_compose.py holds docker-compose.yml
    # to the same flags).

    def aggregator_args(self, bootstrap: str) -> list[str]:
        return ["aggregator", "--keys", str(self.root / "keys" / "aggregator"),
                "--bootstrap", bootstrap, "--quorum", str(len(self.retailers)),
                "--deadline", str(max(5.0, self.settings.fl_interval_s)),
                "--freshness", str(self.root / "aggregator-freshness.json"),
                "--watchlist-state", str(self.root / "aggregator-watchlist.json")]

    def cdc_args(self, config: Path) -> list[str]:
        return ["cdc", "run", "--config", str(config)]

    def ui_args(self, bootstrap: str, port: int) -> list[str]:
        return ["ui", "--bootstrap", bootstrap, "--port", str(port),
                "--admin-keys", str(self.root / "keys" / "admin"),
                *(f"--metrics=127.0.0.1:{p}" for p in self.metrics_ports.values())]

    def worker_args(self, retailer: str, bootstrap: str) -> list[str]:
        keys = self.root / "keys"
        args = ["worker", "--retailer", retailer, "--bootstrap", bootstrap,
                "--web-port", str(self.metrics_ports[retailer]),
                "--datadir", str(self.root / "streams"), "--loglevel", "warn",
                "--trust", str(keys / "admin" / "registry.json"),
                "--partitions", str(self.settings.partitions)]
        if self.fl_enabled:
            args += ["--fl-identity", str(keys / retailer),
                     "--fl-aggregator", str(keys / "aggregator.pub.json"),
                     "--fl-trust", str(keys / retailer / "registry.json")]
        return args

    def compile_model_loops(self) -> None:
        """numba compiles the risk model's loops into its on-disk cache once, while the stack
        starts. After a fresh install the three workers each compiled them at once instead
        (~5 s of a core each) while the broker warmed up; now they load them from the cache."""
        log = open(self.root / "logs" / "model-compile.log", "ab")  # noqa: SIM115 (the child's)
        self.children[MODEL_COMPILE] = subprocess.Popen(
            [sys.executable, "-c", "from fraud.models import RiskModel; RiskModel.warm_up()"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()

    def wait_for_model_loops(self) -> None:
        """Before the workers start; a failure only costs time (each worker compiles)."""
        proc = self.children[MODEL_COMPILE]
        if proc.wait() != 0:
            self.say(f"compiling the model's loops failed (exit {proc.returncode}; "
                     f"{self.root / 'logs' / 'model-compile.log'}): each worker compiles them")
        del self.children[MODEL_COMPILE]

    def spawn(self, name: str, args: list[str]) -> None:
        self.child_args[name] = args
        # appended: a restarted role's log keeps what its first run wrote
        log = open(self.root / "logs" / f"{name}.log", "ab")  # noqa: SIM115 (owned by the child)
        self.children[name] = subprocess.Popen(
            [sys.executable, "-m", "qsfraud", *args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()

    def start_ui(self, bootstrap: str) -> None:
        """The analysts' UI on this demo's Kafka and workers (a crash of it stops nothing)."""
        if self.settings.ui_port is None:
            return
        wanted = self.settings.ui_port
        port = wanted if wanted and port_is_free("127.0.0.1", wanted) else free_port()
        self.spawn("ui", self.ui_args(bootstrap, port))
        self.ui_url = f"http://127.0.0.1:{port}"
        self.say(f"UI: {self.ui_url}")
        threading.Thread(target=self.wait_for_ui, args=(self.ui_url,), name="ui-up",
                         daemon=True).start()

    def wait_for_ui(self, url: str) -> None:
        """Says when the UI answers its health check (streamlit takes seconds to start)."""
        import urllib.request

        while not self.reporting_done.is_set():
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                    if answer.status == 200:
                        self.say(f"UI up {self.milestone('ui_up_s'):.1f} s after start: {url}")
                        return
            except OSError:
                pass
            self.reporting_done.wait(0.5)

    def rows(self) -> Iterator[dict[str, Any]]:
        s = self.settings
        names = {f"retailer_{i + 1}": r for i, r in enumerate(self.retailers)}
        cfg = GeneratorConfig(retailers=len(self.retailers), days=s.days, seed=s.seed,
                              tx_per_day=s.tx_per_day)
        for row in generate(cfg):
            row["retailer_id"] = names[row["retailer_id"]]
            yield row

    def replay(self, databases: dict[str, OrdersDatabase], bootstrap: str) -> None:
        """Commits the generator's rows in their time order, ``rate`` a second per retailer
        (the retailers have the same volume, so the whole stream goes at ``rate`` times
        their number), and sends each label when the replayed clock passes its time."""
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 2})
        # the generator builds its customers, shops and campaigns at its first row: before the
        # clock starts, or the first tick would owe the rows of that time all at once
        generated = self.rows()
        first = next(generated, None)
        rows = generated if first is None else itertools.chain([first], generated)
        # The tallies grow by ~10 objects a purchase and are freed by reference counting,
        # never by the collector: its full collections walked them all, one core for 40-220 ms
        # every ~25 s of a 150 s run, slowing every role's next purchases. Only the youngest
        # generation is collected automatically, as in a worker; the rest once an hour.
        collect_youngest_generation_only()
        started = self.writing_started = time.monotonic()
        reporter = threading.Thread(target=self.report_until_stopped, name="status",
                                    daemon=True)
        reporter.start()
        if self.settings.faults:
            threading.Thread(target=self.inject_faults, name="faults", daemon=True).start()
        self.writing.set()
        try:
            self.write_until_stopped(databases, producer, started, rows)
        finally:
            self.writing.clear()
            if self.interrupted:
                self.say("\nstopping (Ctrl-C)...")
            producer.flush(5)

    def write_until_stopped(self, databases: dict[str, OrdersDatabase], producer: Any,
                            started: float, rows: Iterator[dict[str, Any]]) -> None:
        pending_labels: list[tuple[float, int, dict[str, Any]]] = []  # a heap by due time
        order = itertools.count()  # ties in due time: the order of the rows
        tick = 0.1
        total_rate = self.settings.rate * len(self.retailers)
        written = 0
        exhausted = False
        hostile_due = self.settings.hostile
        while not self.stop_requested.is_set():
            now = time.monotonic()
            if self.settings.duration and now - started >= self.settings.duration:
                break
            if hostile_due and now - started >= HOSTILE_AT * self.settings.duration:
                hostile_due = False
                self.inject_hostile(databases, producer)
            self.check_children()
            # paced by the clock, not by ticks: a slow tick (a loaded machine) is caught up
            due = min(int(total_rate * (now - started)) - written, int(total_rate) + 1)
            batch: dict[str, list[dict[str, Any]]] = {r: [] for r in self.retailers}
            for row in rows if due > 0 else ():
                batch[row["retailer_id"]].append(row)
                if row.get("labelled_at") is not None:
                    heapq.heappush(pending_labels,
                                   (float(row["labelled_at"]), next(order), row))
                if sum(map(len, batch.values())) >= due:
                    break
            else:
                exhausted = due > 0
            clock = 0.0
            for retailer, retailer_rows in batch.items():
                if retailer_rows:
                    databases[retailer].insert(retailer_rows)
                    committed = time.time()
                    clock = max(clock, retailer_rows[-1]["occurred_at"])
                    with self.lock:
                        for r in retailer_rows:
                            self.truth[r["tx_id"]] = (bool(int(r["is_fraud"])), r["scenario"])
                            self.commit_times[r["tx_id"]] = committed
                        self.tallies[retailer].committed += len(retailer_rows)
                    written += len(retailer_rows)
            if clock:
                self.send_due_labels(producer, pending_labels, clock)
            if exhausted:
                self.say("all generated purchases committed; Ctrl-C stops")
                rows = iter(())
                exhausted = False
                written = 1 << 62  # nothing more is due
            time.sleep(max(0.0, tick - (time.monotonic() - now)))

    def inject_hostile(self, databases: dict[str, OrdersDatabase], producer: Any) -> None:
        """Bad rows into every database, bad records onto every retailer's input and label
        topics, an unsigned and an untrusted config document: each must end in a dead-letter
        topic (or ``qsfraud.config.rejected``) and nothing else may stop."""
        from pqc.keys import load_keystore
        from streams.config_stream import ConfigDocument, sign_config

        sent = self.hostile_sent
        for retailer, db in databases.items():
            for tx_id, what in db.insert_hostile(f"bad-{retailer}").items():
                sent.append({"where": f"{retailer} database", "what": what, "token": tx_id})
        records = {
            "binary garbage": b"\x00\xff\xfegarbage\x00",
            "not JSON": b"{not json",
            "oversized (200 KB)": json.dumps({"v": 1, "op": "c", "tx": {
                "tx_id": "bad-oversized", "pad": "x" * 200_000}}).encode(),
            "unknown op": b'{"v": 1, "op": "z", "tx": {}}',
            "nested 100 deep": b"[" * 100 + b"]" * 100,
        }
        copies = 0
        for retailer in self.retailers:
            topics = RetailerTopics(retailer)
            for what, value in records.items():
                for topic in (topics.transactions, topics.labels):
                    # unique per topic (trailing blanks), so that each dead letter is found
                    # by its digest
                    unique = value + b" " * (copies % (2 * len(self.retailers)))
                    copies += 1
                    producer.produce(topic, key=b"hostile", value=unique)
                    sent.append({"where": topic, "what": what,
                                 "token": hashlib.sha256(unique).hexdigest()})
        doc = ConfigDocument.default().updated({"thresholds.block": 0.99}, version=99,
                                                issued_by="mallory")
        unsigned = json.dumps(doc.to_dict()).encode()
        untrusted = sign_config(doc, load_keystore(self.root / "keys" / self.retailers[0]).identity)
        for what, value in (("unsigned config", unsigned), ("config signed by a retailer",
                                                            untrusted)):
            producer.produce(CONFIG, key=b"*", value=value)
            sent.append({"where": CONFIG, "what": what, "token": "config"})
        producer.flush(10)
        self.hostile_at_s = round(time.monotonic() - self.writing_started, 1)
        self.say(f"hostile: {len(sent)} bad rows, records and config documents sent")

    def hostile_audit(self) -> dict[str, Any]:
        """Which of the hostile inputs reached a dead-letter topic (and with what reason),
        which were decided, which are unaccounted for."""
        found: dict[str, str] = {}
        rejections = 0
        for topic, value in self.dead_letters:
            try:
                record = json.loads(value)
            except ValueError:
                continue
            if topic == CONFIG_REJECTED:
                rejections += 1
                continue
            reason = str(record.get("reason") or record.get("error") or "?")[:120]
            digest = record.get("value_sha256")
            if isinstance(digest, str):
                found.setdefault(digest, f"{topic}: {reason}")
            for item in self.hostile_sent:
                if item["token"].startswith("bad-") and item["token"].encode() in value:
                    found.setdefault(item["token"], f"{topic}: {reason}")
        items, unmatched = [], []
        for item in self.hostile_sent:
            if item["token"] == "config":
                continue
            outcome = found.get(item["token"])
            items.append({**item, "dead_letter": outcome})
            if outcome is None:
                unmatched.append(item)
        decided = sorted(tx for t in self.tallies.values() for tx in t.decisions
                         if tx.startswith("bad-"))
        return {"sent": len(self.hostile_sent), "at_s": self.hostile_at_s, "items": items,
                "unmatched": unmatched, "decided": decided, "config_documents": 2,
                "config_rejection_reports": rejections}

    def inject_faults(self) -> None:
        """The fault run's plan, spread over the writing time."""
        started = self.writing_started
        for share, fault, target in FAULT_PLAN:
            due = started + share * self.settings.duration
            if self.stop_requested.wait(max(0.0, due - time.monotonic())) \
                    or self.reporting_done.is_set():
                return
            t0 = time.monotonic()
            if fault == "kill -9":
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.children[target].pid, signal.SIGKILL)
            elif self.stack is not None:
                self.stack.down(["kafka"])
                self.stack.up(["kafka"])
            event = {"fault": fault, "target": target, "at_s": round(t0 - started, 1),
                     "took_s": round(time.monotonic() - t0, 1)}
            self.fault_events.append(event)
            self.say(f"fault: {fault} {target} at {event['at_s']} s")

    def drain(self) -> None:
        """Until every committed purchase has a decision, or ``drain_s`` passed."""
        deadline = time.monotonic() + self.settings.drain_s
        while time.monotonic() < deadline and not self.stop_requested.is_set():
            self.check_children()
            with self.lock:
                behind = sum(t.committed - len(t.decisions) for t in self.tallies.values())
            if behind <= 0:
                return
            self.stop_requested.wait(0.5)
        self.say(f"drain: {behind} purchases still undecided after {self.settings.drain_s:g} s")

    def send_due_labels(self, producer: Any, pending: list[tuple[float, int, dict[str, Any]]],
                        clock: float) -> None:
        """Sends the labels of ``pending`` (a heap by due time) that ``clock`` has passed.
        A heap, not a list scanned every tick: chargebacks wait weeks of replayed time, tens of
        thousands of them, and the scan took most of the load generator's CPU."""
        while pending and pending[0][0] <= clock:
            due, _, row = heapq.heappop(pending)
            label = Label(tx_id=row["tx_id"], is_fraud=bool(int(row["is_fraud"])),
                          source=row.get("label_source") or "chargeback", labelled_at=due,
                          retailer_id=row["retailer_id"])
            producer.produce(RetailerTopics(row["retailer_id"]).labels, key=row["customer_id"],
                             value=label.to_json())
            with self.lock:
                self.tallies[row["retailer_id"]].label(row["tx_id"], label.is_fraud)
        producer.poll(0)

    def consumer_lag(self, retailer: str) -> int | None:
        """The worker's consumer lag on ``<R>.transactions`` (its /metrics), None if unread."""
        topic = f'topic="{RetailerTopics(retailer).transactions}"'
        try:
            page = worker_metrics(self.metrics_ports[retailer])
        except (OSError, KeyError):
            return None
        lag = 0
        for line in page.splitlines():
            if line.startswith("qsfraud_consumer_lag{") and topic in line:
                with contextlib.suppress(ValueError):
                    lag += int(float(line.rsplit(" ", 1)[1]))
        return lag

    def report_until_stopped(self) -> None:
        """Status lines from their own thread: a slow /metrics page must not slow the
        writes."""
        collected = time.monotonic()
        while not self.stop_requested.wait(self.settings.report_every):
            if self.reporting_done.is_set():
                return
            self.report()
            if time.monotonic() - collected >= FULL_COLLECTION_S:
                gc.collect()  # the cyclic garbage the young collections left (see replay)
                collected = time.monotonic()

    def report(self) -> None:
        """The compact live status: a line per retailer, one for FL, the UI's URL."""
        now = time.monotonic()
        elapsed = max(now - self.last_report, 1e-6)
        self.last_report = now
        lags = {r: self.consumer_lag(r) for r in self.retailers}
        lines = []
        # copied under the lock, computed after it: the writer and the topic watcher wait
        # for the lock, and the figures take tens of ms once there are minutes of them
        with self.lock:
            copies = {r: (t.committed, len(t.decisions), t.actions(), len(t.labels),
                          list(t.labelled_truth), list(t.labelled_scores), t.frauds,
                          t.frauds_flagged, list(t.latencies_ms))
                      for r, t in self.tallies.items()}
        for r, (committed, decided, acts, labels, truth, scores, frauds, flagged,
                latencies) in copies.items():
            t = self.tallies[r]
            rate = (decided - t.decided_at_report) / elapsed
            t.decided_at_report = decided  # only this thread reads and writes it
            ap, recall = label_metrics(truth, scores, frauds, flagged)
            lag = "?" if lags[r] is None else str(lags[r])
            lines.append(
                f"{r:8} {rate:6.0f} tx/s written={committed} decided={decided} "
                + " ".join(f"{a}={acts.get(a, 0)}" for a in ACTIONS)
                + f" lag={lag} labels={labels} AP={ap:.3f} recall={recall:.2f}"
                f" p99={_percentile(latencies, 0.99):.0f}ms")
        with self.lock:
            fl = self.fl
            lines.append(
                f"fl       round={fl.round} version={fl.version or '-'} "
                f"updates={fl.updates} globals={fl.globals}"
                + ("" if self.fl_enabled else " (workers without FL flags)")
                + (f" | UI {self.ui_url}" if self.ui_url else ""))
        for line in lines:
            self.say(line)

    def summary(self) -> dict[str, Any]:
        """The headless run's closing JSON."""
        retailers = {}
        with self.lock:
            for r, t in self.tallies.items():
                ap, recall = t.label_metrics()
                attack = [tx for tx, (_, scenario) in self.truth.items()
                          if scenario == ATTACK and tx in t.decisions]
                retailers[r] = {
                    "written": len([tx for tx in self.written.get(r, ())
                                    if not tx.startswith("bad-")]) or t.committed,
                    # the generated purchases only, as "written" (hostile rows: audit.json)
                    "captured": len([tx for tx in t.captured if not tx.startswith("bad-")]),
                    "decided": len(t.decisions),
                    "actions": dict(sorted(t.actions().items())),
                    "p50_ms": _number(_percentile(t.latencies_ms, 0.5), 1),
                    "p99_ms": _number(_percentile(t.latencies_ms, 0.99), 1),
                    "average_precision": _number(ap, 4),
                    "recall": _number(recall, 4),
                    "attack_caught": {
                        "caught": sum(t.decisions[tx][0] in FLAGGED for tx in attack),
                        "of": len(attack)},
                }
            fl = {"rounds": self.fl.round,
                  "contributors": dict(sorted(self.fl.contributors.items())),
                  "version": self.fl.version}
            hops = {r: t.hops_ms() for r, t in self.tallies.items()}
        return {"retailers": retailers, "fl": fl, "startup": self.startup(), "hops_ms": hops}

    def startup(self) -> dict[str, Any]:
        """Seconds from the command's start to the stack, the workers and the UI being up,
        and to each retailer's first decision."""
        return {**self.milestones, "first_decision_s": {
            r: None if t.first_decision_at is None
            else round(t.first_decision_at - self.started_at, 1)
            for r, t in self.tallies.items()}}

    def write_audit(self) -> None:
        """``audit.json``: per retailer, the written transactions without a decision and
        those with two different ones; what the FL topics carried."""
        audit: dict[str, Any] = {"retailers": {}, "fl_enabled": self.fl_enabled,
                                 "faults": self.fault_events, "restarts": dict(self.restarts),
                                 "restart_events": self.restart_events}
        with self.lock:
            audit["startup"] = self.startup()
            for r, t in self.tallies.items():
                written = {tx for tx in self.written.get(r, set()) if not tx.startswith("bad-")}
                missing = sorted(written - set(t.decisions))
                audit["retailers"][r] = {
                    "written": len(written), "decided": len(t.decisions),
                    "decided_not_written": len(set(t.decisions) - written),
                    "missing": len(missing), "missing_sample": missing[:20],
                    "conflicting": len(t.conflicting), "conflicting_sample": t.conflicting[:20],
                    "redelivered": t.redelivered,
                }
            if self.settings.hostile:
                audit["hostile"] = self.hostile_audit()
            fl = self.fl
            audit["fl"] = {
                "updates": fl.updates, "updates_opened": fl.updates_opened,
                "updates_refused": fl.updates_refused[:20], "globals": fl.globals,
                "globals_verified": fl.globals_verified, "globals_refused": fl.globals_refused[:20],
                "round": fl.round, "version": fl.version,
                "contributors": dict(fl.contributors),
            }
        (self.root / "audit.json").write_text(json.dumps(audit, indent=2) + "\n")

    def wait_for_workers(self, timeout: float = 180.0) -> None:
        """Until each retailer's worker holds its partitions: what is committed before would
        wait for the workers' start, and its latency would be theirs."""
        deadline = time.monotonic() + timeout
        waiting = dict(self.metrics_ports)
        while True:
            self.check_children()
            waiting = {r: p for r, p in waiting.items() if not worker_ready(p, r)}
            if not waiting or self.stop_requested.is_set():
                return
            if time.monotonic() > deadline:
                raise DemoError(f"workers not ready after {timeout:g} s: {', '.join(waiting)}; "
                                f"logs in {self.root / 'logs'}")
            self.stop_requested.wait(0.3)

    def check_children(self) -> None:
        for name, proc in list(self.children.items()):
            if proc.poll() is None or name == "ui":
                continue
            if self.settings.faults:  # supervised, as a container runtime would
                now = time.monotonic()
                if now - self.restarted_at.get(name, 0.0) >= 3.0:  # not in a tight loop
                    self.restarted_at[name] = now
                    self.restarts[name] += 1
                    self.restart_events.append({
                        "role": name, "code": proc.returncode,
                        "at_s": round(now - self.writing_started, 1)})
                    self.say(f"{name} exited with code {proc.returncode}: starting it again")
                    self.spawn(name, self.child_args[name])
            else:
                log = self.root / "logs" / f"{name}.log"
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
                raise DemoError(f"{name} exited with code {proc.returncode}; {log}:\n{tail}")

    def shutdown(self) -> None:
        # a second Ctrl-C must not cut the cleanup short and leave processes behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.reporting_done.set()
        for proc in self.children.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.children.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.stack is not None:
            self.stack.down()
        self.say("demo stopped; every process it started has exited")
