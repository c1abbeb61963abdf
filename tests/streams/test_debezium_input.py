"""Debezium change events as worker input: the parser's hook, the pipeline, and recorded
MySQL and MongoDB events through a real worker on real Kafka."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.debezium import DebeziumDecoder
from streams.scoring import BadRecord, InputRecord, ScoringPipeline, parse_transaction

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures" / "debezium"
EXAMPLES = ROOT / "examples"

# recorded events, the mapping the worker gets, and what must come out of them
CASES = {
    "mysql-schema": (EXAMPLES / "debezium/mysql.toml",
                     {"1001": 1, "1002": 2, "1003": 1}, []),
    "mysql-noschema": (EXAMPLES / "debezium/mysql-schemaless.toml",
                       {"1001": 1, "1002": 2, "1003": 1}, ["amount:"]),
    "mariadb-recorded-schema": (EXAMPLES / "debezium/mysql.toml",
                                {"1001": 1, "1002": 2, "1003": 1}, []),
    "mariadb-recorded-noschema": (EXAMPLES / "debezium/mysql-schemaless.toml",
                                  {"1001": 1, "1002": 2, "1003": 1}, ["amount:"]),
    "mongo-recorded-noschema": (EXAMPLES / "cdc/mongo.toml",  # the qsfraud CDC's own config
                                {"65a1b2c3d4e5f60718293a01": 1, "65a1b2c3d4e5f60718293a02": 2,
                                 "65a1b2c3d4e5f60718293a03": 1}, []),
    "mongo-recorded-schema": (EXAMPLES / "cdc/mongo.toml",  # capture.mode=change_streams
                              {"65a1b2c3d4e5f60718293a01": 1, "65a1b2c3d4e5f60718293a02": 1,
                               "65a1b2c3d4e5f60718293a03": 1},
                              ["capture.mode=change_streams_update_full"]),
    "mongo": (EXAMPLES / "cdc/mongo.toml",
              {"65a1b2c3d4e5f60718293a01": 1, "65a1b2c3d4e5f60718293a02": 2,
               "65a1b2c3d4e5f60718293a03": 1}, ["capture.mode=change_streams_update_full"]),
}
SKIPPED = 2  # each case has one delete and the tombstone after it


def recorded(case: str) -> list[bytes | None]:
    """The Kafka values of a case's events, in order (``null`` files: tombstones)."""
    values = []
    for path in sorted((FIXTURES / case).glob("*.json")):
        doc = json.loads(path.read_text())
        values.append(None if doc is None else json.dumps(doc).encode())
    return values


def test_parse_transaction_reads_debezium_events_only_when_given_a_decoder():
    value = (FIXTURES / "mysql-noschema/02-create.json").read_bytes()
    with pytest.raises(BadRecord):  # without a decoder: not an envelope, not a transaction
        parse_transaction(value)
    auto = DebeziumDecoder.load("acme", EXAMPLES / "debezium/mysql-schemaless.toml")
    parsed = parse_transaction(value, debezium=auto)
    assert (parsed.tx.tx_id, parsed.op, parsed.committed_at) == ("1002", "c", 1767258121.0)
    # auto: qsfraud records unchanged, tombstones still dead-lettered
    bare = {"tx_id": "t", "retailer_id": "acme", "amount": 1, "customer_id": "c",
            "payment_instrument": "p", "occurred_at": 3}
    assert parse_transaction(json.dumps(bare).encode(), debezium=auto).tx.tx_id == "t"
    envelope = {"v": 1, "op": "d", "tx": None, "before": {"tx_id": "t"}, "source": {},
                "committed_at": 2.0}
    assert parse_transaction(json.dumps(envelope).encode(), debezium=auto).tx.tx_id == "t"
    with pytest.raises(BadRecord, match="empty"):
        parse_transaction(None, debezium=auto)
    # strict: a tombstone is a delete, anything but Debezium's shape a dead letter
    strict = DebeziumDecoder("acme", strict=True)
    assert parse_transaction(None, debezium=strict).op == "d"
    with pytest.raises(BadRecord) as err:
        parse_transaction(json.dumps(bare).encode(), debezium=strict)
    assert err.value.reason == "not-debezium"
    with pytest.raises(BadRecord) as err:  # canonical names, but no payment instrument
        parse_transaction(b'{"op": "c", "after": {"tx_id": "t"}, "source": {}}', debezium=strict)
    assert err.value.reason == "invalid" and "payment_instrument" in err.value.message


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_pipeline_decides_recorded_events(case: str):
    mapping, decided, dead = CASES[case]
    pipe = ScoringPipeline("acme", debezium=DebeziumDecoder.load("acme", mapping, strict=True))
    records = [InputRecord(v, b"k", 0, i, 1.0, "acme.transactions")
               for i, v in enumerate(recorded(case))]
    out = pipe.process_batch(records)
    counts: dict[str, int] = {}
    for rec in out.decisions:
        tx_id = json.loads(rec.value or b"")["tx_id"]
        counts[tx_id] = counts.get(tx_id, 0) + 1
    assert counts == decided
    assert out.skipped == SKIPPED
    assert out.duplicates == sum(n - 1 for n in decided.values())
    errors = [json.loads(d.value or b"")["error"] for d in out.dead_letters]
    assert len(errors) == len(dead) and all(w in e for w, e in zip(dead, errors, strict=True))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.none()
       | st.builds(lambda p, a: json.dumps({"op": p, "after": a, "source": {}}).encode(),
                   st.sampled_from(["c", "u", "d", "z"]),
                   st.text(max_size=40) | st.dictionaries(st.text(max_size=5),
                                                          st.integers() | st.text(max_size=5))))
