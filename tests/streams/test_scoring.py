"""The scoring pipeline without Kafka: parsing, dedup, features, decisions, labels, expiry."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from fraud.features import FeatureExtractor
from fraud.schema import InputBounds
from streams import scoring
from streams.config_stream import ConfigDocument
from streams.scoring import (
    BadRecord,
    EntityStore,
    InputRecord,
    ScoredStore,
    ScoringPipeline,
    TrackedStore,
    home_partition,
    parse_transaction,
)

T0 = 1_767_225_600.0  # 2026-01-01: within the default window of now (InputBounds)


def tx(i: int, customer: str = "c1", **extra: object) -> dict:
    return {"tx_id": f"t{i}", "retailer_id": "acme", "amount": 10.0 + i, "customer_id": customer,
            "payment_instrument": f"p{i % 3}", "device_id": "d1", "ip": "10.1.1.1",
            "occurred_at": T0 + 60 * i, **extra}


def record(value: dict | bytes, partition: int = 0, offset: int = 0) -> InputRecord:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return InputRecord(raw, b"c1", partition, offset, 1_000.0, "acme.transactions")


def test_envelope_and_bare_transaction_give_the_same_decision():
    bare, envelope = ScoringPipeline("acme"), ScoringPipeline("acme")
    a = bare.process_batch([record(tx(1))], now=5.0).decisions[0]
    b = envelope.process_batch([record({"v": 1, "op": "c", "tx": tx(1), "source": {},
                                        "committed_at": T0 + 60.5})], now=5.0).decisions[0]
    da, db = json.loads(a.value), json.loads(b.value)
    assert db["timings"]["committed"] == T0 + 60.5 and "committed" not in da["timings"]
    assert (da["score"], da["action"], da["reasons"]) == (db["score"], db["action"], db["reasons"])


def test_a_deleted_row_is_skipped_not_decided():
    pipe = ScoringPipeline("acme")
    out = pipe.process_batch([record({"v": 1, "op": "d", "tx": None, "before": tx(1)})])
    assert out.skipped == 1 and not out.decisions and not out.dead_letters


@pytest.mark.parametrize("raw, reason", [
    (b"not json", "not-json"),
    (b"[1, 2]", "invalid"),
    (json.dumps(tx(1, amount=-5)).encode(), "invalid"),
    (json.dumps({**tx(1), "committed_at": "yesterday"}).encode(), "invalid"),
])
def test_bad_records_are_rejected_with_a_reason(raw: bytes, reason: str):
    with pytest.raises(BadRecord) as info:
        parse_transaction(raw)
    assert info.value.reason == reason


def test_bad_records_go_to_the_dlq_and_the_batch_goes_on():
    pipe = ScoringPipeline("acme")
    out = pipe.process_batch([record(b"{"), record(tx(1)), record(tx(2) | {"retailer_id": "x"}),
                              InputRecord(None, None, 0, 3, None)])
    assert len(out.decisions) == 1
    assert sorted(json.loads(d.value)["reason"] for d in out.dead_letters) == [
        "empty", "not-json", "wrong-retailer"]


def test_a_redelivered_transaction_gets_the_identical_record_and_no_state_change():
    pipe = ScoringPipeline("acme")
    first = pipe.process_batch([record(tx(1)), record(tx(2))], now=1.0)
    pipe.features.drain()
    pipe.scored.drain()
    state_before = dict(pipe.features.data)  # each value its JSON bytes
    anomaly_before = pipe.model.anomaly_seen
    again = pipe.process_batch([record(tx(2), offset=9), record(tx(1), offset=8)], now=2.0)
    assert [d.value for d in again.decisions] == [first.decisions[1].value,
                                                  first.decisions[0].value]
    assert again.duplicates == 2
    assert dict(pipe.features.data) == state_before  # no double count
    assert pipe.model.anomaly_seen == anomaly_before  # not learned twice
    assert pipe.features.drain() == [] and pipe.scored.drain() == []


def test_one_batch_decides_as_record_by_record_in_input_order():
    """Batch scoring (one compiled call) changes nothing: the same records, state and model
    as one record per batch; a transaction twice in a batch gets the first one's record."""
    txs = [tx(i, customer=f"c{i % 3}") for i in range(30)]
    recs = [record(t, partition=i % 4, offset=i) for i, t in enumerate(txs)]
    recs.insert(7, record(txs[2], partition=2, offset=99))
    recs.insert(12, record(b"{"))
    one_by_one, batched = ScoringPipeline("acme"), ScoringPipeline("acme")
    expected = [d.value for r in recs for d in one_by_one.process_batch([r], now=5.0).decisions]
    out = batched.process_batch(recs, now=5.0)
    assert out.decisions[7].value == out.decisions[2].value and out.duplicates == 1
    assert [d.partition for d in out.decisions][:8] == [0, 1, 2, 3, 0, 1, 2, 2]

    def undated(raw: bytes) -> dict:  # all but the wall-clock time of the decision
        doc = json.loads(raw)
        del doc.get("d", doc)["timings"]["decided"]
        return doc

    assert [undated(d.value) for d in out.decisions] == [undated(v) for v in expected]
    assert batched.features.data == one_by_one.features.data
    assert {k: undated(v) for k, v in batched.scored.data.items()} == {
        k: undated(v) for k, v in one_by_one.scored.data.items()}
    assert batched.model.export_state() == one_by_one.model.export_state()


