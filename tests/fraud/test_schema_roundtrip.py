"""Property tests: every canonical record survives its versioned JSON encoding."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fraud.schema import CHANNELS, LABEL_SOURCES, Decision, Label, SchemaError, Transaction

text = st.text(min_size=1, max_size=20)
opt_text = st.none() | text
# the wire form of a timestamp has microsecond precision
timestamps = st.integers(min_value=0, max_value=4_000_000_000_000_000).map(lambda us: us / 1e6)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
known = set(Transaction.FIELDS) | {"v", "kind", "extras"}
extra_values = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | finite | text
extras = st.dictionaries(text.filter(lambda k: k not in known), extra_values, max_size=4)


def _not_card(value: str) -> bool:
    digits = value.replace(" ", "").replace("-", "")
    return not (13 <= len(digits) <= 19 and digits.isdigit())


transactions = st.builds(
    Transaction,
    tx_id=text,
    retailer_id=text,
    occurred_at=timestamps,
    amount=st.floats(min_value=0, max_value=1e12, allow_nan=False),
    customer_id=text,
    payment_instrument=text.filter(_not_card),
    currency=st.text(string.ascii_uppercase, min_size=3, max_size=3),
    device_id=opt_text,
    ip=opt_text,
    channel=st.sampled_from(CHANNELS),
    store_id=opt_text,
    terminal_id=opt_text,
    coupon_code=opt_text,
    item_count=st.integers(0, 10_000),
    address_mismatch=st.booleans(),
    extras=extras,
)


@given(transactions)
def test_transaction_json_round_trip(tx: Transaction) -> None:
    assert Transaction.from_json(tx.to_json()) == tx
    assert Transaction.from_dict(json.loads(tx.to_json())) == tx


@given(transactions)
def test_transaction_encoding_is_a_fixed_point(tx: Transaction) -> None:
    once = Transaction.from_json(tx.to_json()).to_json()
    assert Transaction.from_json(once).to_json() == once


@given(transactions, extras)
def test_unknown_top_level_fields_land_in_extras(tx: Transaction, more: dict) -> None:
    d = tx.to_dict()
    del d["extras"]
    d.update(more)
    back = Transaction.from_dict(d)
    assert back.extras == more


labels = st.builds(
    Label,
    tx_id=text,
    is_fraud=st.booleans(),
    source=st.sampled_from(LABEL_SOURCES),
    labelled_at=timestamps,
    retailer_id=opt_text,
)


@given(labels)
def test_label_json_round_trip(label: Label) -> None:
    assert Label.from_json(label.to_json()) == label


decisions = st.builds(
    Decision,
    tx_id=text,
    retailer_id=text,
    score=st.floats(min_value=0, max_value=1),
    action=st.sampled_from(("allow", "verify", "hold", "block")),
    reasons=st.lists(st.text(max_size=30), max_size=5).map(tuple),
    model_version=st.text(max_size=10),
    config_version=st.integers(0, 2**31),
    timings=st.dictionaries(text, finite, max_size=4),
)


@given(decisions)
def test_decision_json_round_trip(decision: Decision) -> None:
    assert Decision.from_json(decision.to_json()) == decision


@pytest.mark.parametrize("field", ["amount", "item_count"])
def test_huge_integers_are_a_schema_error_not_an_overflow(field: str):
    d = {"tx_id": "t", "retailer_id": "r", "amount": 1, "customer_id": "c",
         "payment_instrument": "p", "occurred_at": 0, field: 10**400}
    with pytest.raises(SchemaError, match=field):
        Transaction.from_dict(d)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("amount", float("nan"), "must be finite"), ("amount", -0.5, "must be >= 0"),
     ("customer_id", "", "is required"), ("extras", [], "expected an object"),
     ("extras", 0, "expected an object")],
)
def test_fast_paths_keep_the_checks(field: str, value: object, message: str):
    d = {"tx_id": "t", "retailer_id": "r", "amount": 1.0, "customer_id": "c",
         "payment_instrument": "p", "occurred_at": 0, field: value}
    with pytest.raises(SchemaError, match=message):
        Transaction.from_dict(d)


def test_unknown_fields_beside_an_empty_extras_are_kept():
    d = {"tx_id": "t", "retailer_id": "r", "amount": 1.0, "customer_id": "c",
         "payment_instrument": "p", "occurred_at": 0, "extras": {}, "tier": "gold"}
    assert Transaction.from_dict(d).extras == {"tier": "gold"}
