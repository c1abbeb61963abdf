"""Federated learning end to end on real Kafka: three retailers' real worker processes and the
aggregator process; rounds, kill -9 of the aggregator mid-round and of a worker, and the
privacy audit of every record on both FL topics."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from fl.client import GlobalModel, open_global, open_update
from fl.watchlist import entity_key, new_key, seal_watch_key
from pqc.envelope import read_header
from pqc.freshness import InMemoryFreshness
from pqc.keys import public_bundle
from qsfraud.worker_process import WorkerProcess
from streams.config_stream import ConfigDocument, sign_config
from tests.fl.conftest import Federation
from tests.fl.test_aggregator import AggregatorProcess, Topics, published

pytestmark = pytest.mark.integration
LABELS_PER_ROUND = 40
SYNC_LABELS = 30


def transaction(retailer: str, i: int) -> dict[str, Any]:
    """Identifiers and amounts distinctive enough to be searched for in the FL payloads."""
    fraud = i % 5 == 0
    amount = round((912.37 if fraud else 23.11) + (i * 7.13) % 97, 2)
    if amount == int(amount):  # never a whole number: the audit would find it in a count
        amount += 0.01  # (a round's "examples": 110 is not the amount 110.00 leaking)
    return {"tx_id": f"{retailer}-tx-{i}", "retailer_id": retailer,
            "amount": amount,
            "customer_id": f"cust-{retailer}-{i % 17}", "payment_instrument": f"card-{i % 19}",
            "device_id": f"dev-{i % 13}-{retailer}", "ip": f"10.77.{i % 200}.{i % 11}",
            "occurred_at": 1767225600.0 + i * 30}


def produce(bootstrap: str, topic: str, records: list[tuple[str, dict[str, Any]]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    for key, value in records:
        p.produce(topic, key=key.encode(), value=json.dumps(value).encode())
    assert p.flush(30) == 0


def count_records(bootstrap: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "fl-e2e-count"})
    try:
        total = 0
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        for partition in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)
            total += high - low
        return total
    finally:
        consumer.close()


def every_record(bootstrap: str, topic: str) -> list[bytes | None]:
    """Every record of the one-partition ``topic``, aborted ones too (read_uncommitted)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "fl-e2e-audit",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "isolation.level": "read_uncommitted"})
    out: list[bytes | None] = []
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        while True:
            msg = consumer.poll(10)
            assert msg is not None, f"reading {topic} timed out"
            err = msg.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, err
                return out
            out.append(msg.value())
    finally:
        consumer.close()


