"""Streaming features: exact sliding windows, plain-data state, determinism."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from fraud.features import FEATURE_NAMES, MAX_EVENTS, FeatureExtractor
from fraud.schema import Transaction


class OnlyGetSet:
    """The smallest store the extractor accepts (what a faust Table offers, and less)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.writes = 0

    def get(self, key: str, default: Any = None) -> Any:
        # hand out copies, as a store that serialises values would
        value = self.data.get(key, default)
        return json.loads(json.dumps(value)) if value is not None else default

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes += 1
        self.data[key] = json.loads(json.dumps(value))


def make_stream(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    t = 1_700_000_000.0
    out = []
    for i in range(n):
        t += rng.choice((1.0, 30.0, 400.0, 2000.0, 20000.0))
        out.append({
            "tx_id": f"t{i}", "retailer_id": "r", "occurred_at": t,
            "amount": round(rng.uniform(1, 300), 2), "customer_id": f"c{rng.randrange(5)}",
            "payment_instrument": f"p{rng.randrange(6)}", "device_id": f"d{rng.randrange(4)}",
            "ip": f"10.0.0.{rng.randrange(4)}", "channel": rng.choice(("web", "app", "pos")),
            "coupon_code": rng.choice((None, None, "SPRING", "WELCOME")),
            "item_count": rng.randrange(1, 5), "address_mismatch": rng.random() < 0.1,
        })
    return out


def test_every_feature_is_present_and_finite() -> None:
    fx, state = FeatureExtractor(), {}
    for tx in make_stream(200):
        x = fx.extract(tx, state)
        assert tuple(x) == FEATURE_NAMES
        assert all(isinstance(v, float) and math.isfinite(v) for v in x.values())


def test_windows_match_brute_force() -> None:
    fx, state = FeatureExtractor(), {}
    stream = make_stream(400, seed=3)
    for i, tx in enumerate(stream):
        x = fx.extract(tx, state)
        for entity, field in (("customer", "customer_id"), ("instrument", "payment_instrument"),
                              ("device", "device_id"), ("ip", "ip")):
            prior = [p for p in stream[:i] if p[field] == tx[field]]
            for seconds, name in ((600, "10m"), (3600, "1h"), (86400, "24h")):
                inside = [p for p in prior if p["occurred_at"] > tx["occurred_at"] - seconds]
                assert x[f"{entity}_n_{name}"] == len(inside)
                total = sum(p["amount"] for p in inside)
                assert math.isclose(x[f"{entity}_amt_{name}"], math.log1p(total), abs_tol=1e-9)
            gap = tx["occurred_at"] - prior[-1]["occurred_at"] if prior else 30 * 86400.0
            assert math.isclose(x[f"{entity}_since_last_log"], math.log1p(gap))
        devices = {p["device_id"] for p in stream[:i] if p["customer_id"] == tx["customer_id"]}
        assert x["customer_new_device"] == (tx["device_id"] not in devices)
        instruments = {p["payment_instrument"] for p in stream[: i + 1]
                       if p["device_id"] == tx["device_id"]}
        assert x["device_instruments"] == len(instruments)


def test_amount_zscore_against_customer_history() -> None:
    fx, state = FeatureExtractor(), {}
    base = {"customer_id": "c", "payment_instrument": "p", "occurred_at": 0.0}
    amounts = [10.0, 12.0, 11.0, 9.0, 10.5]
    for i, a in enumerate(amounts):
        fx.extract({**base, "amount": a, "occurred_at": float(i)}, state)
    x = fx.extract({**base, "amount": 500.0, "occurred_at": 10.0}, state)
    logs = [math.log1p(a) for a in amounts]
    mean = sum(logs) / len(logs)
    std = math.sqrt(sum((v - mean) ** 2 for v in logs) / len(logs))
    assert math.isclose(x["customer_amount_z"], min(10.0, (math.log1p(500.0) - mean) / std))


def test_a_subnormal_amount_spread_gives_a_zero_zscore_not_a_crash() -> None:
    # amounts 0 and 3e-162 leave m2 at the smallest subnormal, and m2 / 2 rounds to 0: the
    # third transaction divided by zero (a worker's decide agent would have stopped)
    fx, state = FeatureExtractor(), {}
    base = {"customer_id": "c", "payment_instrument": "p"}
    for i, amount in enumerate((0.0, 3e-162)):
        fx.extract({**base, "amount": amount, "occurred_at": float(i)}, state)
    assert 0.0 < state["c:c"]["m2"] < 1e-320
    x = fx.extract({**base, "amount": 1.0, "occurred_at": 2.0}, state)
    assert x["customer_amount_z"] == 0.0


def test_dict_store_and_get_set_store_agree_and_state_is_plain_data() -> None:
    fx = FeatureExtractor()
    plain: dict[str, Any] = {}
    store = OnlyGetSet()
    for tx in make_stream(300, seed=5):
        assert fx.extract(tx, plain) == fx.extract(tx, store)
    assert json.loads(json.dumps(plain)) == plain
    assert msgpack.unpackb(msgpack.packb(plain)) == plain
    assert store.data == plain


def test_deterministic_and_restartable_from_serialised_state() -> None:
    stream = make_stream(300, seed=9)
    fx = FeatureExtractor()
    a: dict[str, Any] = {}
    first = [fx.extract(tx, a) for tx in stream]
    b: dict[str, Any] = {}
    head = [fx.extract(tx, b) for tx in stream[:150]]
    b = json.loads(json.dumps(b))  # a worker restart restoring its table
    tail = [fx.extract(tx, b) for tx in stream[150:]]
    assert first == head + tail


def test_transaction_objects_and_mappings_give_the_same_features() -> None:
    fx = FeatureExtractor()
    s1: dict[str, Any] = {}
    s2: dict[str, Any] = {}
    for tx in make_stream(100, seed=2):
        obj = Transaction.from_dict(tx)
        assert fx.extract(obj, s1) == fx.extract(obj.to_dict(), s2)


def test_burst_window_is_capped_and_time_going_backwards_is_clamped() -> None:
    fx, state = FeatureExtractor(), {}
    tx = {"customer_id": "c", "payment_instrument": "p", "amount": 1.0, "device_id": "bot"}
    for i in range(MAX_EVENTS + 50):
        x = fx.extract({**tx, "occurred_at": 1000.0 + i * 0.01}, state)
    assert x["device_n_10m"] == MAX_EVENTS
    late = fx.extract({**tx, "occurred_at": 0.0}, state)
    assert late["device_since_last_log"] == 0.0
    assert len(state["d:bot"]["t"]) == MAX_EVENTS


def test_missing_entities_give_zero_features_and_no_state() -> None:
    fx, state = FeatureExtractor(prefix="r1/"), {}
    x = fx.extract({"occurred_at": 5.0, "amount": 3.0, "customer_id": "c"}, state)
    assert x["device_n_24h"] == 0.0 and x["ip_n_1h"] == 0.0
    assert tuple(x) == FEATURE_NAMES
    assert tuple(fx.extract({"occurred_at": 6.0, "amount": 1.0}, state)) == FEATURE_NAMES
    assert list(state) == ["r1/c:c"]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5000), st.floats(0, 1000)), max_size=40))
