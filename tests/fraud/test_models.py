"""The default model: learning, plain-data state, and the merge laws the federation relies on."""

from __future__ import annotations

import json
import math
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fraud.models import (
    ModelParams,
    RiskModel,
    RunningScaler,
    empty_state,
    merge_linear,
    merge_scalers,
    merge_states,
)
from fraud.schema import SchemaError

KEYS = ("a", "b", "c", "d")
values = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)
vectors = st.dictionaries(st.sampled_from(KEYS), values, min_size=1)
batches = st.lists(vectors, max_size=30)


def _trained_scaler(batch: list[dict[str, float]]) -> RunningScaler:
    scaler = RunningScaler()
    for x in batch:
        scaler.learn_one(x)
    return scaler


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=150, deadline=None)
@given(batches, batches)
def test_scaler_merge_equals_training_on_the_union(left, right) -> None:
    merged = merge_scalers([_trained_scaler(left).to_dict(), _trained_scaler(right).to_dict()])
    union = _trained_scaler(left + right).to_dict()
    assert merged["counts"] == union["counts"]
    for key in union["counts"]:
        assert _close(merged["means"][key], union["means"][key])
        scale = max(1.0, union["vars"][key])
        assert abs(merged["vars"][key] - union["vars"][key]) <= 1e-9 * scale


@settings(max_examples=100, deadline=None)
@given(st.lists(batches, min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_scaler_merge_is_order_independent(parts, rnd) -> None:
    states = [_trained_scaler(p).to_dict() for p in parts]
    shuffled = list(states)
    rnd.shuffle(shuffled)
    assert merge_scalers(states) == merge_scalers(shuffled)


@settings(max_examples=100, deadline=None)
@given(batches)
def test_scaler_merge_with_empty_is_identity(batch) -> None:
    state = _trained_scaler(batch).to_dict()
    empty = RunningScaler().to_dict()
    assert merge_scalers([state, empty]) == merge_scalers([empty, state]) == merge_scalers([state])
    for key, n in state["counts"].items():
        merged = merge_scalers([state, empty])
        assert merged["counts"][key] == n
        assert merged["means"][key] == state["means"][key]
        assert merged["vars"][key] == state["vars"][key]


def _trained_model(batch: list[dict[str, float]], seed: int) -> RiskModel:
    rng = random.Random(seed)
    model = RiskModel()
    for x in batch:
        model.learn_one(x, rng.random() < 0.3)
        model.learn_unsupervised_one(x)
    return model


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(batches, st.integers(0, 9)), min_size=1, max_size=4),
       st.randoms(use_true_random=False))
def test_model_merge_is_order_independent(parts, rnd) -> None:
    states = [_trained_model(b, s).export_state() for b, s in parts]
    shuffled = list(states)
    rnd.shuffle(shuffled)
    assert merge_states(states) == merge_states(shuffled)


@settings(max_examples=80, deadline=None)
@given(batches, st.integers(0, 9))
def test_model_merge_with_empty_is_identity(batch, seed) -> None:
    state = _trained_model(batch, seed).export_shared()
    merged = merge_states([empty_state(), state, empty_state()], version=state["version"])
    assert merged["linear"] == merge_linear([state["linear"]]) == state["linear"]
    assert merged["scaler"] == state["scaler"]
    model = RiskModel.from_state(merged)
    same = RiskModel.from_state(state)
    assert model.export_shared() == same.export_shared()


def test_linear_merge_is_count_weighted_over_the_union_of_keys() -> None:
    a = {"weights": {"x": 1.0, "y": -2.0}, "intercept": 0.5, "n": 30, "n_pos": 3, "n_neg": 27}
    b = {"weights": {"x": 4.0, "z": 1.0}, "intercept": -0.5, "n": 10, "n_pos": 1, "n_neg": 9}
    m = merge_linear([a, b])
    assert m["weights"] == {"x": (30 * 1.0 + 10 * 4.0) / 40, "y": -2.0, "z": 1.0}
    assert m["intercept"] == pytest.approx((30 * 0.5 - 10 * 0.5) / 40)
    assert (m["n"], m["n_pos"], m["n_neg"]) == (40, 4, 36)


