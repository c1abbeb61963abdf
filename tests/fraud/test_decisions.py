"""Decision policy: precedence, reasons, plain-data config that can be swapped at run time."""

from __future__ import annotations

import json

import pytest

from fraud.decisions import Policy, PolicyConfig, Watchlist, decide
from fraud.schema import Decision, SchemaError, Transaction

CONFIG = PolicyConfig.from_dict({
    "v": 1,
    "version": 4,
    "thresholds": {"verify": 0.4, "hold": 0.7, "block": 0.9},
    "block": {"customers": ["c-bad"], "instruments": ["p-stolen"], "ips": ["6.6.6.6"]},
    "allow": {"customers": ["c-vip"], "devices": ["d-trusted"]},
    "rules": [
        {"name": "huge", "field": "amount", "op": ">", "value": 10000, "action": "block"},
        {"name": "big", "field": "amount", "op": ">", "value": 2000, "action": "hold"},
        {"name": "burst", "field": "feature:device_n_10m", "op": ">=", "value": 20,
         "action": "verify"},
        {"name": "risky-tier", "field": "loyalty_tier", "op": "in", "value": ["none"],
         "action": "verify"},
    ],
    "model": {"learning_rate": 0.01},
    "top_reasons": 2,
})

TX = Transaction.from_dict({"tx_id": "t1", "retailer_id": "acme", "amount": 50,
                            "customer_id": "c1", "payment_instrument": "p1",
                            "device_id": "d1", "ip": "1.2.3.4", "occurred_at": 0})


def _tx(**changes):
    return Transaction.from_dict({**TX.to_dict(), **changes})


@pytest.mark.parametrize(
    ("changes", "score", "action", "first_reason"),
    [
        ({}, 0.1, "allow", None),
        ({}, 0.5, "verify", "score>=verify"),
        ({}, 0.75, "hold", "score>=hold"),
        ({}, 0.95, "block", "score>=block"),
        ({"customer_id": "c-bad"}, 0.0, "block", "blocklist:customer"),
        ({"payment_instrument": "p-stolen", "customer_id": "c-vip"}, 0.0, "block",
         "blocklist:instrument"),
        ({"amount": 20000, "customer_id": "c-vip"}, 0.0, "block", "rule:huge"),
        ({"customer_id": "c-vip"}, 0.99, "allow", "allowlist:customer"),
        ({"device_id": "d-trusted", "amount": 5000}, 0.99, "allow", "allowlist:device"),
        ({"amount": 5000}, 0.1, "hold", "rule:big"),
        ({"amount": 5000}, 0.95, "block", "score>=block"),
        ({"loyalty_tier": "none"}, 0.1, "verify", "rule:risky-tier"),
    ],
)
def test_precedence(changes, score, action, first_reason) -> None:
    d = decide(_tx(**changes), score, CONFIG, contributions=[("amount_log", 2.0), ("x", 1.0),
                                                              ("y", 0.5)])
    assert d.action == action
    assert d.reasons[0] == first_reason if first_reason else d.reasons[0] == "amount_log +2.00"
    assert d.reasons[-2:] == ("amount_log +2.00", "x +1.00")
    assert d.config_version == 4
    assert Decision.from_json(d.to_json()) == d


def test_feature_rules_and_timings() -> None:
    d = decide(TX, 0.0, CONFIG, features={"device_n_10m": 25.0}, model_version="g3",
               timings={"received": 1.0})
    assert (d.action, d.reasons[0], d.model_version) == ("verify", "rule:burst", "g3")
    assert d.timings["received"] == 1.0 and d.timings["decided"] >= 1.0


def test_mapping_transactions_are_accepted() -> None:
    tx = {"tx_id": "t", "retailer_id": "r", "amount": 3000.0}
    assert decide(tx, 0.0, CONFIG).action == "hold"