def test_counts_never_negative_and_bounded(events: list[tuple[float, float]]) -> None:
    fx, state = FeatureExtractor(), {}
    for i, (gap, amount) in enumerate(events):
        x = fx.extract({"occurred_at": gap * (i % 3), "amount": amount, "customer_id": "c",
                        "payment_instrument": "p"}, state)
        assert 0 <= x["customer_n_10m"] <= x["customer_n_1h"] <= x["customer_n_24h"] <= i


def test_label_history_matches_brute_force_over_known_labels() -> None:
    """Per entity, frauds and smoothed fraud rate among the labels known so far, by window."""
    rng = random.Random(5)
    fx, state = FeatureExtractor(), OnlyGetSet()
    known: list[tuple[float, str, bool]] = []  # (event time, device, fraud) of known labels
    t = 1_700_000_000.0
    for _ in range(400):
        t += rng.choice((600.0, 3600.0, 86400.0, 5 * 86400.0))
        device = f"d{rng.randrange(3)}"
        x = fx.extract_fields(state, t, 10.0, None, None, device)
        for days, w in ((14, "14d"), (60, "60d")):
            mine = [f for ts, d, f in known if d == device and ts > t - days * 86400.0]
            assert x[f"device_frauds_{w}"] == math.log1p(sum(mine))
            assert x[f"device_fraud_rate_{w}"] == sum(mine) / (len(mine) + 1.0)
        if rng.random() < 0.5:  # only some labels ever arrive
            fraud = rng.random() < 0.3
            fx.learn_label(state, t, None, None, device, fraud)
            known.append((t, device, fraud))


def test_labels_arriving_late_and_out_of_order_count_at_their_own_time() -> None:
    fx, state = FeatureExtractor(), {}
    day = 86400.0
    fx.learn_label(state, 10 * day, "c1", "p1", "d1", True)
    fx.learn_label(state, 2 * day, "c1", "p1", "d1", False)  # an older label, later
    fx.learn_label(state, 5 * day, "c1", None, None, True)
    x = fx.extract_fields(state, 20 * day, 5.0, "c1", "p1", "d1")
    # 14 days back from day 20: the day-10 fraud only; 60 days: all three labels
    assert x["customer_frauds_14d"] == math.log1p(1) and x["customer_fraud_rate_14d"] == 0.5
    assert x["customer_frauds_60d"] == math.log1p(2) and x["customer_fraud_rate_60d"] == 0.5
    assert x["instrument_fraud_rate_60d"] == 1 / 3 and x["device_frauds_14d"] == math.log1p(1)
    x = fx.extract_fields(state, 100 * day, 5.0, "c1", "p1", "d1")
    assert all(x[k] == 0.0 for k in x if "_fraud" in k)  # everything older than 60 days
    assert json.loads(json.dumps(state)) == state


def test_a_repeated_transaction_gets_its_remembered_fragment_from_either_state_form() -> None:
    # remembered fragments are kept as JSON text ("fi"/"fv"); a state written when they were
    # a dict of lists ("f") is read the same way, and converted at its next write
    fx = FeatureExtractor()
    txs = [Transaction.from_dict(tx) for tx in make_stream(40)]
    state: dict[str, Any] = {}
    first = [fx.extract_remembered(tx, state) for tx in txs]
    stored = json.loads(json.dumps(state))
    assert all(json.loads(json.dumps(fx.extract_remembered(tx, state))) == values
               for tx, values in zip(txs[-3:], first[-3:], strict=True))
    assert json.loads(json.dumps(state)) == stored  # a repeat changes nothing
    old_form = json.loads(json.dumps({
        key: {**{k: v for k, v in st.items() if k not in ("fi", "fv")},
              "f": {i: json.loads(v) for i, v in zip(st["fi"], st["fv"], strict=True)}}
        for key, st in stored.items()}))
    assert [fx.extract_remembered(tx, old_form) for tx in txs[-3:]] == first[-3:]
    later = Transaction.from_dict(make_stream(41)[-1])
    assert fx.extract_remembered(later, old_form) == fx.extract_remembered(later, stored)
    key = "c:" + str(later.customer_id)
    assert "f" not in old_form[key] and old_form[key] == stored[key]