def _separable(n: int, seed: int) -> list[tuple[dict[str, float], bool]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        y = rng.random() < 0.05
        x = {"amount": rng.gauss(5.0 if y else 2.0, 1.0),
             "velocity": rng.gauss(3.0 if y else 0.0, 1.0), "noise": rng.gauss(0.0, 1.0)}
        out.append((x, y))
    return out


def test_learns_an_imbalanced_problem_and_explains_itself() -> None:
    model = RiskModel()
    data = _separable(3000, 1)
    for x, y in data:
        model.score_one(x, observe=True)
        model.learn_one(x, y)
    test = _separable(1000, 2)
    fraud = [model.score_one(x) for x, y in test if y]
    legit = [model.score_one(x) for x, y in test if not y]
    pairs = sum(f > g for f in fraud for g in legit) / (len(fraud) * len(legit))
    assert pairs > 0.97
    names = [k for k, _ in model.contributions({"amount": 7.0, "velocity": 5.0, "noise": 0.0})]
    assert names[:2] == ["velocity", "amount"] or names[:2] == ["amount", "velocity"]


def test_unlabelled_retailer_still_ranks_anomalies_first() -> None:
    model = RiskModel()
    rng = random.Random(4)
    for _ in range(500):
        model.learn_unsupervised_one({"amount": rng.gauss(2.0, 0.5),
                                      "velocity": rng.gauss(0.0, 1.0)})
    normal = model.score_one({"amount": 2.1, "velocity": 0.2})
    odd = model.score_one({"amount": 9.0, "velocity": 8.0})
    assert 0.0 <= normal < odd <= 1.0


@pytest.mark.parametrize("codec", ["json", "msgpack"])
def test_state_round_trips_through_json_and_msgpack(codec) -> None:
    model = RiskModel(learning_rate=0.05)
    for x, y in _separable(500, 3):
        model.score_one(x, observe=True)
        model.learn_one(x, y)
    state = model.export_state()
    if codec == "json":
        decoded = json.loads(json.dumps(state))
    else:
        decoded = msgpack.unpackb(msgpack.packb(state))
    clone = RiskModel.from_state(decoded)
    assert clone.export_state() == state
    for x, _ in _separable(50, 4):
        assert clone.score_one(x, observe=True) == model.score_one(x, observe=True)
    x = {"amount": 3.0, "velocity": 1.0, "noise": 0.0}
    clone.learn_one(x, True)
    model.learn_one(x, True)
    assert clone.weights == pytest.approx(model.weights, rel=1e-12)


def test_load_shared_keeps_local_anomaly_statistics() -> None:
    local = RiskModel()
    for x, y in _separable(200, 5):
        local.learn_unsupervised_one(x)
        local.learn_one(x, y)
    anomaly = local.anomaly.to_dict()
    other = RiskModel()
    other.learn_one({"amount": 1.0}, True)
    local.load_shared(merge_states([other.export_state()], version="g7"))
    assert local.version == "g7" and local.n == 1
    assert local.anomaly.to_dict() == anomaly


def test_batch_variants_equal_one_at_a_time() -> None:
    data = _separable(300, 6)
    xs = [x for x, _ in data]
    ys = [y for _, y in data]
    a, b = RiskModel(), RiskModel()
    a.learn_many(xs, ys)
    for x, y in data:
        b.learn_one(x, y)
    assert a.export_state() == b.export_state()
    assert a.score_many(xs, observe=True) == [b.score_one(x, observe=True) for x in xs]
    assert a.predict_proba_many(xs[:5]) == [b.predict_proba_one(x)[True] for x in xs[:5]]
    with pytest.raises(ValueError):
        a.learn_many(xs, ys[:-1])


@pytest.mark.parametrize(
    ("state", "field"),
    [
        ({"v": 2, "kind": "risk_model"}, "v"),
        ({"v": 1, "kind": "other"}, "kind"),
        ({"v": 1, "kind": "risk_model", "linear": {}}, "scaler"),
        ({**empty_state(), "params": {"learning_rate": "fast"}}, "params.learning_rate"),
        ({**empty_state(), "params": {"momentum": 0.9}}, "params.momentum"),
        ({**empty_state(), "linear": {"weights": {}}}, "model"),
    ],
)
def test_bad_states_name_the_field(state, field) -> None:
    with pytest.raises(SchemaError) as err:
        RiskModel.from_state(state)
    assert err.value.field == field


def test_flat_hyper_parameters_and_their_plain_data_form() -> None:
    params = ModelParams(learning_rate=0.05, anomaly_min_events=3)
    model = RiskModel.from_params(params)
    assert model.learning_rate == 0.05 and model.anomaly_min_events == 3
    assert model.params == params == RiskModel.from_params(params.to_dict()).params
    assert model.clone().params == params
    model.learn_one({"a": 1.0}, True)
    model.params = ModelParams(l2=0.5)  # a config change keeps what was learned
    assert model.l2 == 0.5 and model.learning_rate == 0.03 and model.n == 1
    with pytest.raises(SchemaError):
        RiskModel(anomaly_weight=1.5)


def test_scoring_learns_nothing_until_the_unsupervised_step() -> None:
    model = RiskModel(anomaly_min_events=0)
    x = {"amount": 2.0, "velocity": 1.0}
    for v in range(50):
        model.learn_one({"amount": float(v % 5), "velocity": 0.0}, v % 10 == 0)
    before = model.export_state()
    assert model.predict_proba_one(x) == model.predict_proba_one(x)
    model.score_one(x)
    model.score_many([x, x])
    model.score_and_explain(x)
    assert model.export_state() == before
    twin = RiskModel.from_state(before)
    fused = model.score_one(x, observe=True)
    assert fused == twin.predict_proba_one(x)[True]
    twin.learn_unsupervised_one(x)
    assert model.export_state() == twin.export_state() != before


def test_sample_weight_scales_the_step() -> None:
    a, b, c = RiskModel(), RiskModel(), RiskModel()
    for m in (a, b, c):
        m.learn_one({"x": 0.0}, False)
        m.learn_one({"x": 2.0}, False)
    a.learn_one({"x": 5.0}, True)
    b.learn_one({"x": 5.0}, True, w=1.0)
    c.learn_one({"x": 5.0}, True, w=3.0)
    assert a.export_state() == b.export_state()
    assert c.weights["x"] > a.weights["x"] > 0.0


def _learn_all(model: RiskModel, data: list[tuple[dict[str, float], bool]]) -> None:
    for x, y in data:
        model.learn_one(x, y)


def test_export_delta_holds_only_what_was_learned_since_the_global_model() -> None:
    """load_shared -> learn -> export_delta -> merge, two clients and two rounds: every label is
    counted once and the global scaler is the one trained on all labelled data."""
    data = _separable(400, 8)
    chunks = [data[i:i + 100] for i in range(0, 400, 100)]  # round 1: 0, 1; round 2: 2, 3
    seen: list[tuple[dict[str, float], bool]] = []
    global_state = empty_state()
    clients = [RiskModel(), RiskModel()]
    for rnd, pair in enumerate((chunks[:2], chunks[2:])):
        deltas = []
        for client, chunk in zip(clients, pair, strict=True):
            client.load_shared(global_state)
            _learn_all(client, chunk)
            seen.extend(chunk)
            delta = client.export_delta()
            assert delta["delta_of"] == global_state["version"]
            assert delta["linear"]["n"] == len(chunk)
            deltas.append(delta)
        global_state = merge_states([global_state, *deltas], version=f"g{rnd + 1}")
        linear = global_state["linear"]
        assert linear["n"] == len(seen)
        assert linear["n_pos"] == sum(y for _, y in seen)
        assert linear["n_neg"] == sum(not y for _, y in seen)
        union = _trained_scaler([x for x, _ in seen]).to_dict()
        assert global_state["scaler"]["counts"] == union["counts"]
        for key in union["counts"]:
            assert _close(global_state["scaler"]["means"][key], union["means"][key])
            assert _close(global_state["scaler"]["vars"][key], union["vars"][key])


def test_export_delta_survives_a_restart_and_is_everything_without_a_global_model() -> None:
    model = RiskModel()
    _learn_all(model, _separable(50, 9))
    delta = model.export_delta()
    assert delta["delta_of"] is None
    assert {k: v for k, v in delta.items() if k != "delta_of"} == model.export_shared()
    model.load_shared(model.export_shared())
    assert model.export_delta()["linear"]["n"] == 0
    assert model.export_delta()["scaler"]["counts"] == {}
    _learn_all(model, _separable(30, 10))
    restarted = RiskModel.from_state(json.loads(json.dumps(model.export_state())))
    assert restarted.export_delta() == model.export_delta()
    assert restarted.export_delta()["linear"]["n"] == 30


@settings(max_examples=80, deadline=None)
@given(batches, batches)
def test_scaler_delta_merged_back_onto_its_base_is_the_whole(base, more) -> None:
    from fraud.models.scaler import subtract_scaler

    base_state = _trained_scaler(base).to_dict()
    whole = _trained_scaler(base + more).to_dict()
    delta = subtract_scaler(whole, base_state)
    assert sum(delta["counts"].values()) == sum(len(x) for x in more)
    merged = merge_scalers([base_state, delta])
    assert merged["counts"] == whole["counts"]
    for key in whole["counts"]:
        scale = max(1.0, abs(whole["means"][key]))
        assert abs(merged["means"][key] - whole["means"][key]) <= 1e-9 * scale
        scale = max(1.0, whole["vars"][key], whole["means"][key] ** 2)
        assert abs(merged["vars"][key] - whole["vars"][key]) <= 1e-8 * scale
