"""The end-to-end demo: two retailers' databases -> CDC -> Kafka -> workers -> decisions.

``acme`` runs MariaDB (a binlog CDC source), ``globex`` runs a MongoDB server (a change-stream
source). Generated purchases are committed into each database at a steady rate; labels
(analyst verdicts, chargebacks) follow on ``<R>.labels`` as the replayed clock passes their
time; the demo watches ``<R>.decisions`` and prints what the workers decide and how fast.

The demo runs on a stack of its own (free ports, under ``.qsfraud/demo/``, wiped at start) so
that each run starts from empty topics, tables and models, and it stops everything it started.
"""

from __future__ import annotations

import contextlib
import json
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

from fraud.generator import GeneratorConfig, generate
from fraud.metrics import average_precision, roc_auc
from fraud.schema import Label
from fraud.topics import DEFAULT_PARTITIONS, RetailerTopics
from qsfraud.stack import APP_USER, CDC_USER, DATABASE, Stack, StackConfig, free_port
from qsfraud.stack.service import port_is_free
from qsfraud.worker_process import worker_ready

ORDERS = "orders"


class DemoError(Exception):
    """A role of the demo failed; the message says which and shows its log's tail."""


@dataclass(frozen=True)
class DemoSettings:
    root: Path = Path(".qsfraud/demo")
    rate: float = 200.0  # purchases committed per second, both retailers together
    duration: float = 0.0  # seconds; 0 runs until Ctrl-C
    days: int = 30
    tx_per_day: int = 1500
    seed: int = 7
    report_every: float = 2.0
    ui_port: int | None = 8501  # the UI (`qsfraud ui`) on this port, or a free one; None: no UI


class OrdersDatabase(ABC):
    """A retailer's own order store, which the demo writes to and CDC reads from."""

    @abstractmethod
    def reset(self) -> None: ...

    @abstractmethod
    def insert(self, rows: list[dict[str, Any]]) -> None:
        """Commit ``rows`` (generator rows) as one database transaction."""

    @abstractmethod
    def cdc_config(self, retailer: str, bootstrap: str) -> str:
        """The ``qsfraud cdc run`` TOML for this database."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def cdc_toml(retailer: str, bootstrap: str, source: str, fields: str) -> str:
    """A ``qsfraud cdc run`` config: the source's own settings and field mapping, the rest
    shared (columns named alike in both databases are mapped here)."""
    return f"""\
retailer = "{retailer}"
metrics_interval_s = 10

