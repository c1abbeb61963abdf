"""``qsfraud bench fl``: one federated round for 5 retailers on real Kafka, part by part.

Each retailer holds a :class:`~fraud.models.RiskModel` trained on its own synthetic labelled
vectors (the worker's feature names, fraud shifted differently per retailer). A round is what
happens in production, with the same code the worker (:mod:`streams.fl_sync`) and the
aggregator (:mod:`fl.aggregator`) run:

- ``seal``: each retailer's update (:func:`fl.client.update_from_model`) sealed to the
  aggregator's KEM key and signed by the retailer;
- ``publish_updates``: the 5 sealed updates produced to the updates topic (acks=all), until
  acknowledged;
- ``aggregate``: the aggregator's consumer reads them, opens and checks each
  (:meth:`fl.aggregator.Aggregator.offer`), FedAvg over them (:class:`fl.aggregator.Round`),
  and signs the global model;
- ``publish_global``: the global model and the consumed offsets committed in one Kafka
  transaction, as the aggregator does;
- ``open_and_apply``: each retailer's consumer receives it, verifies it
  (:func:`fl.client.open_global`) and folds it in (:func:`fl.client.fold_in`, personalised by
  200 recent labels).

Retailers seal and apply on their own machines at once, so ``round_ms`` is the critical path:
the slowest retailer's seal + both publications + aggregate + the slowest retailer's
open-and-apply (``seal_sum_ms`` and ``open_and_apply_sum_ms`` are the totals over the 5, as
if one machine did all). One unmeasured round warms the broker and the code; then
``--rounds`` rounds, and each figure is the median. Runs its own ephemeral Kafka unless
``--bootstrap`` is given. The last line is JSON with ``round_ms`` and each part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as `python bench/fl.py`, this file's folder comes first on sys.path and this file
# (named like the package it measures) would shadow the `fl` package.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition  # noqa: E402

from fl.aggregator import Aggregator, AggregatorSettings, Round  # noqa: E402
from fl.client import fold_in, open_global, seal_update, sign_global, update_from_model  # noqa: E402
from fraud.features import FEATURE_NAMES  # noqa: E402
from fraud.models import RiskModel  # noqa: E402
from pqc.freshness import InMemoryFreshness  # noqa: E402
from pqc.keys import KeyStore, init_keystore, save_store_registry  # noqa: E402
from streams.topics import COMPACTED, TopicSpec, ensure_topics  # noqa: E402

RETAILERS = 5
RECENT = 200


class Retailer:
    def __init__(self, keys: KeyStore, index: int, labels: int) -> None:
        self.keys = keys
        self.name = keys.identity.name
        self.model = RiskModel()
        self.rng = np.random.default_rng(index)
        self.shift = 1.0 + 0.5 * index  # retailers differ
        self.recent: list[tuple[dict[str, float], bool]] = []
        self.sequence = 0
        self.freshness = InMemoryFreshness()
        self.last_round: int | None = None
        self.learn(labels)

    def learn(self, n: int) -> None:
        names = FEATURE_NAMES
        for _ in range(n):
            y = bool(self.rng.random() < 0.1)
            values = self.rng.normal(0.0, 1.0, len(names))
            if y:
                values[: len(names) // 3] += self.shift
            x = dict(zip(names, values.tolist(), strict=True))
            self.model.learn_one(x, y)
            self.recent = [*self.recent[-(RECENT - 1):], (x, y)]


def federation(root: Path) -> tuple[KeyStore, list[KeyStore]]:
    aggregator = init_keystore(root / "agg", "aggregator", "aggregator")
    retailers = [init_keystore(root / f"r{i}", f"retailer-{i}", "retailer")
                 for i in range(RETAILERS)]
    for store in (aggregator, *retailers):
        for other in (aggregator, *retailers):
            if other is not store:
                store.registry.trust(other.public_keys())
        save_store_registry(store)
    return aggregator, retailers


def poll_values(consumer: Consumer, n: int, timeout: float = 30.0) -> list[bytes]:
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(out)} of {n} records in {timeout} s")
        msg = consumer.poll(0.05)
        if msg is None:
            continue
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                raise RuntimeError(str(err))
            continue
        value = msg.value()
        if value:
            out.append(value)
    return out


def one_round(number: int, retailers: list[Retailer], aggregator: Aggregator,
              state: dict[str, Any], updates: Consumer, producer: Producer,
              txn: Producer, readers: list[Consumer], topics: tuple[str, str]) -> dict[str, float]:
    updates_topic, global_topic = topics
    kem = retailers[0].keys.registry.current_kem_key("aggregator")
    for r in retailers:
        r.learn(100)  # this round's labels
    ms: dict[str, float] = {}

    seal_each = []
    blobs = []
    for r in retailers:
        t = time.perf_counter()
        r.sequence += 1
        blobs.append(seal_update(update_from_model(r.model, r.name, number), r.keys.identity,
                                 kem, r.sequence))
        seal_each.append((time.perf_counter() - t) * 1e3)
    ms["seal"], ms["seal_sum"] = max(seal_each), sum(seal_each)
    state["update_bytes"] = max(len(blob) for blob in blobs)

    t = time.perf_counter()
    for blob in blobs:
        producer.produce(updates_topic, value=blob)
    assert producer.flush(30) == 0
    ms["publish_updates"] = (time.perf_counter() - t) * 1e3

    t = time.perf_counter()
    round_: Round = state["round"]
    aggregator._round = round_
    for blob in poll_values(updates, len(blobs)):
        aggregator.offer(blob, time.monotonic())
    assert len(round_.updates) == len(retailers), aggregator.metrics
    published = round_.close(aggregator.strategy)
    signed = sign_global(published, aggregator.keys.identity, time.time_ns())
    ms["aggregate"] = (time.perf_counter() - t) * 1e3

    t = time.perf_counter()
    txn.begin_transaction()
    txn.produce(global_topic, key=b"global", value=signed)
    txn.send_offsets_to_transaction(updates.position(updates.assignment()),
                                    updates.consumer_group_metadata())
    txn.commit_transaction()
    ms["publish_global"] = (time.perf_counter() - t) * 1e3
    state["round"] = round_.next(published)

    apply_each = []
    t0 = time.perf_counter()
    received = [poll_values(reader, 1)[0] for reader in readers]
    ms["receive_global"] = (time.perf_counter() - t0) * 1e3
    for r, blob in zip(retailers, received, strict=True):
        t = time.perf_counter()
        glob = open_global(blob, r.keys.registry, r.freshness, last_round=r.last_round)
        fold_in(r.model, glob, r.recent)
        r.last_round = glob.round
        apply_each.append((time.perf_counter() - t) * 1e3)
    # the first reader's wait is the delivery; each retailer then verifies and folds in
    ms["open_and_apply"] = ms["receive_global"] / len(readers) + max(apply_each)
    ms["open_and_apply_sum"] = sum(apply_each)
    ms["round"] = (ms["seal"] + ms["publish_updates"] + ms["aggregate"] + ms["publish_global"]
                   + ms["open_and_apply"])
    return ms


def run(args: argparse.Namespace, bootstrap: str, tmp: Path) -> dict[str, Any]:
    stamp = time.time_ns()
    updates_topic, global_topic = f"bench.fl.{stamp}.updates", f"bench.fl.{stamp}.global"
    ensure_topics(bootstrap, [TopicSpec(updates_topic, 1, {}),
                              TopicSpec(global_topic, 1, COMPACTED)])
    agg_keys, retailer_keys = federation(tmp / "keys")
    retailers = [Retailer(keys, i, args.labels) for i, keys in enumerate(retailer_keys)]
    aggregator = Aggregator(AggregatorSettings(bootstrap=bootstrap, quorum=RETAILERS),
                            agg_keys, log=open(os.devnull, "w"))  # noqa: SIM115
    state: dict[str, Any] = {"round": Round(1, None, {}, RETAILERS, 30.0)}
    group = f"bench-fl-{stamp}"
    updates = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                        "enable.auto.commit": False, "auto.offset.reset": "earliest",
                        "isolation.level": "read_committed"})
    updates.assign([TopicPartition(updates_topic, 0, 0)])
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 0,
                         "enable.idempotence": True})
    txn = Producer({"bootstrap.servers": bootstrap, "transactional.id": group})
    txn.init_transactions(30)
    readers = []
    for i in range(RETAILERS):
        reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{group}-r{i}",
                           "enable.auto.commit": False, "isolation.level": "read_committed",
                           "fetch.wait.max.ms": 10})
        reader.assign([TopicPartition(global_topic, 0, 0)])
        readers.append(reader)
    rounds = []
    try:
        for number in range(1, args.rounds + 2):
            ms = one_round(number, retailers, aggregator, state, updates, producer, txn,
                           readers, (updates_topic, global_topic))
            label = "warm-up" if number == 1 else f"round {number - 1}"
            print(f"{label}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()),
                  flush=True)
            if number > 1:
                rounds.append(ms)
    finally:
        updates.close()
        for reader in readers:
            reader.close()
    med = {k: round(statistics.median(r[k] for r in rounds), 2) for k in rounds[0]}
    features = len(update_from_model(retailers[0].model, "x", 0).vectors)
    return {
        "round_ms": med["round"],
        "seal_ms": med["seal"],
        "publish_updates_ms": med["publish_updates"],
        "aggregate_ms": med["aggregate"],
        "publish_global_ms": med["publish_global"],
        "open_and_apply_ms": med["open_and_apply"],
        "seal_sum_ms": med["seal_sum"],
        "open_and_apply_sum_ms": med["open_and_apply_sum"],
        "retailers": RETAILERS,
        "rounds": len(rounds),
        "vectors": features,
        "update_bytes": state["update_bytes"],
        "cpus": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (median)")
    parser.add_argument("--labels", type=int, default=2000,
                        help="labels each retailer learns before the first round")
    parser.add_argument("--bootstrap", help="use this Kafka instead of an ephemeral one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qsfraud-bench-fl-") as tmpdir:
        tmp = Path(tmpdir)
        if args.bootstrap:
            result = run(args, args.bootstrap, tmp)
        else:
            from qsfraud.stack import ephemeral_kafka

            with ephemeral_kafka(tmp) as kafka:
                result = run(args, kafka.bootstrap, tmp)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
