"""Hostile input without Kafka: whatever the bytes, a record ends decided, learned or
dead-lettered with a reason, bounded, and nothing non-finite reaches state."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fraud.features import FeatureExtractor
from fraud.schema import InputBounds, Transaction
from streams.scoring import (
    BadRecord,
    InputRecord,
    ScoringPipeline,
    dead_letter,
    parse_transaction,
)

DLQ_BOUND = 64 * 1024
"""What a dead letter must stay under, whatever its input (the broker's limit is 1 MB)."""
NOW = time.time()
BOUNDS = InputBounds()


def tx(i: int = 1, **extra: Any) -> dict[str, Any]:
    return {"tx_id": f"t{i}", "retailer_id": "acme", "amount": 12.5, "customer_id": "c1",
            "payment_instrument": "p1", "device_id": "d1", "occurred_at": NOW - 60, **extra}


def raw(value: Any) -> bytes:
    return json.dumps(value).encode()


def record(value: bytes | None, offset: int = 0) -> InputRecord:
    return InputRecord(value, b"c1", 0, offset, NOW, "acme.transactions")


# The probe's crashers and the lax bounds of issue 23, each with the reason it must get.
FIXED: list[tuple[str, bytes, str]] = [
    ("5,000-digit integer", b'{"tx_id": ' + b"9" * 5000 + b"}", "int-too-large"),
    ("5,000-digit amount", raw(tx())[:-1] + b', "item_count": ' + b"1" * 5000 + b"}",
     "int-too-large"),
    ("nesting 10,000 deep", b"[" * 10_000 + b"]" * 10_000, "too-deep"),
    ("nesting 10,000 deep in an object", b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "too-deep"),
    ("nesting 40 deep in an envelope field", raw({**tx(), "x": 1})[:-1] + b', "deep": '
     + b"[" * 40 + b"]" * 40 + b"}", "too-deep"),
    ("1 MB of garbage", bytes(range(256)) * 4096, "too-large"),
    ("1 MB of JSON", raw({**tx(), "pad": "x" * 1_000_000}), "too-large"),
    ("amount 1e308", raw(tx(amount=1e308)), "out-of-range"),
    ("amount 1e400", raw(tx())[:-1] + b', "amount": 1e400}', "invalid"),
    ("amount NaN", raw(tx())[:-1] + b', "amount": NaN}', "invalid"),
    ("committed_at 1e400", raw({"v": 1, "op": "c", "tx": tx()})[:-1]
     + b', "committed_at": 1e400}', "invalid"),
    ("committed_at NaN", raw({"v": 1, "op": "c", "tx": tx()})[:-1]
     + b', "committed_at": NaN}', "invalid"),
    ("committed_at year 1", raw({"v": 1, "op": "c", "tx": tx(), "committed_at": -62135596800}),
     "out-of-range"),
    ("occurred_at year 1", raw(tx(occurred_at="0001-01-01T00:00:00Z")), "out-of-range"),
    ("occurred_at year 9999", raw(tx(occurred_at="9999-12-31T23:59:59Z")), "out-of-range"),
    ("occurred_at year 1 with an offset", raw(tx(occurred_at="0001-01-01T00:00:00+14:00")),
     "out-of-range"),
    ("NUL in an id", raw(tx(customer_id="c\x00")), "bad-string"),
    ("lone surrogate in an id", raw(tx(customer_id="c\ud800")), "bad-string"),
    ("lone surrogate as raw UTF-8", raw(tx())[:-1] + b', "note": "\xed\xa0\x80"}', "bad-string"),
    ("NUL in a key", raw({**tx(), "a\x00": 1}), "bad-string"),
    ("a 1,000-character id", raw(tx(tx_id="t" * 1000)), "too-long"),
    ("a 100 kB id", raw(tx(tx_id="t" * 100_000)), "too-large"),
    ("an id of 301 digits", raw(tx())[:-1] + b', "store_id": 1' + b"0" * 300 + b"}",
     "int-too-large"),
    ("CDC op x", raw({"v": 1, "op": "x", "tx": tx()}), "bad-op"),
    ("CDC op as a list", raw({"v": 1, "op": ["c"], "tx": tx()}), "bad-op"),
    ("item_count 1e300", raw(tx(item_count=1e300)), "out-of-range"),
    ("a tombstone", None, "empty"),  # type: ignore[list-item]
]


@pytest.mark.parametrize("name, value, reason", FIXED, ids=[f[0] for f in FIXED])
def test_each_known_crasher_is_a_bad_record_with_its_reason(name: str, value: bytes, reason: str):
    with pytest.raises(BadRecord) as info:
        parse_transaction(value, BOUNDS, NOW)
    assert info.value.reason == reason, info.value


def test_a_batch_with_every_crasher_decides_the_valid_ones_and_dead_letters_the_rest():
    pipe = ScoringPipeline("acme")
    records = [record(raw(tx(i)), offset=2 * i) for i in range(len(FIXED))]
    records += [record(value, offset=2 * i + 1) for i, (_, value, _) in enumerate(FIXED)]
    out = pipe.process_batch(sorted(records, key=lambda r: r.offset))
    assert len(out.decisions) == len(FIXED)
    assert sorted(json.loads(d.value)["tx_id"] for d in out.decisions) == sorted(
        f"t{i}" for i in range(len(FIXED)))
    letters = [json.loads(d.value) for d in out.dead_letters]
    assert [(d["offset"], d["reason"]) for d in letters] == [
        (2 * i + 1, reason) for i, (_, _, reason) in enumerate(FIXED)]
    for letter, out_record, (_, value, _) in zip(letters, out.dead_letters, FIXED, strict=True):
        assert out_record.value is not None and len(out_record.value) < DLQ_BOUND
        check_dead_letter(letter, value)


def check_dead_letter(letter: dict[str, Any], value: bytes | None) -> None:
    """The dead letter carries a head of ``value``, and its SHA-256 and length."""
    if value is None:
        assert letter["value"] is None and letter["value_sha256"] is None
        return
    assert letter["value_bytes"] == len(value)
    assert letter["value_sha256"] == hashlib.sha256(value).hexdigest()
    head = (letter["value"].encode() if letter["value"] is not None
            else base64.b64decode(letter["value_b64"]))
    assert value.startswith(head) and len(head) <= 4096
    assert letter["value_truncated"] == (len(value) > 4096)


def test_nothing_non_finite_enters_the_feature_state():
    pipe = ScoringPipeline("acme")
    hostile = [tx(1, amount=1e308), tx(2, amount=1.7e308), tx(3, occurred_at=1e300)]
    pipe.process_batch([record(raw(t), offset=i) for i, t in enumerate(hostile)])
    out = pipe.process_batch([record(raw(tx(9)), offset=9)])
    assert len(out.decisions) == 1 and not out.dead_letters  # the card is not poisoned
    assert all_finite(pipe.features.data)


def test_the_state_boundary_holds_for_a_transaction_built_elsewhere():
    # a Transaction from another path (no bounds): the pipeline itself refuses it
    pipe = ScoringPipeline("acme")
    bad = Transaction.from_dict(tx(1, amount=1e300))
    assert bad.amount == 1e300
    pipe.extractor.extract_values(Transaction.from_dict(tx(2)), pipe.features)
    before = dict(pipe.features.data)  # key -> the entity state's JSON bytes
    import streams.scoring as scoring

    original = scoring.parse_transaction
    try:
        scoring.parse_transaction = lambda *a: scoring.ParsedTransaction(bad, "c", None)
        out = pipe.process_batch([record(b"{}")])
    finally:
        scoring.parse_transaction = original
    assert [json.loads(d.value)["reason"] for d in out.dead_letters] == ["out-of-range"]
    assert dict(pipe.features.data) == before


def all_finite(value: Any) -> bool:
    """Every number in ``value`` is finite (stored entity states are JSON bytes: a
    non-finite float would be written as null or a NaN/Infinity literal)."""
    if isinstance(value, bytes):
        return all_finite(json.loads(value))
    if value is None:
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(all_finite(v) for v in value)
    return True


def test_an_unexpected_error_dead_letters_its_record_and_the_batch_goes_on():
    class Buggy(FeatureExtractor):
        def extract_remembered(self, t: Transaction, state: Any) -> list[float]:
            if t.tx_id == "t2":
                raise ZeroDivisionError("a bug")
            return super().extract_remembered(t, state)

    pipe = ScoringPipeline("acme")
    pipe.extractor = Buggy()
    out = pipe.process_batch([record(raw(tx(i)), offset=i) for i in range(1, 4)])
    assert sorted(json.loads(d.value)["tx_id"] for d in out.decisions) == ["t1", "t3"]
    [letter] = [json.loads(d.value) for d in out.dead_letters]
    assert (letter["reason"], letter["offset"]) == ("internal-error", 2)
    assert "ZeroDivisionError: a bug" in letter["error"]


def test_a_batch_that_fails_as_a_whole_is_processed_record_by_record():
    pipe = ScoringPipeline("acme")
    score = pipe.model.score_and_explain_many

    def buggy(names: Any, matrix: Any, top: int, observe: bool = False) -> Any:
        if matrix.shape[0] > 1:
            raise MemoryError("only one at a time")
        return score(names, matrix, top, observe=observe)

    pipe.model.score_and_explain_many = buggy  # type: ignore[method-assign]
    out = pipe.process_batch([record(raw(tx(i)), offset=i) for i in range(1, 4)])
    assert sorted(json.loads(d.value)["tx_id"] for d in out.decisions) == ["t1", "t2", "t3"]
    assert not out.dead_letters


def test_garbage_labels_are_dead_lettered_and_good_ones_learned():
    pipe = ScoringPipeline("acme")
    pipe.process_batch([record(raw(tx(1)))])
    good = raw({"tx_id": "t1", "is_fraud": True, "source": "chargeback", "labelled_at": NOW})
    labels = [b"\xff" * 1000, b"[" * 10_000, b'{"tx_id": ' + b"7" * 5000 + b"}", None,
              raw({"tx_id": "t1", "is_fraud": True, "source": "chargeback",
                   "labelled_at": "9999-01-01T00:00:00Z"}),
              raw({"tx_id": "t\x00", "is_fraud": 1, "source": "analyst", "labelled_at": NOW}),
              bytes(2_000_000), good]
    out = pipe.learn_batch([record(v, offset=i) for i, v in enumerate(labels)])
    assert out.learned == 1
    reasons = [json.loads(d.value)["reason"] for d in out.dead_letters]
    assert reasons == ["not-json", "too-deep", "int-too-large", "empty", "out-of-range",
                       "bad-string", "too-large"]
    assert all(len(d.value or b"") < DLQ_BOUND for d in out.dead_letters)


# --- properties over arbitrary bytes and JSON shapes ----------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.text(max_size=40))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=16,
)
field_values = (json_values | st.floats(min_value=-1e12, max_value=1e12)
                | st.floats(min_value=NOW - 20 * 365 * 86400, max_value=NOW + 3 * 86400)
                | st.sampled_from(["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z",
                                   "2026-01-01T00:00:00+14:00", "web", "pos", "EUR", "x" * 300,
                                   "", "\x00", "\ud800", "4111 1111 1111 1111"]))