def gauge(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric on a /metrics page."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


class Federated:
    """Three retailers' workers with FL on, their inputs, and the aggregator."""

    def __init__(self, bootstrap: str, federation: Federation, topics: Topics, root: Path,
                 unique: str, *extra: str, per_worker: list[list[str]] | None = None) -> None:
        self.bootstrap = bootstrap
        self.federation = federation
        self.topics = topics
        self.root = root
        bundle = root / "aggregator.json"
        bundle.write_text(json.dumps(public_bundle(federation.aggregator)))
        self.retailers = [f"{unique}-r{i}" for i in range(3)]
        self.workers = [
            WorkerProcess(bootstrap, retailer, root / f"w{i}", "--checkpoint-interval", "1",
                          "--config-topic", f"{unique}.config",
                          "--fl-identity", str(federation.retailers[i].path),
                          "--fl-aggregator", str(bundle),
                          "--fl-trust", str(federation.retailers[i].path / "registry.json"),
                          "--fl-sync-labels", str(SYNC_LABELS),
                          "--fl-updates-topic", topics.updates,
                          "--fl-global-topic", topics.globals, *extra,
                          *(per_worker[i] if per_worker else []))
            for i, retailer in enumerate(self.retailers)]
        self.config_topic = f"{unique}.config"
        for worker in self.workers:
            worker.workdir.mkdir(parents=True, exist_ok=True)
        self.aggregators: list[AggregatorProcess] = []
        self.inputs: list[dict[str, Any]] = []
        self.next_tx = [0, 0, 0]

    def start_aggregator(self, quorum: int = 3, *extra: str) -> AggregatorProcess:
        agg = AggregatorProcess(self.bootstrap, self.federation, self.topics,
                                self.root / f"aggregator-{len(self.aggregators)}.log",
                                "--quorum", str(quorum), "--deadline", "60",
                                "--freshness", str(self.root / "agg-freshness.json"), *extra)
        self.aggregators.append(agg)
        return agg

    def start_workers(self) -> None:
        """Every worker started at once, then each waited for."""
        for worker in self.workers:
            worker.start(wait=False)
        for worker in self.workers:
            worker.wait_ready(120)

    def purchase(self, retailer: str, tx: dict[str, Any]) -> dict[str, Any]:
        """``tx`` written to ``retailer``'s input; its decision, once made."""
        self.inputs.append(tx)
        produce(self.bootstrap, f"{retailer}.transactions", [(tx["customer_id"], tx)])
        return decision_of(self.bootstrap, retailer, tx["tx_id"])

    def globals(self) -> list[GlobalModel]:
        """Every global model published so far, opened as retailer 0 does (one freshness:
        none published twice)."""
        registry, fresh = self.federation.retailers[0].registry, InMemoryFreshness()
        return [open_global(blob, registry, fresh)
                for blob in every_record(self.bootstrap, self.topics.globals) if blob]

    def feed(self, index: int, n: int = LABELS_PER_ROUND) -> None:
        """``n`` transactions to retailer ``index``; once all are decided, their labels."""
        retailer = self.retailers[index]
        start = self.next_tx[index]
        self.next_tx[index] += n
        txs = [transaction(retailer, i) for i in range(start, start + n)]
        self.inputs.extend(txs)
        produce(self.bootstrap, f"{retailer}.transactions",
                [(tx["customer_id"], tx) for tx in txs])
        deadline = time.monotonic() + 90
        while count_records(self.bootstrap, f"{retailer}.decisions") < self.next_tx[index]:
            assert time.monotonic() < deadline, self.workers[index].log_tail()
            time.sleep(0.3)
        produce(self.bootstrap, f"{retailer}.labels", [
            (tx["tx_id"], {"tx_id": tx["tx_id"], "is_fraud": tx["amount"] > 500,
                           "source": "chargeback", "labelled_at": time.time()})
            for tx in txs])

    def wait_round(self, index: int, round_: int, timeout: float = 60.0) -> None:
        """Until worker ``index`` folded in the global model of ``round_``."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.workers[index].metrics()
            if gauge(text, "qsfraud_fl_global_round").get(
                    f'{{retailer="{self.retailers[index]}"}}', 0) >= round_:
                return
            assert time.monotonic() < deadline, self.workers[index].log_tail()
            time.sleep(0.3)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        for agg in self.aggregators:
            agg.stop()


@pytest.fixture
def make_federated(kafka_bootstrap: str, federation: Federation, unique_name: str,
                   tmp_path: Path) -> Iterator[Callable[..., Federated]]:
    made: list[Federated] = []

    def make(*extra: str, per_worker: list[list[str]] | None = None) -> Federated:
        unique = unique_name[-24:].strip("_")
        topics = Topics(f"{unique}.fl.updates", f"{unique}.fl.global", f"{unique}-agg")
        made.append(Federated(kafka_bootstrap, federation, topics, tmp_path, unique, *extra,
                              per_worker=per_worker))
        return made[-1]

    yield make
    for setup in made:
        setup.stop()


@pytest.fixture
def federated(make_federated: Callable[..., Federated]) -> Federated:
    return make_federated()


def test_three_workers_federate_through_kafka_and_nothing_private_leaves(
    federated: Federated, federation: Federation, kafka_bootstrap: str
) -> None:
    fed = federated
    agg = fed.start_aggregator()
    fed.start_workers()

    for round_ in (1, 2):
        for i in range(3):
            fed.feed(i)
        agg.wait_for(lambda ev, n=round_: len(published(ev)) >= n, timeout=90)
        for i in range(3):
            fed.wait_round(i, round_)

    # round 3: two updates accepted, then kill -9; the restarted aggregator reads them again
    fed.feed(0)
    fed.feed(1)
    agg.wait_for(lambda ev: sum(1 for e in ev if e.get("event") == "accepted"
                                and e.get("round") == 3) >= 2, timeout=60)
    agg.process.kill()
    agg.process.wait(10)
    assert not [e for e in published(agg.events()) if e["round"] == 3]
    again = fed.start_aggregator()
    fed.feed(2)
    again.wait_for(lambda ev: len(published(ev)) >= 1, timeout=90)
    for i in range(3):
        fed.wait_round(i, 3)

    # round 4 after kill -9 of a worker: its sequence numbers go on increasing (nothing is
    # refused as a replay) and its checkpoint already holds round 3 (not folded in again)
    time.sleep(2)  # a checkpoint a second: one after the fold-in
    fed.workers[0].kill()
    fed.workers[0].start(wait=True)
    fed.wait_round(0, 3)
    for i in range(3):
        fed.feed(i)
    again.wait_for(lambda ev: len(published(ev)) >= 2, timeout=90)
    for i in range(3):
        fed.wait_round(i, 4)
    assert not [e for e in again.events() if e.get("event") == "refused"], again.events()
    assert "already in the model" in fed.workers[0].log_tail(100_000)

    globals_ = fed.globals()
    assert [g.round for g in globals_] == [1, 2, 3, 4]  # each round published once
    assert all(g.contributors == tuple(f"retailer-{i}" for i in range(3)) for g in globals_)
    assert [g.parent_version for g in globals_] == [None, *(g.version for g in globals_[:-1])]
    latest = globals_[-1].version
    for i, worker in enumerate(fed.workers):
        text = worker.metrics()
        retailer = fed.retailers[i]
        assert gauge(text, "qsfraud_fl_global_info") == {
            f'{{retailer="{retailer}",version="{latest}"}}': 1.0}
        model = gauge(text, "qsfraud_model_info")
        assert [k for k in model if f'version="{latest}+' in k], model  # the model itself
        sent = gauge(text, "qsfraud_fl_updates_total")[f'{{retailer="{retailer}"}}']
        assert sent == (1 if i == 0 else 4)  # the restarted worker's count starts again
        assert not [k for k in gauge(text, "qsfraud_fl_globals_total") if "refused" in k]

    audit_privacy(fed, federation, kafka_bootstrap, globals_)


def audit_privacy(fed: Federated, federation: Federation, bootstrap: str,
                  globals_: list[GlobalModel], rounds: int = 4) -> list[str]:
    """Every record on both topics is a sealed (updates) or signed (global) envelope, and no
    identifier or amount of the input appears in any payload once opened; the payloads."""
    updates = every_record(bootstrap, fed.topics.updates)
    assert len(updates) == 3 * rounds  # 3 retailers x the rounds, nothing else
    payloads: list[str] = []
    for blob in updates:
        assert blob is not None
        assert not read_header(blob).is_document  # sealed: encrypted to the aggregator
        update = open_update(blob, federation.aggregator.kem, federation.aggregator.registry,
                             InMemoryFreshness())
        payloads.append(json.dumps(update.to_wire()))
    for blob in every_record(bootstrap, fed.topics.globals):
        assert blob is not None and read_header(blob).is_document  # signed by the aggregator
    payloads.extend(json.dumps(g.to_wire()) for g in globals_)
    assert len(fed.inputs) >= 3 * rounds * LABELS_PER_ROUND
    identifiers = {tx[field] for tx in fed.inputs
                   for field in ("tx_id", "customer_id", "payment_instrument", "device_id", "ip")}
    amounts = {float(tx["amount"]) for tx in fed.inputs}
    for payload in payloads:
        for identifier in identifiers:
            assert identifier not in payload, f"{identifier} leaked into an FL payload"
        numbers = {float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", payload)}
        assert not numbers & amounts, f"amounts {sorted(numbers & amounts)[:5]} leaked"
        assert "card-" not in payload and "cust-" not in payload and "10.77." not in payload
    return payloads


RIVER_LINEAR = [{"class": "preprocessing.StandardScaler"},
                {"class": "linear_model.LogisticRegression"}]


def test_a_river_pipeline_federates_through_the_worker(
    make_federated: Callable[..., Federated], federation: Federation, kafka_bootstrap: str
) -> None:
    fed = make_federated("--trust", str(federation.admin.path / "registry.json"))
    river = fed.workers[0]
    doc = ConfigDocument.default().updated({"river_model": RIVER_LINEAR}, version=1,
                                           scope=fed.retailers[0])
    produce_raw(kafka_bootstrap, fed.config_topic, fed.retailers[0].encode(),
                sign_config(doc, federation.admin.identity))
    agg = fed.start_aggregator(quorum=1)
    river.start(wait=True)
    for round_ in (1, 2):
        fed.feed(0)
        agg.wait_for(lambda ev, n=round_: len(published(ev)) >= n, timeout=90)
        fed.wait_round(0, round_)
    globals_ = fed.globals()
    assert [g.round for g in globals_] == [1, 2]
    assert [g.examples for g in globals_] == [LABELS_PER_ROUND] * 2  # each label once
    assert any(name.startswith("f/") for name in globals_[-1].parameters)
    text = river.metrics()
    model = gauge(text, "qsfraud_model_info")
    assert [k for k in model if f'version="{globals_[-1].version}+' in k], model
    assert not [k for k in gauge(text, "qsfraud_fl_globals_total") if "refused" in k]
    log = river.log_tail(100_000)
    assert log.count("folded into the RiverModel with mix") == 2, log


def produce_raw(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    p = Producer({"bootstrap.servers": bootstrap})
    p.produce(topic, key=key, value=value)
    assert p.flush(30) == 0


def sealed_watch_keys(tmp_path: Path, federation: Federation, key: bytes, sequence: int,
                      *flags: str) -> list[list[str]]:
    """Each retailer's worker flags: the consortium key sealed to it by the admin (never to
    the aggregator), then ``flags``."""
    sealed = []
    for i, store in enumerate(federation.retailers):
        path = tmp_path / f"watch-key-{i}.sealed"
        path.write_bytes(seal_watch_key(key, federation.admin.identity, store.registry
                                        .current_kem_key(store.identity.name), sequence + i))
        sealed.append(["--fl-watch-key", str(path), *flags])
    return sealed


def decision_of(bootstrap: str, retailer: str, tx_id: str,
                timeout: float = 90.0) -> dict[str, Any]:
    """The decision record of ``tx_id`` on ``<retailer>.decisions``, once there."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"fl-e2e-{tx_id}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    deadline = time.monotonic() + timeout
    try:
        consumer.subscribe([f"{retailer}.decisions"])
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            decision: dict[str, Any] = json.loads(msg.value())
            if decision.get("tx_id") == tx_id:
                return decision
        raise AssertionError(f"no decision for {tx_id} on {retailer}.decisions")
    finally:
        consumer.close()