[source]
{source}
[kafka]
bootstrap_servers = "{bootstrap}"
partitions = {DEFAULT_PARTITIONS}
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
    """``shop.orders`` in MariaDB; device and IP live in a JSON column, as in many shops."""

    def __init__(self, host: str, port: int) -> None:
        import mysql.connector

        self.host, self.port = host, port
        self.conn = mysql.connector.connect(host=host, port=port, user=APP_USER.user,
                                            password=APP_USER.password, database=DATABASE)

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
        self.conn.commit()

    def insert(self, rows: list[dict[str, Any]]) -> None:
        cur = self.conn.cursor()
        cur.executemany(
            f"INSERT INTO {ORDERS} VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            [(r["tx_id"], r["customer_id"], r["payment_instrument"],
              Decimal(str(r["amount"])).quantize(Decimal("0.01")), r["currency"],
              _utc(r["occurred_at"]).replace(tzinfo=None), r["channel"], r["store_id"],
              r["terminal_id"], r["coupon_code"], r["item_count"], int(r["address_mismatch"]),
              json.dumps({"device": {"id": r["device_id"]}, "ip": r["ip"]}))
             for r in rows],
        )
        self.conn.commit()

    def cdc_config(self, retailer: str, bootstrap: str) -> str:
        source = f"""\
kind = "mysql"
id = "{retailer}-orders"
snapshot = "initial"
on_history_lost = "fail"
host = "{self.host}"
port = {self.port}
user = "{CDC_USER.user}"
password = "{CDC_USER.password}"
database = "{DATABASE}"
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
        return cdc_toml(retailer, bootstrap, source, fields)

    def close(self) -> None:
        self.conn.close()


class MongoOrders(OrdersDatabase):
    """``shop.orders`` documents with nested customer, payment and device sub-documents."""

    def __init__(self, uri: str) -> None:
        import pymongo

        self.uri = uri
        self.client: Any = pymongo.MongoClient(uri)
        self.coll = self.client[DATABASE][ORDERS]

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
        ], ordered=True)

    def cdc_config(self, retailer: str, bootstrap: str) -> str:
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
        return cdc_toml(retailer, bootstrap, source, fields)

    def close(self) -> None:
        self.client.close()


@dataclass
class RetailerTally:
    """What the demo has seen for one retailer."""

    committed: int = 0
    labels: int = 0
    decided: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    fraud_actions: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    truth: list[int] = field(default_factory=list)


class DecisionWatcher(threading.Thread):
    """Reads ``<R>.decisions`` (read_committed) and tallies them against the ground truth."""

    def __init__(self, bootstrap: str, retailers: list[str], truth: dict[str, bool],
                 commit_times: dict[str, float], tallies: dict[str, RetailerTally],
                 lock: threading.Lock) -> None:
        super().__init__(name="decision-watcher", daemon=True)
        from confluent_kafka import Consumer

        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"qsfraud-demo-{os.getpid()}",
            "auto.offset.reset": "earliest", "isolation.level": "read_committed",
            "enable.auto.commit": False,
            # the workers create <R>.decisions when they start: notice it quickly
            "topic.metadata.refresh.interval.ms": 1000,
        })
        self.consumer.subscribe([RetailerTopics(r).decisions for r in retailers])
        self.truth, self.tallies, self.lock = truth, tallies, lock
        self.commit_times = commit_times
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            for msg in self.consumer.consume(500, timeout=0.2):
                if msg.error() is not None:
                    continue
                try:
                    d = json.loads(msg.value() or b"")
                except (TypeError, ValueError):
                    continue
                self.record(d)
        self.consumer.close()

    def record(self, d: dict[str, Any]) -> None:
        tally = self.tallies.get(str(d.get("retailer_id")))
        if tally is None:
            return
        decided = (d.get("timings") or {}).get("decided")
        tx_id = str(d.get("tx_id"))
        with self.lock:
            tally.decided += 1
            tally.actions[str(d.get("action"))] += 1
            # from the demo's own commit, not the decision's `committed`: the binlog's event
            # times are whole seconds, which made acme's latency look ~0.5 s longer
            committed = self.commit_times.pop(tx_id, None)
            if committed is not None and isinstance(decided, int | float):
                tally.latencies_ms.append((decided - committed) * 1000)
            is_fraud = self.truth.get(tx_id)
            if is_fraud is not None:
                tally.scores.append(float(d.get("score", 0.0)))
                tally.truth.append(int(is_fraud))
                if is_fraud:
                    tally.fraud_actions[str(d.get("action"))] += 1


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary_line(name: str, t: RetailerTally) -> str:
    auc = roc_auc(t.truth, t.scores) if 0 < sum(t.truth) < len(t.truth) else float("nan")
    ap = average_precision(t.truth, t.scores) if sum(t.truth) else float("nan")
    acts = " ".join(f"{a}={t.actions.get(a, 0)}" for a in ("allow", "verify", "hold", "block"))
    caught = sum(t.fraud_actions[a] for a in ("verify", "hold", "block"))
    frauds = sum(t.fraud_actions.values())
    return (f"{name:7} committed={t.committed} decided={t.decided} labels={t.labels} {acts} | "
            f"fraud stopped {caught}/{frauds} | AUC={auc:.3f} AP={ap:.3f} | commit->decision "
            f"p50={_percentile(t.latencies_ms, 0.5):.0f} ms "
            f"p99={_percentile(t.latencies_ms, 0.99):.0f} ms")


class Demo:
    """Starts the stack and the roles, replays purchases and labels, reports, and cleans up."""

    RETAILERS = ("acme", "globex")

    def __init__(self, settings: DemoSettings, out: TextIO = sys.stdout) -> None:
        self.settings = settings
        self.out = out
        self.root = settings.root.resolve()
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stack: Stack | None = None
        self.lock = threading.Lock()
        self.tallies = {r: RetailerTally() for r in self.RETAILERS}
        self.truth: dict[str, bool] = {}
        self.commit_times: dict[str, float] = {}  # tx_id -> when its COMMIT returned
        self.stop_requested = threading.Event()

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self) -> int:
        previous = signal.signal(signal.SIGTERM, lambda *_: self.stop_requested.set())
        try:
            self._run()
        except KeyboardInterrupt:
            self.say("\nstopping (Ctrl-C)...")
        finally:
            self.shutdown()
            signal.signal(signal.SIGTERM, previous)
        return 0

    def _run(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        (self.root / "logs").mkdir(parents=True)
        self.stack = Stack(StackConfig.ephemeral(self.root / "stack"))
        t0 = time.monotonic()
        self.stack.up()
        bootstrap = self.stack.kafka.bootstrap
        self.say(f"stack ready in {time.monotonic() - t0:.1f} s: kafka {bootstrap}, mariadb "
                 f"{self.stack.mariadb.host}:{self.stack.mariadb.port}, mongo "
                 f"{self.stack.mongo.uri}")
        databases: dict[str, OrdersDatabase] = {
            "acme": MariaDBOrders(self.stack.mariadb.host, self.stack.mariadb.port),
            "globex": MongoOrders(self.stack.mongo.uri),
        }
        try:
            ports: dict[str, int] = {}
            for retailer, db in databases.items():
                db.reset()
                config = self.root / f"cdc-{retailer}.toml"
                config.write_text(db.cdc_config(retailer, bootstrap))
                self.spawn(f"cdc-{retailer}", ["cdc", "run", "--config", str(config)])
                ports[retailer] = free_port()
                self.spawn(f"worker-{retailer}", [
                    "worker", "--retailer", retailer, "--bootstrap", bootstrap,
                    "--web-port", str(ports[retailer]), "--datadir", str(self.root / "streams"),
                    "--loglevel", "warn",
                ])
            self.say("started: " + ", ".join(f"{n} (pid {p.pid})"
                                              for n, p in self.children.items())
                     + f"; logs in {self.root / 'logs'}")
            t0 = time.monotonic()
            self.wait_for_workers(ports)
            self.say(f"workers ready in {time.monotonic() - t0:.1f} s")
            self.start_ui(bootstrap, ports)
            watcher = DecisionWatcher(bootstrap, list(self.RETAILERS), self.truth,
                                      self.commit_times, self.tallies, self.lock)
            watcher.start()
            try:
                self.replay(databases, bootstrap)
            finally:
                watcher.stopping.set()
                watcher.join(5)
        finally:
            for db in databases.values():
                db.close()

    def spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / "logs" / f"{name}.log", "wb")  # noqa: SIM115 (owned by the child)
        self.children[name] = subprocess.Popen(
            [sys.executable, "-m", "qsfraud", *args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()

    def start_ui(self, bootstrap: str, ports: dict[str, int]) -> None:
        """The analysts' UI on this demo's Kafka and workers (a crash of it stops nothing)."""
        if self.settings.ui_port is None:
            return
        port = self.settings.ui_port if port_is_free("127.0.0.1", self.settings.ui_port) \
            else free_port()
        self.spawn("ui", ["ui", "--bootstrap", bootstrap, "--port", str(port),
                          *(f"--metrics=127.0.0.1:{p}" for p in ports.values())])
        self.say(f"UI: http://127.0.0.1:{port}")

    def rows(self) -> Iterator[dict[str, Any]]:
        s = self.settings
        names = dict(zip((f"retailer_{i + 1}" for i in range(2)), self.RETAILERS, strict=True))
        cfg = GeneratorConfig(retailers=2, days=s.days, seed=s.seed, tx_per_day=s.tx_per_day)
        for row in generate(cfg):
            row["retailer_id"] = names[row["retailer_id"]]
            yield row

    def replay(self, databases: dict[str, OrdersDatabase], bootstrap: str) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        pending_labels: list[tuple[float, dict[str, Any]]] = []
        tick = 0.1
        per_tick = max(1, round(self.settings.rate * tick))
        started = next_report = time.monotonic()
        rows = self.rows()
        exhausted = False
        while not self.stop_requested.is_set():
            now = time.monotonic()
            if self.settings.duration and now - started >= self.settings.duration:
                break
            self.check_children()
            batch: dict[str, list[dict[str, Any]]] = {r: [] for r in self.RETAILERS}
            for row in rows:
                batch[row["retailer_id"]].append(row)
                if row.get("labelled_at") is not None:
                    pending_labels.append((float(row["labelled_at"]), row))
                if sum(map(len, batch.values())) >= per_tick:
                    break
            else:
                exhausted = True
            clock = 0.0
            for retailer, retailer_rows in batch.items():
                if retailer_rows:
                    databases[retailer].insert(retailer_rows)
                    committed = time.time()
                    clock = max(clock, retailer_rows[-1]["occurred_at"])
                    with self.lock:
                        for r in retailer_rows:
                            self.truth[r["tx_id"]] = bool(int(r["is_fraud"]))
                            self.commit_times[r["tx_id"]] = committed
                        self.tallies[retailer].committed += len(retailer_rows)
            pending_labels = self.send_due_labels(producer, pending_labels, clock)
            if now >= next_report:
                self.report()
                next_report = now + self.settings.report_every
            if exhausted:
                self.say("all generated purchases committed; Ctrl-C stops")
                rows = iter(())
            time.sleep(max(0.0, tick - (time.monotonic() - now)))
        producer.flush(10)
        self.report()

    def send_due_labels(self, producer: Any, pending: list[tuple[float, dict[str, Any]]],
                        clock: float) -> list[tuple[float, dict[str, Any]]]:
        keep = []
        for due, row in pending:
            if due > clock:
                keep.append((due, row))
                continue
            label = Label(tx_id=row["tx_id"], is_fraud=bool(int(row["is_fraud"])),
                          source=row.get("label_source") or "chargeback", labelled_at=due,
                          retailer_id=row["retailer_id"])
            producer.produce(RetailerTopics(row["retailer_id"]).labels, key=row["customer_id"],
                             value=label.to_json())
            self.tallies[row["retailer_id"]].labels += 1
        producer.poll(0)
        return keep

    def report(self) -> None:
        with self.lock:
            lines = [summary_line(name, t) for name, t in self.tallies.items()]
        for line in lines:
            self.say(line)

    def wait_for_workers(self, ports: dict[str, int], timeout: float = 120.0) -> None:
        """Until each retailer's worker (metrics on ``ports[retailer]``) holds its partitions:
        what is committed before would wait for the workers' start, and its latency would
        be theirs."""
        deadline = time.monotonic() + timeout
        waiting = dict(ports)
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
        for name, proc in self.children.items():
            if proc.poll() is not None and name != "ui":
                log = self.root / "logs" / f"{name}.log"
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
                raise DemoError(f"{name} exited with code {proc.returncode}; {log}:\n{tail}")

    def shutdown(self) -> None:
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