transaction_shapes = st.fixed_dictionaries(
    {}, optional={name: field_values for name in (*Transaction.FIELDS, "v", "kind", "extras")},
).map(lambda d: {**tx(), **d})
envelopes = st.fixed_dictionaries(
    {"tx": transaction_shapes | json_values},
    optional={"v": st.just(1) | json_values, "op": st.sampled_from("crudx") | json_values,
              "committed_at": field_values, "before": json_values, "source": json_values},
)
records = (st.binary(max_size=2000) | json_values.map(raw) | transaction_shapes.map(raw)
           | envelopes.map(raw)
           | st.tuples(st.text(max_size=30), st.integers(1, 50_000)).map(
               lambda t: (t[0] * t[1]).encode("utf-8", "surrogatepass")))


def check_result(value: bytes) -> None:
    """``parse_transaction`` gives a finite, bounded transaction or a BadRecord, nothing else."""
    try:
        parsed = parse_transaction(value, BOUNDS, NOW)
    except BadRecord as exc:
        assert exc.reason and exc.message
        return
    if parsed.op == "d":
        return
    t = parsed.tx
    assert 0.0 <= t.amount <= BOUNDS.max_amount
    assert NOW - BOUNDS.max_age_s <= t.occurred_at <= NOW + BOUNDS.max_future_s
    assert parsed.committed_at is None or math.isfinite(parsed.committed_at)
    assert 0 <= t.item_count <= BOUNDS.max_item_count
    for name in ("tx_id", "retailer_id", "customer_id", "payment_instrument", "device_id",
                 "ip", "store_id", "terminal_id", "coupon_code"):
        text = getattr(t, name)
        assert text is None or (len(text) <= BOUNDS.max_id_chars and "\x00" not in text)
        assert text is None or text.encode()  # no lone surrogate: encodes as UTF-8
    # extras may hold null (fraud.schema.ExtraValue); every number among them is finite
    assert all(v is None or all_finite(v) for v in t.extras.values())