def test_a_rule_on_a_feature_fires():
    pipe = ScoringPipeline("acme")
    rule = {"name": "busy", "field": "feature:customer_n_1h", "op": ">=", "value": 2,
            "action": "verify"}
    pipe.apply_config(ConfigDocument.default().updated({"rules": [rule]}, version=2))
    out = pipe.process_batch([record(tx(i)) for i in range(4)])
    fired = ["rule:busy" in json.loads(d.value)["reasons"] for d in out.decisions]
    assert fired == [False, False, True, True]


def test_features_match_the_fraud_core_on_a_plain_dict():
    pipe = ScoringPipeline("acme")
    txs = [tx(i, customer=f"c{i % 2}") for i in range(6)]
    pipe.process_batch([record(t) for t in txs])
    reference: dict = {}
    fx = FeatureExtractor()
    expected = [fx.extract(t, reference) for t in txs]
    stored = [pipe.scored.get(t["tx_id"])["x"] for t in txs]
    assert stored == [[e[n] for n in pipe.names] for e in expected]


def test_entity_state_goes_to_its_home_partition_and_scored_to_the_transactions():
    pipe = ScoringPipeline("acme", partitions=4)
    pipe.process_batch([record(tx(1, customer="a"), partition=2),
                        record(tx(2, customer="b"), partition=3)])
    changes = {k: p for p, k, _ in pipe.features.drain()}
    assert set(changes) == {"c:a", "c:b", "p:p1", "p:p2", "d:d1", "i:10.1.1.1"}
    # each entity's state on one partition, whichever transaction wrote it: where a record
    # keyed by the entity's id goes (murmur2, as Kafka's clients partition)
    assert changes == {k: home_partition(k[2:], 4) for k in changes}
    assert len(set(changes.values())) > 1
    assert {k: p for p, k, _ in pipe.scored.drain()} == {"t1": 2, "t2": 3}


def test_a_key_restored_from_another_partition_moves_home_with_a_tombstone_there():
    store = EntityStore(partitions=4)
    home = home_partition("d1", 4)
    store.set_encoded((home + 1) % 4, "d:d1", b'{"last":1.0}')  # as restored from an old log
    store.drain()
    store["d:d1"] = {"last": 2.0}
    assert store.drain_encoded() == [((home + 1) % 4, b'"d:d1"', None),
                                     (home, b'"d:d1"', b'{"last":2.0}')]
    store["d:d1"] = {"last": 3.0}
    assert store.drain() == [(home, "d:d1", {"last": 3.0})]


@given(st.binary(max_size=300))
def test_murmur2_is_kafkas(data: bytes):
    assert scoring.murmur2(data) == aiokafka_murmur2(data)