def test_a_card_one_retailer_held_is_held_at_the_next_and_the_union_survives_a_restart(
    make_federated: Callable[..., Federated], federation: Federation, kafka_bootstrap: str,
    tmp_path: Path
) -> None:
    key = new_key()  # an admin seals the consortium key to each retailer (never the aggregator)
    sealed = sealed_watch_keys(tmp_path, federation, key, 100)
    fed = make_federated("--trust", str(federation.admin.path / "registry.json"),
                         per_worker=sealed)
    # retailer A's own policy holds a large purchase (a rule: deterministic, unlike a score)
    doc = ConfigDocument.default().updated(
        {"rules": [{"name": "large", "field": "amount", "op": ">", "value": 5000,
                    "action": "hold"}]}, version=1, scope=fed.retailers[0])
    produce_raw(kafka_bootstrap, fed.config_topic, fed.retailers[0].encode(),
                sign_config(doc, federation.admin.identity))
    state = tmp_path / "agg-watchlist.json"
    agg = fed.start_aggregator(3, "--watchlist-state", str(state))
    fed.start_workers()

    a, b = fed.retailers[0], fed.retailers[1]
    stolen = {**transaction(a, 9000), "tx_id": f"{a}-stolen-1", "amount": 7777.77,
              "payment_instrument": "card-stolen-777", "device_id": "dev-fraud-777"}
    held = fed.purchase(a, stolen)
    assert held["action"] == "hold" and "rule:large" in held["reasons"], held
    for i in range(3):
        fed.feed(i)
    agg.wait_for(lambda ev: len(published(ev)) >= 1, timeout=90)
    for i in range(3):
        fed.wait_round(i, 1)

    # retailer B, next purchase with that card (a small one its model would allow)
    at_b = {**transaction(b, 9001), "tx_id": f"{b}-stolen-2", "amount": 23.57,
            "payment_instrument": "card-stolen-777", "device_id": f"dev-other-{b}"}
    decision = fed.purchase(b, at_b)
    assert decision["action"] == "hold", decision
    assert decision["reasons"][0] == "watchlist:instrument reported by 1 other retailer"
    # A's own report does not count as another retailer's
    again = {**transaction(a, 9002), "tx_id": f"{a}-stolen-3", "amount": 21.13,
             "payment_instrument": "card-stolen-777", "device_id": f"dev-again-{a}"}
    assert not any(r.startswith("watchlist:") for r in fed.purchase(a, again)["reasons"])

    # kill -9 the aggregator: the restarted one still lists the card (its state file), though
    # nobody reports it again (B's hold was the watchlist's, never re-reported)
    agg.process.kill()
    agg.process.wait(10)
    again_agg = fed.start_aggregator(3, "--watchlist-state", str(state))
    for i in range(3):
        fed.feed(i)
    again_agg.wait_for(lambda ev: len(published(ev)) >= 1, timeout=90)
    globals_ = fed.globals()
    assert [g.round for g in globals_] == [1, 2]
    card, device = (entity_key(key, "instrument", "card-stolen-777"),
                    entity_key(key, "device", "dev-fraud-777"))
    for published_model in globals_:  # (other holds of the models may be listed too)
        assert (published_model.watchlist[card], published_model.watchlist[device]) == (1, 1)
    text = fed.workers[1].metrics()
    assert gauge(text, "qsfraud_fl_watch_holds_total")[f'{{retailer="{b}"}}'] >= 1

    payloads = audit_privacy(fed, federation, kafka_bootstrap, globals_, rounds=2)
    assert any(card in p for p in payloads)  # the hash travels, the card never does