@settings(max_examples=600, deadline=None)
@given(records)
def test_parsing_any_record_gives_a_bounded_transaction_or_a_bad_record(value: bytes):
    check_result(value)


@settings(max_examples=300, deadline=None)
@given(st.lists(records, max_size=6))
def test_every_record_of_any_batch_is_decided_or_dead_lettered_within_bounds(
    values: list[bytes],
):
    pipe = ScoringPipeline("acme")
    records_ = [record(v, offset=i) for i, v in enumerate([raw(tx(999)), *values])]
    out = pipe.process_batch(records_)
    decided = {json.loads(d.value)["tx_id"] for d in out.decisions}
    assert "t999" in decided
    assert len(out.decisions) + len(out.dead_letters) + out.skipped == len(records_)
    for letter in out.dead_letters:
        assert letter.value is not None and len(letter.value) < DLQ_BOUND
        doc = json.loads(letter.value)
        assert doc["reason"] and doc["reason"] != "internal-error", doc
        check_dead_letter(doc, records_[doc["offset"]].value)
    assert all_finite(pipe.features.data)


@settings(max_examples=300, deadline=None)
@given(st.lists(records, max_size=6))
def test_every_label_of_any_batch_is_learned_counted_or_dead_lettered(values: list[bytes]):
    pipe = ScoringPipeline("acme")
    pipe.process_batch([record(raw(tx(1)))])
    out = pipe.learn_batch([record(v, offset=i) for i, v in enumerate(values)])
    assert out.learned + out.unknown + out.duplicate + len(out.dead_letters) == len(values)
    assert all(len(d.value or b"") < DLQ_BOUND for d in out.dead_letters)
    assert all(json.loads(d.value or b"")["reason"] != "internal-error" for d in out.dead_letters)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300_000), st.binary(max_size=5000) | st.none())
def test_a_dead_letter_is_bounded_whatever_its_input(value: bytes, key: bytes | None):
    rec = InputRecord(value, key, 3, 7, None, "acme.transactions")
    out = dead_letter(rec, "not-json", "x" * 100_000, "acme")
    assert out.value is not None and len(out.value) < DLQ_BOUND
    assert out.key is None or len(out.key) <= 256
    check_dead_letter(json.loads(out.value), value)