@given(st.lists(st.binary(max_size=40), max_size=60), st.integers(0, 12))
def test_murmur2_many_is_murmur2_of_each(keys: list[bytes], copies: int):
    keys = keys + keys[:1] * copies  # enough keys of one length for the vectorised path
    assert scoring.murmur2_many(keys) == [aiokafka_murmur2(k) for k in keys]


def test_a_batch_primes_the_homes_of_its_entities_as_home_partition_does():
    pipe = ScoringPipeline("acme", partitions=4)
    txs = [tx(i, customer=f"c{i}", device_id=f"dev-{i % 3}") for i in range(20)]
    pipe.process_batch([record(t) for t in txs])
    store = pipe.features
    assert isinstance(store, EntityStore)
    assert set(store._homes) == set(store.data)  # each written key hashed (10 alike: numpy)
    assert all(home == home_partition(key[2:], 4) for key, home in store._homes.items())


def test_a_redelivered_transaction_gets_the_same_features_and_counts_once():
    # the entity state restored from the changelogs may already hold a transaction whose
    # `scored` entry was lost: its redelivery must not count it again
    pipe = ScoringPipeline("acme", partitions=4)
    txs = [tx(i, customer=f"c{i % 2}") for i in range(6)]
    first = pipe.process_batch([record(t) for t in txs[:4]])
    vectors = {t["tx_id"]: pipe.scored.get(t["tx_id"])["x"] for t in txs[:4]}
    for t in txs[2:4]:  # the scored entries of the batch's tail were never written
        pipe.scored.delete(t["tx_id"])
    again = pipe.process_batch([record(t) for t in txs[2:]])
    assert again.duplicates == 0 and len(first.decisions) == len(again.decisions) == 4
    reference: dict = {}
    fx = FeatureExtractor()
    expected = [fx.extract_values(t, reference) for t in txs]
    assert [vectors[t["tx_id"]] for t in txs[:2]] == expected[:2]
    assert [pipe.scored.get(t["tx_id"])["x"] for t in txs[2:]] == expected[2:]


def label(tx_id: str, fraud: bool = True, **extra: object) -> InputRecord:
    doc = {"tx_id": tx_id, "is_fraud": fraud, "source": "chargeback", "labelled_at": T0 + 9,
           **extra}
    return InputRecord(json.dumps(doc).encode(), b"c1", 0, 0, 9.0, "acme.labels")


def test_labels_learn_once_and_unknown_ones_are_counted():
    pipe = ScoringPipeline("acme")
    pipe.process_batch([record(tx(1)), record(tx(2))])
    out = pipe.learn_batch([label("t1"), label("t1"), label("nope"), label("t2", False),
                            InputRecord(b"{}", None, 0, 1, None, "acme.labels"),
                            label("t2", retailer_id="other")])
    assert (out.learned, out.duplicate, out.unknown) == (2, 1, 1)
    assert len(out.dead_letters) == 2
    assert pipe.model.n == 2 and pipe.model_version == "local+2"
    assert pipe.scored.get("t1")["l"] == 1


def test_a_label_changes_the_score_of_similar_transactions():
    pipe = ScoringPipeline("acme")
    pipe.process_batch([record(tx(i, customer=f"c{i}")) for i in range(40)])
    probe = {k: v for k, v in zip(pipe.names, pipe.scored.get("t5")["x"], strict=True)}
    before = pipe.model.score_one(probe, observe=False)
    pipe.learn_batch([label(f"t{i}", fraud=i % 4 == 0) for i in range(40)])
    assert pipe.model.score_one(probe, observe=False) != before


def test_a_label_feeds_the_label_history_of_the_next_transactions():
    pipe = ScoringPipeline("acme")
    pipe.process_batch([record(tx(1)), record(tx(2, customer="c2"))])
    pipe.learn_batch([label("t1")])
    pipe.process_batch([record(tx(3))])
    x = dict(zip(pipe.names, pipe.scored.get("t3")["x"], strict=True))
    assert x["customer_frauds_14d"] > 0.0 and x["customer_fraud_rate_60d"] == 0.5
    assert {k: p for p, k, _ in pipe.features.drain()}["c:c1"] == 0


