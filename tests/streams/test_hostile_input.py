"""Hostile input on real Kafka: a worker fed poison records interleaved with valid ones, and
killed (SIGKILL) and restarted in the middle, decides every valid transaction and
dead-letters every hostile record with its reason.

What is asserted, precisely:
- decisions, deduplicated by ``tx_id``: exactly the valid transactions; every copy of a
  transaction's decision is byte-identical (copies come from at-least-once redelivery);
- dead letters, deduplicated by the ``(topic, partition, offset)`` of the input they name:
  exactly the hostile records of both input topics (transactions and labels), none of a valid
  record; every copy of one names the same reason, the reason the in-process parser gives;
  each is under 64 KiB and carries the input's SHA-256 and length.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fraud.schema import InputBounds, Transaction
from streams.scoring import BadRecord, parse_transaction

pytestmark = pytest.mark.integration

VALID = 1_600
LABELS = 200


def fixed_hostile(good: dict[str, Any]) -> list[bytes]:
    """The probe's crashers and the lax bounds of issue 23."""
    body = json.dumps(good).encode()[:-1]
    env = json.dumps({"v": 1, "op": "c", "tx": good}).encode()[:-1]
    return [
        b'{"tx_id": ' + b"9" * 5000 + b"}",
        b"[" * 10_000 + b"]" * 10_000,
        bytes(range(256)) * 3900,  # ~1 MB of garbage
        body + b', "amount": 1e308}',
        env + b', "committed_at": 1e400}',
        env + b', "committed_at": NaN}',
        json.dumps({**good, "occurred_at": "0001-01-01T00:00:00Z"}).encode(),
        json.dumps({**good, "occurred_at": "9999-12-31T23:59:59Z"}).encode(),
        json.dumps({**good, "customer_id": "c\x00"}).encode(),
        json.dumps({**good, "customer_id": "c\ud800"}).encode(),
        json.dumps({**good, "tx_id": "t" * 1000}).encode(),
        json.dumps({**good, "tx_id": "t" * 100_000}).encode(),
        json.dumps({"v": 1, "op": "x", "tx": good}).encode(),
        b"{not json",
        json.dumps({**good, "retailer_id": "someone-else"}).encode(),
    ]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=10,
)
records = (st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode())
           | st.dictionaries(st.sampled_from(sorted(Transaction.FIELDS)), json_values,
                             max_size=6).map(lambda d: json.dumps(d).encode()))