def test_parse_transaction_with_a_decoder_raises_only_bad_record(value: bytes | None):
    decoder = DebeziumDecoder.load("acme", EXAMPLES / "debezium/mysql.toml", strict=True)
    try:
        parse_transaction(value, debezium=decoder)
    except BadRecord as exc:
        assert exc.reason and exc.message


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(c for c in CASES if "recorded" in c))
def test_a_worker_decides_recorded_debezium_events_on_kafka(
    case: str, kafka_bootstrap: str, unique_name: str,
    worker_factory: Callable[..., Any], kit: Any,
):
    retailer = unique_name
    mapping, decided, dead = CASES[case]
    worker = worker_factory(retailer, "--input-format", "debezium",
                            "--mapping", str(mapping)).start()
    values = recorded(case)
    p = kit.producer(kafka_bootstrap)
    for i, value in enumerate(values):
        p.produce(f"{retailer}.transactions", key=f"order-{i}".encode(), value=value)
    assert p.flush(30) == 0

    want = sum(decided.values())
    by_tx = kit.decisions_by_tx(kit.collect(kafka_bootstrap, f"{retailer}.decisions",
                                            lambda ms: len(ms) >= want, timeout=120))
    # at least once: a rebalance (a busy machine can miss a heartbeat) redelivers a batch,
    # whose decisions are written again, byte for byte
    assert set(by_tx) == set(decided), worker.log_tail()
    assert all(len(v) >= decided[k] for k, v in by_tx.items()), worker.log_tail()
    assert all(len(set(v)) == 1 for v in by_tx.values())  # the update: the same decision
    for tx_id, values_ in by_tx.items():
        decision = json.loads(values_[0])
        assert decision["tx_id"] == tx_id and decision["retailer_id"] == retailer
        assert decision["action"] in ("allow", "verify", "hold", "block")
    if dead:
        letters = kit.collect(kafka_bootstrap, f"{retailer}.streams.dlq",
                              lambda ms: len(ms) >= len(dead), timeout=60)
        # one per input record (a redelivered record's dead letter names the same offset)
        docs = list({(d["partition"], d["offset"]): d for d in
                     sorted((json.loads(m.value()) for m in letters),
                            key=lambda d: (d["partition"], d["offset"]))}.values())
        assert [d["reason"] for d in docs] == ["invalid"] * len(dead)
        assert all(w in d["error"] for w, d in zip(dead, docs, strict=True))
    redelivered = sum(len(v) for v in by_tx.values()) - want
    text = worker.metrics()
    if not redelivered:  # the counts are exact when nothing was read twice
        assert f'qsfraud_transactions_total{{retailer="{retailer}"}} {len(values)}' in text
        assert f'qsfraud_skipped_total{{retailer="{retailer}"}} {SKIPPED}' in text
        if dead:
            assert f'qsfraud_dead_letters_total{{retailer="{retailer}"}} {len(dead)}' in text