def test_config_swap_applies_to_the_next_batch():
    pipe = ScoringPipeline("acme")
    rule = {"name": "any", "field": "amount", "op": ">=", "value": 0, "action": "hold"}
    pipe.apply_config(ConfigDocument.default().updated({"rules": [rule]}, version=3))
    d = json.loads(pipe.process_batch([record(tx(1))]).decisions[0].value)
    assert d["config_version"] == 3 and d["action"] == "hold" and "rule:any" in d["reasons"]


def test_expiry_by_event_time_and_size_writes_tombstones():
    store = ScoredStore(bucket_s=1.0)
    for i in range(6):
        store.at(float(i))
        store.set_on(i % 2, f"t{i}", {"o": float(i)})
    store.drain()
    assert store.expire(cutoff=3.0, now=10.0, max_entries=10) == 3
    assert store.expire(cutoff=0.0, now=10.0, max_entries=2) == 1
    assert sorted(store.data) == ["t4", "t5"]
    assert sorted(store.drain()) == [(0, "t0", None), (0, "t2", None), (1, "t1", None),
                                     (1, "t3", None)]


def test_changelog_records_are_the_json_of_the_stored_values():
    from streams.scoring import dumps

    def expected(store: TrackedStore) -> list:
        get = store.get  # the value as the pipeline reads it
        return [(p, json.dumps(k).encode(), None if get(k) is None else dumps(get(k)))
                for k, p in store.dirty.items()]

    pipe = ScoringPipeline("acme")
    pipe.process_batch([record(tx(i, customer=f"c{i % 3}"), partition=i % 4) for i in range(30)])
    pipe.learn_batch([label(f"t{i}", fraud=i % 2 == 0) for i in range(0, 30, 3)])
    pipe.process_batch([record(tx(i, customer=f"c{i % 3}"), partition=i % 4)
                        for i in range(25, 40)])
    for store in (pipe.features, pipe.scored):
        want = expected(store)
        assert want and store.drain_encoded() == want
        assert store.drain_encoded() == [] and store.drain() == []
    pipe.learn_batch([label("t30")])
    pipe.scored.expire(cutoff=1e12, now=1e12)  # tombstones
    want = expected(pipe.scored)
    assert len(want) == 40 and pipe.scored.drain_encoded() == want


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
))
def test_record_parsing_gives_what_the_standard_library_gives(value: Any) -> None:
    # orjson first, json.loads for what orjson reads differently (big integers) or refuses
    data = json.dumps(value).encode()
    try:
        parsed = scoring._loads(data)
    except BadRecord as exc:  # only for what the bounds refuse, and then for that
        assert exc.reason == _refused(json.loads(data), InputBounds()), exc
    else:
        assert _refused(parsed, InputBounds()) is None
        assert repr(parsed) == repr(json.loads(data))