def generated(strategy: st.SearchStrategy[bytes], n: int) -> list[bytes]:
    """``n`` distinct records drawn by hypothesis (its generation phase, in process: one run
    of a Kafka test would only see hypothesis' first, simplest example)."""
    out: dict[bytes, None] = {}

    @settings(max_examples=20 * n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(value: bytes) -> None:
        if len(out) < n:
            out[value] = None

    draw()
    return list(out)


def test_hostile_records_are_dead_lettered_and_valid_ones_decided_across_a_kill(
    kafka_bootstrap: str, unique_name: str, worker_factory: Callable[..., Any], kit: Any,
) -> None:
    retailer = unique_name
    extra_tx, extra_labels = generated(records, 40), generated(st.binary(max_size=200), 10)
    topic, labels_topic = f"{retailer}.transactions", f"{retailer}.labels"
    valid = [kit.transaction(i, retailer, occurred_at=time.time() - 3600 + i)
             for i in range(VALID)]
    bounds, now = InputBounds(), time.time()

    def reason_of(value: bytes) -> str | None:
        """The reason the pipeline gives ``value``, None for a transaction it decides."""
        try:
            parsed = parse_transaction(value, bounds, now)
        except BadRecord as exc:
            return exc.reason
        if parsed.op == "d":
            return "skipped"
        return None if parsed.tx.retailer_id == retailer else "wrong-retailer"

    hostile_tx = [(v, r) for v in [*fixed_hostile(valid[0]), *extra_tx]
                  if (r := reason_of(v)) not in (None, "skipped")]
    assert len(hostile_tx) >= 15
    good_label = {"tx_id": "tx-1", "is_fraud": True, "source": "chargeback"}
    hostile_labels = [(v, "any") for v in [
        b"\xff" * 1000, b"[" * 10_000 + b"]" * 10_000, b'{"tx_id": ' + b"7" * 5000 + b"}",
        json.dumps({**good_label, "labelled_at": "9999-01-01T00:00:00Z"}).encode(),
        bytes(range(256)) * 3900, *extra_labels]]

    # records in production order: [(topic, key, value, expected reason or None)]
    plan: list[tuple[str, bytes, bytes, str | None]] = []
    hostiles = iter([*((topic, v, r) for v, r in hostile_tx),
                     *((labels_topic, v, r) for v, r in hostile_labels)])
    for i, tx in enumerate(valid):
        plan.append((topic, tx["customer_id"].encode(), json.dumps(tx).encode(), None))
        if i < LABELS:
            label = {"tx_id": tx["tx_id"], "is_fraud": i % 5 == 0, "source": "analyst",
                     "labelled_at": time.time()}
            plan.append((labels_topic, tx["customer_id"].encode(), json.dumps(label).encode(),
                         None))
        if i % 40 == 7:
            hostile = next(hostiles, None)
            if hostile is not None:
                plan.append((hostile[0], f"h{i}".encode(), hostile[1], hostile[2]))
    plan += [(t, b"late", v, r) for t, v, r in hostiles]

    delivered: dict[tuple[str, int, int], tuple[bytes, str | None]] = {}
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random",
                         "message.max.bytes": 1_100_000, "linger.ms": 5})

    def produce(part: list[tuple[str, bytes, bytes, str | None]]) -> None:
        for t, key, value, reason in part:
            def on_delivery(err: Any, msg: Any, value: bytes = value,
                            reason: str | None = reason) -> None:
                assert err is None, err
                delivered[(msg.topic(), msg.partition(), msg.offset())] = (value, reason)
            while True:
                try:
                    producer.produce(t, key=key, value=value, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.05)
        assert producer.flush(30) == 0

    worker = worker_factory(retailer).start()
    half = len(plan) // 2
    produce(plan[:half])
    kit.collect(kafka_bootstrap, f"{retailer}.decisions", lambda ms: len(ms) >= VALID // 4, 60)
    worker.kill()  # mid-stream: some of the first half decided, some not
    produce(plan[half:])
    worker.start()

    wanted = {tx["tx_id"] for tx in valid}
    messages = kit.collect(kafka_bootstrap, f"{retailer}.decisions",
                           lambda ms: set(kit.decisions_by_tx(ms)) >= wanted, timeout=90)
    by_tx = kit.decisions_by_tx(messages)
    assert set(by_tx) == wanted, (len(wanted - set(by_tx)), sorted(wanted - set(by_tx))[:10],
                                  [line for line in worker.metrics().splitlines()
                                   if line.startswith("qsfraud_") and "bucket" not in line],
                                  kit.group_positions(kafka_bootstrap, f"qsfraud-{retailer}",
                                                      topic),
                                  worker.log_tail(6000))
    assert all(len(set(copies)) == 1 for copies in by_tx.values())

    expected = {pos: reason for pos, (_, reason) in delivered.items() if reason is not None}

    def letters_by_input(ms: list[Any]) -> dict[tuple[str, int, int], list[dict[str, Any]]]:
        out: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
        for m in ms:
            assert len(m.value()) < 64 * 1024
            doc = json.loads(m.value())
            out.setdefault((doc["topic"], doc["partition"], doc["offset"]), []).append(doc)
        return out

    dead = kit.collect(kafka_bootstrap, f"{retailer}.streams.dlq",
                       lambda ms: set(letters_by_input(ms)) >= set(expected), timeout=60)
    time.sleep(1.0)  # a dead letter of a valid record would come among the last ones
    letters = letters_by_input(kit.collect(kafka_bootstrap, f"{retailer}.streams.dlq",
                                           lambda ms: len(ms) >= len(dead), timeout=10))
    missing, extra = set(expected) - set(letters), set(letters) - set(expected)
    assert not missing and not extra, (
        [(p, expected[p], delivered[p][0][:80]) for p in sorted(missing)][:10],
        [(letters[p][0]["reason"], letters[p][0]["error"], letters[p][0]["value"])
         for p in sorted(extra)][:5])
    for pos, copies in letters.items():
        value, reason = delivered[pos]
        assert len({c["reason"] for c in copies}) == 1, copies
        if pos[0] == topic:
            assert copies[0]["reason"] == reason, (copies[0], value[:200])
        assert copies[0]["reason"] != "internal-error", copies[0]
        assert copies[0]["value_sha256"] == hashlib.sha256(value).hexdigest()
        assert copies[0]["value_bytes"] == len(value)