def test_a_device_new_at_one_retailer_is_held_where_it_is_new_next(
    make_federated: Callable[..., Federated], federation: Federation, kafka_bootstrap: str,
    tmp_path: Path
) -> None:
    key = new_key()
    # min score 0: the model's score of one row is not the point here (the rule's threshold
    # is tests/streams/test_fl_sync.py's)
    sealed = sealed_watch_keys(tmp_path, federation, key, 200, "--fl-watch-new-devices",
                               "--fl-watch-new-min-score", "0")
    fed = make_federated("--trust", str(federation.admin.path / "registry.json"),
                         per_worker=sealed)
    agg = fed.start_aggregator(3, "--watchlist-state", str(tmp_path / "agg-watchlist.json"))
    fed.start_workers()

    a, b = fed.retailers[0], fed.retailers[1]
    first = {**transaction(a, 9000), "tx_id": f"{a}-phone-1", "amount": 31.37,
             "payment_instrument": "card-stolen-555", "device_id": "dev-fraud-new-555"}
    fed.purchase(a, first)  # new at A: reported with A's update
    for i in range(3):
        fed.feed(i)
    agg.wait_for(lambda ev: len(published(ev)) >= 1, timeout=90)
    for i in range(3):
        fed.wait_round(i, 1)

    at_b = {**transaction(b, 9001), "tx_id": f"{b}-phone-2", "amount": 23.57,
            "payment_instrument": "card-stolen-556", "device_id": "dev-fraud-new-555"}
    decision = fed.purchase(b, at_b)
    assert decision["action"] == "hold", decision
    assert decision["reasons"][0] == "watchlist:device new at 1 other retailer"
    # at A the device is new too, but only A listed it: its own report is not another's
    again = {**transaction(a, 9002), "tx_id": f"{a}-phone-3", "amount": 21.13,
             "payment_instrument": "card-stolen-557", "device_id": "dev-fraud-new-555"}
    assert not any(r.startswith("watchlist:") for r in fed.purchase(a, again)["reasons"])

    globals_ = fed.globals()
    assert [g.round for g in globals_] == [1]
    phone = entity_key(key, "device", "dev-fraud-new-555")
    assert globals_[0].new_devices[phone] == 1
    assert phone not in globals_[0].watchlist  # nobody held it: a new device, not a report
    # the aggregator keeps the new-device union beside its watchlist state (for a restart)
    kept = json.loads((tmp_path / "agg-watchlist.json.new-devices").read_text())
    assert set(kept["entries"][phone]) == {federation.retailers[0].identity.name}
    text = fed.workers[1].metrics()
    assert gauge(text, "qsfraud_fl_watch_holds_total")[f'{{retailer="{b}"}}'] >= 1

    payloads = audit_privacy(fed, federation, kafka_bootstrap, globals_, rounds=1)
    assert any(phone in p for p in payloads)  # the hash travels, the device never does