def _refused(value: Any, bounds: InputBounds, depth: int = 1) -> str | None:
    """Why the bounds refuse ``value`` (a reference, recursive), or None."""
    if isinstance(value, dict | list):
        if depth > bounds.max_depth:
            return "too-deep"
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        return next((r for v in items if (r := _refused(v, bounds, depth + 1))), None)
    if isinstance(value, str) and any(c == "\x00" or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        return "bad-string"
    if (type(value) is int and abs(value) >= 10**19
            and len(str(abs(value))) > bounds.max_int_digits):
        return "int-too-large"
    return None


def test_two_owners_exchanging_fragments_give_one_pipelines_features():
    # two pipelines splitting 4 partitions: each computes what it owns and asks the other
    # for the rest; per round (one transaction per entity) the result is the oracle's
    pipes = [ScoringPipeline("acme", partitions=4), ScoringPipeline("acme", partitions=4)]
    pipes[0].owned, pipes[1].owned = frozenset({0, 1}), frozenset({2, 3})
    reference: dict = {}
    fx = FeatureExtractor()
    for r in range(6):
        batch = [tx(10 * r + j, customer=f"c{(j + r) % 7}",
                    payment_instrument=f"p{(j * 3 + r) % 8}", device_id=f"d{(j + 2 * r) % 6}",
                    ip=f"10.0.0.{(j + r) % 6}",
                    coupon_code=f"K{(j + r) % 6}" if j % 2 else None)
                 for j in range(6)]
        expected = {t["tx_id"]: fx.extract_values(t, reference) for t in batch}
        by_owner: list[list[InputRecord]] = [[], []]
        for t in batch:
            part = home_partition(t["customer_id"], 4)
            by_owner[0 if part < 2 else 1].append(record(t, partition=part))
        pending = [pipe.begin_batch(recs) for pipe, recs in zip(pipes, by_owner, strict=True)]
        answers: dict = {}
        for p in pending:
            for home, requests in p.requests.items():
                owner = pipes[0 if home < 2 else 1]
                for replies in owner.apply_requests(requests).values():
                    answers.update({(tx_id, kind): v for tx_id, kind, v in replies})
        for pipe, p in zip(pipes, pending, strict=True):
            pipe.finish_batch(p, answers)
        got = {t["tx_id"]: next(pipe.scored.get(t["tx_id"]) for pipe in pipes
                                if pipe.scored.get(t["tx_id"]) is not None)["x"] for t in batch}
        assert got == expected
    # an owner asked again for a transaction it applied answers the same, state unchanged
    requests = [[0, "d", "d1", "again", T0, 5.0, "c1", "p1", "d1", None, None]]
    owner = pipes[0 if home_partition("d1", 4) < 2 else 1]
    first = owner.apply_requests(requests)
    state = owner.features.data["d:d1"]
    assert owner.apply_requests(requests) == first and owner.features.data["d:d1"] == state


def test_labels_of_entities_owned_elsewhere_are_routed_and_counted_once_by_the_owner():
    # the labelling pipeline writes the label history of the entities it owns and routes
    # the others' (learn_batch -> routed); applied by their owner, the next transaction's
    # label-history features are one pipeline's, and a request sent again counts once
    pipes = [ScoringPipeline("acme", partitions=4), ScoringPipeline("acme", partitions=4)]
    pipes[0].owned, pipes[1].owned = frozenset({0, 1}), frozenset({2, 3})
    reference: dict = {}
    fx = FeatureExtractor()
    routed_total = 0
    for r in range(5):
        batch = [tx(10 * r + j, customer=f"c{(j + r) % 7}",
                    payment_instrument=f"p{(j * 3 + r) % 8}", device_id=f"d{(j + 2 * r) % 6}",
                    ip=f"10.0.0.{(j + r) % 6}")
                 for j in range(6)]
        expected = {t["tx_id"]: fx.extract_values(t, reference) for t in batch}
        owner_of = [0 if home_partition(t["customer_id"], 4) < 2 else 1 for t in batch]
        pending = [pipe.begin_batch([record(t, partition=home_partition(t["customer_id"], 4))
                                     for t, o in zip(batch, owner_of, strict=True) if o == i])
                   for i, pipe in enumerate(pipes)]
        answers: dict = {}
        for p in pending:
            for home, requests in p.requests.items():
                for replies in pipes[0 if home < 2 else 1].apply_requests(requests).values():
                    answers.update({(tx_id, kind): v for tx_id, kind, v in replies})
        for pipe, p in zip(pipes, pending, strict=True):
            pipe.finish_batch(p, answers)
        got = {t["tx_id"]: pipes[o].scored.get(t["tx_id"])["x"]
               for t, o in zip(batch, owner_of, strict=True)}
        assert got == expected
        for j, (t, o) in enumerate(zip(batch, owner_of, strict=True)):
            if j % 2:
                continue
            fraud = j % 4 == 0
            result = pipes[o].learn_batch([label(t["tx_id"], fraud)])
            assert result.learned == 1
            for home, requests in result.routed.items():
                owner = pipes[0 if home < 2 else 1]
                routed_total += len(requests)
                for _ in range(2):  # sent again: counted once
                    acks = owner.apply_label_requests(requests)
                assert acks == {requests[0][0]: [(q[3], q[1]) for q in requests]}
            fx.learn_label(reference, t["occurred_at"], t["customer_id"],
                           t["payment_instrument"], t["device_id"], fraud)
    assert routed_total > 0
    assert any(v[-12] > 0 for v in expected.values())  # the history is in the features