def test_config_round_trips_as_json() -> None:
    again = PolicyConfig.from_dict(json.loads(json.dumps(CONFIG.to_dict())))
    assert again == CONFIG
    assert again.model.learning_rate == 0.01


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"v": 9}, "v"),
        ({"thresholds": {"verify": 2}}, "thresholds.verify"),
        ({"thresholds": {"verify": 0.9, "hold": 0.5}}, "thresholds"),
        ({"block": {"cards": ["x"]}}, "block.cards"),
        ({"allow": {"ips": "1.2.3.4"}}, "allow.ips"),
        ({"rules": [{"name": "r", "field": "amount", "op": "~", "value": 1, "action": "hold"}]},
         "rules[0].op"),
        ({"rules": [{"name": "r", "field": "amount", "op": ">", "value": 1, "action": "allow"}]},
         "rules[0].action"),
        ({"rules": [{"name": "r", "field": "amount", "op": ">", "action": "hold"}]},
         "rules[0].value"),
        ({"model": {"learning_rate": -1}}, "params.learning_rate"),
        ({"version": -1}, "version"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_config_names_the_field(patch, field) -> None:
    with pytest.raises(SchemaError) as err:
        PolicyConfig.from_dict({**CONFIG.to_dict(), **patch})
    assert err.value.field == field


def test_policy_swaps_config_at_run_time() -> None:
    policy = Policy(CONFIG)
    assert policy.decide(TX, 0.5).action == "verify"
    stricter = PolicyConfig.from_dict({**CONFIG.to_dict(), "version": 5,
                                       "thresholds": {"verify": 0.1, "hold": 0.3, "block": 0.5}})
    policy.replace(stricter)
    assert policy.decide(TX, 0.5).action == "block"
    with pytest.raises(ValueError):
        policy.replace(CONFIG)
    policy.replace(CONFIG, allow_older=True)
    assert policy.config.version == 4


# ---------------------------------------------------------------------------- watchlist rule


def _key_of(kind: str, value: str) -> str:
    return f"{kind}:{value}"  # the real hashing is fl.watchlist's; any function will do here


def test_watchlist_raises_a_listed_instrument_or_device_to_hold_with_its_reason() -> None:
    watch = Watchlist({"instrument:p1": 1, "device:d1": 3}, _key_of)
    decision = watch.escalate(decide(TX, 0.1, CONFIG), TX)
    assert decision.action == "hold"
    assert decision.reasons[0] == "watchlist:device reported by 3 other retailers"
    one = Watchlist({"instrument:p1": 1}, _key_of).escalate(decide(TX, 0.1, CONFIG), TX)
    assert one.reasons[0] == "watchlist:instrument reported by 1 other retailer"
    assert watch.hit(_tx(payment_instrument="p2", device_id="d2")) is None


def test_watchlist_never_lowers_a_decision_and_the_allow_list_wins() -> None:
    watch = Watchlist({"instrument:p1": 1}, _key_of)
    blocked = decide(TX, 0.99, CONFIG)
    assert watch.escalate(blocked, TX) is blocked
    vip = _tx(customer_id="c-vip")
    allowed = decide(vip, 0.1, CONFIG)
    assert allowed.action == "allow"
    assert watch.escalate(allowed, vip) is allowed
    assert Watchlist({}, _key_of).escalate(decide(TX, 0.1, CONFIG), TX).action == "allow"


def test_watchlist_action_is_checked() -> None:
    with pytest.raises(ValueError, match="action"):
        Watchlist({}, _key_of, action="allow")
    verify = Watchlist({"device:d1": 1}, _key_of, action="verify")
    assert verify.escalate(decide(TX, 0.1, CONFIG), TX).action == "verify"


def test_watchlist_min_score_leaves_rows_the_model_finds_harmless() -> None:
    watch = Watchlist({"instrument:p1": 1}, _key_of, min_score=0.3)
    assert watch.escalate(decide(TX, 0.29, CONFIG), TX).action == "allow"
    assert watch.escalate(decide(TX, 0.3, CONFIG), TX).action == "hold"
    with pytest.raises(ValueError, match="min_score"):
        Watchlist({}, _key_of, min_score=1.5)
