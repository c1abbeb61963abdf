"""The worker on real Kafka: decisions, dedup, kill -9, labels, signed config, restarts."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from pqc.keys import KeyStore, init_keystore
from streams.config_stream import ConfigDocument, sign_config


def publish_config(bootstrap: str, topic: str, key: str, blob: bytes) -> float:
    p = Producer({"bootstrap.servers": bootstrap})
    p.produce(topic, key=key.encode(), value=blob)
    assert p.flush(30) == 0
    return time.time()


def trust_args(admin: KeyStore, config_topic: str) -> tuple[str, ...]:
    return ("--trust", str(admin.path / "registry.json"), "--config-topic", config_topic)


def test_every_transaction_gets_exactly_one_decision_and_bad_ones_go_to_the_dlq(
    kafka_bootstrap: str, unique_name: str, worker_factory: Callable[..., Any], kit: Any
):
    retailer = unique_name
    worker = worker_factory(retailer).start()
    txs = [kit.transaction(i, retailer) for i in range(10_000)]
    kit.produce_transactions(kafka_bootstrap, retailer, txs)
    p = kit.producer(kafka_bootstrap)
    for bad in (b"{not json", b'{"tx_id": "x", "amount": -1}',
                json.dumps(kit.transaction(99_999, "someone-else")).encode()):
        p.produce(f"{retailer}.transactions", key=b"bad", value=bad)
    # the same transaction again, as a CDC envelope: a redelivery, answered from the dedup table
    p.produce(f"{retailer}.transactions", key=txs[5]["customer_id"], value=json.dumps(
        {"v": 1, "op": "c", "tx": txs[5], "source": {}, "committed_at": time.time()}).encode())
    p.flush(30)

    wanted = {tx["tx_id"] for tx in txs}
    messages = kit.collect(kafka_bootstrap, f"{retailer}.decisions",
                       lambda ms: len(ms) >= 10_001, timeout=180)
    by_tx = kit.decisions_by_tx(messages)
    assert set(by_tx) == wanted, worker.log_tail()
    assert all(len(set(values)) == 1 for values in by_tx.values())  # duplicates are identical
    assert len(by_tx["tx-5"]) == 2
    one = json.loads(by_tx["tx-1"][0])
    assert one["action"] in ("allow", "verify", "hold", "block")
    assert 0.0 <= one["score"] <= 1.0
    assert one["model_version"] == "local+0" and one["config_version"] == 0
    assert one["timings"]["produced"] <= one["timings"]["received"] <= one["timings"]["decided"]

    dead = kit.collect(kafka_bootstrap, f"{retailer}.streams.dlq", lambda ms: len(ms) >= 3, 60)
    reasons = sorted(json.loads(m.value())["reason"] for m in dead)
    assert reasons == ["invalid", "not-json", "wrong-retailer"]

    text = worker.metrics()
    assert f'qsfraud_transactions_total{{retailer="{retailer}"}} 10004' in text
    assert "qsfraud_decision_latency_seconds_bucket" in text
    assert f'qsfraud_dead_letters_total{{retailer="{retailer}"}} 3' in text
    assert "qsfraud_consumer_lag" in text and "qsfraud_model_info" in text


def test_transactional_input_is_read_committed_without_reading_its_markers(
    kafka_bootstrap: str, unique_name: str, worker_factory: Callable[..., Any], kit: Any
):
    # As the CDC writes: a Kafka transaction a source transaction, so a marker follows each
    # one on every partition it wrote to; one of them aborted (its records written, then
    # aborted, as when a CDC process dies and its successor fences it).
    retailer = unique_name
    worker = worker_factory(retailer).start()
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random",
                         "transactional.id": f"{retailer}-cdc"})
    producer.init_transactions(30)
    committed: set[str] = set()
    for n in range(30):
        txs = [kit.transaction(n * 10 + i, retailer) for i in range(10)]
        producer.begin_transaction()
        for tx in txs:
            if n == 12:
                tx["tx_id"] = f"aborted-{tx['tx_id']}"
            producer.produce(f"{retailer}.transactions", key=tx["customer_id"],
                             value=json.dumps(tx).encode())
        if n == 12:
            assert producer.flush(30) == 0
            producer.abort_transaction(30)
        else:
            producer.commit_transaction(30)
            committed |= {tx["tx_id"] for tx in txs}

    kit.collect(kafka_bootstrap, f"{retailer}.decisions",
                lambda ms: len(ms) >= len(committed), timeout=120)
    time.sleep(1.0)  # a decision of an aborted record would come among the last ones
    by_tx = kit.decisions_by_tx(kit.collect(kafka_bootstrap, f"{retailer}.decisions",
                                            lambda ms: False, timeout=3.0))
    assert set(by_tx) == committed, worker.log_tail()
    # no offset of a marker or an aborted record was taken for one faust skipped
    text = worker.metrics()
    assert "qsfraud_gap_reads_total{" not in text, worker.log_tail()
    assert f'qsfraud_transactions_total{{retailer="{retailer}"}} {len(committed)}' in text


def test_kill_9_mid_stream_then_restart_leaves_no_transaction_without_a_decision(
    kafka_bootstrap: str, unique_name: str, worker_factory: Callable[..., Any], kit: Any
):
    retailer = unique_name
    txs = [kit.transaction(i, retailer) for i in range(8_000)]
    worker = worker_factory(retailer).start()
    feeder = threading.Thread(target=kit.produce_transactions,
                              args=(kafka_bootstrap, retailer, txs))
    feeder.start()
    seen = kit.collect(kafka_bootstrap, f"{retailer}.decisions", lambda ms: len(ms) >= 2_000,
                       120)
    worker.kill()
    feeder.join()
    assert len(seen) >= 2_000
    worker.start()
    messages = kit.collect(kafka_bootstrap, f"{retailer}.decisions",
                       lambda ms: len(kit.decisions_by_tx(ms)) >= len(txs), timeout=180)
    by_tx = kit.decisions_by_tx(messages)
    assert set(by_tx) == {tx["tx_id"] for tx in txs}, worker.log_tail()
    differing = [tx for tx, values in by_tx.items() if len(set(values)) != 1]
    assert not differing, f"{len(differing)} transactions got different decisions"


def test_signed_config_applies_within_2_s_and_unsigned_or_forged_ones_are_rejected(
    kafka_bootstrap: str, unique_name: str, admin: KeyStore, tmp_path: Path,
    worker_factory: Callable[..., Any], kit: Any,
):
    retailer = unique_name
    config_topic = f"{unique_name}.config"
    worker = worker_factory(retailer, *trust_args(admin, config_topic)).start()
    stop = threading.Event()

    def feed() -> None:
        p = kit.producer(kafka_bootstrap)
        i = 0
        while not stop.is_set():
            tx = kit.transaction(i, retailer)
            p.produce(f"{retailer}.transactions", key=tx["customer_id"],
                      value=json.dumps(tx).encode())
            p.poll(0)
            i += 1
            time.sleep(0.01)
        p.flush(30)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        kit.collect(kafka_bootstrap, f"{retailer}.decisions", lambda ms: len(ms) >= 20, 60)
        doc = ConfigDocument.default().updated(
            {"thresholds.verify": 0.0, "thresholds.hold": 1.0, "thresholds.block": 1.0},
            version=1, scope=retailer)
        published = publish_config(kafka_bootstrap, config_topic, retailer,
                                   sign_config(doc, admin.identity))
        time.sleep(3.0)
        # unsigned, signed by a stranger, tampered, and a stale replay of version 1
        unsigned = replace(doc, version=2)
        stranger = init_keystore(tmp_path / "stranger", "admin-x", "admin")
        tampered = bytearray(sign_config(replace(doc, version=3), admin.identity))
        tampered[-100] ^= 1
        for blob in (json.dumps(unsigned.to_dict()).encode(),
                     sign_config(replace(doc, version=4), stranger.identity),
                     bytes(tampered), sign_config(doc, admin.identity)):
            publish_config(kafka_bootstrap, config_topic, retailer, blob)
        rejected = kit.collect(kafka_bootstrap, f"{config_topic}.rejected",
                           lambda ms: len(ms) >= 4, 60)
        time.sleep(1.0)
    finally:
        stop.set()
        feeder.join()
    assert sorted(json.loads(m.value())["reason"] for m in rejected) == [
        "bad-signature", "stale", "unsigned", "untrusted"]

    decisions = [json.loads(m.value()) for m in kit.collect(
        kafka_bootstrap, f"{retailer}.decisions", lambda ms: False, timeout=8)]
    applied = [d for d in decisions if d["config_version"] == 1]
    assert applied, worker.log_tail()
    first = min(d["timings"]["decided"] for d in applied)
    assert first - published <= 2.0
    late = [d for d in decisions if d["timings"]["produced"] > published + 2.0]
    assert late and all(d["config_version"] == 1 for d in late)  # rejects changed nothing
    assert all(d["action"] == "verify" for d in late)  # verify threshold 0: nothing allowed
    assert 'qsfraud_config_version{retailer="' + retailer + '"} 1' in worker.metrics()


def test_a_label_changes_the_model_and_state_survives_a_restart(
    kafka_bootstrap: str, unique_name: str, admin: KeyStore,
    worker_factory: Callable[..., Any], kit: Any,
):
    retailer = unique_name
    config_topic = f"{unique_name}.config"
    rule = {"name": "repeat-customer", "field": "feature:customer_n_24h", "op": ">=",
            "value": 1, "action": "verify"}
    doc = ConfigDocument.default().updated({"rules": [rule]}, version=1, scope=retailer)
    publish_config(kafka_bootstrap, config_topic, retailer, sign_config(doc, admin.identity))
    worker = worker_factory(retailer, *trust_args(admin, config_topic)).start()

    def decision_of(tx_id: str) -> dict:
        ms = kit.collect(kafka_bootstrap, f"{retailer}.decisions",
                     lambda ms: tx_id in kit.decisions_by_tx(ms), 60)
        return json.loads(kit.decisions_by_tx(ms)[tx_id][0])

    first = kit.transaction(1, retailer, customer="solo")
    kit.produce_transactions(kafka_bootstrap, retailer, [first])
    before = decision_of("tx-1")
    assert before["model_version"] == "local+0" and before["config_version"] == 1
    assert "rule:repeat-customer" not in before["reasons"]

    label = {"tx_id": "tx-1", "is_fraud": True, "source": "chargeback",
             "labelled_at": time.time()}
    p = kit.producer(kafka_bootstrap)
    p.produce(f"{retailer}.labels", key=b"solo", value=json.dumps(label).encode())
    p.produce(f"{retailer}.labels", key=b"x", value=json.dumps({**label, "tx_id": "nope"}))
    p.flush(30)
    unknown = 'qsfraud_labels_total{retailer="' + retailer + '",outcome="unknown"} 1'
    deadline = time.monotonic() + 30
    # the two labels may come in separate batches (one per partition): wait for both
    while time.monotonic() < deadline:
        text = worker.metrics()
        if 'version="local+1"' in text and unknown in text:
            break
        time.sleep(0.2)
    assert 'version="local+1"' in text
    assert unknown in text

    other = kit.transaction(2, retailer, customer="other")
    kit.produce_transactions(kafka_bootstrap, retailer, [other])
    assert decision_of("tx-2")["model_version"] == "local+1"

    time.sleep(2.5)  # a checkpoint (every 1 s here) and an offset commit
    worker.stop()
    worker.start()
    again = kit.transaction(3, retailer, customer="solo", occurred_at=first["occurred_at"] + 60)
    kit.produce_transactions(kafka_bootstrap, retailer, [again])
    after = decision_of("tx-3")
    assert "rule:repeat-customer" in after["reasons"], after  # the feature table survived
    assert after["model_version"] == "local+1"  # the model checkpoint survived
    assert after["config_version"] == 1
