"""River's StandardScaler | LogisticRegression as plain data, and the laws of its merge."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import compose, linear_model, optim, preprocessing

from fraud.models.river_state import (
    export_linear_pipeline,
    load_linear_pipeline,
    merge_linear_pipelines,
    scaler_from_dict,
    scaler_to_dict,
)
from fraud.schema import SchemaError

KEYS = ("a", "b", "c")
values = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)
vectors = st.dictionaries(st.sampled_from(KEYS), values, min_size=1)
batches = st.lists(vectors, max_size=30)
labelled = st.lists(st.tuples(st.fixed_dictionaries({k: values for k in KEYS}), st.booleans()),
                    max_size=40)


def _pipeline() -> compose.Pipeline:
    return compose.Pipeline(preprocessing.StandardScaler(),
                            linear_model.LogisticRegression(optimizer=optim.SGD(0.05)))


def _fitted(rows: list[tuple[dict[str, float], bool]]) -> tuple[compose.Pipeline, dict]:
    pipe = _pipeline()
    for x, y in rows:
        pipe.learn_one(x, y)
    n_pos = sum(y for _, y in rows)
    return pipe, export_linear_pipeline(pipe, len(rows), n_pos, len(rows) - n_pos)


def _logit(pipe: compose.Pipeline, x: dict[str, float]) -> float:
    scaler, logistic = pipe.steps.values()
    return float(logistic._raw_dot_one(scaler.transform_one(x)))


def _scaler(batch: list[dict[str, float]]) -> preprocessing.StandardScaler:
    scaler = preprocessing.StandardScaler()
    for x in batch:
        scaler.learn_one(x)
    return scaler


def _state(scaler: preprocessing.StandardScaler, n: int) -> dict:
    """A pipeline state around a scaler (the weights do not matter to scaler laws)."""
    pipe = compose.Pipeline(scaler, linear_model.LogisticRegression())
    return export_linear_pipeline(pipe, n, 0, n)


@settings(max_examples=120, deadline=None)
@given(batches, batches)
def test_scaler_merge_equals_the_scaler_fitted_on_the_concatenation(left, right) -> None:
    merged = merge_linear_pipelines([_state(_scaler(left), len(left)),
                                     _state(_scaler(right), len(right))])["scaler"]
    union = scaler_to_dict(_scaler(left + right))
    assert merged["counts"] == union["counts"]
    for key in union["counts"]:
        assert math.isclose(merged["means"][key], union["means"][key], rel_tol=1e-9,
                            abs_tol=1e-9)
        scale = max(1.0, union["vars"][key])
        assert abs(merged["vars"][key] - union["vars"][key]) <= 1e-8 * scale


@settings(max_examples=80, deadline=None)
@given(st.lists(labelled, min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_merge_is_order_independent(parts, rnd) -> None:
    states = [_fitted(rows)[1] for rows in parts]
    shuffled = list(states)
    rnd.shuffle(shuffled)
    assert merge_linear_pipelines(states) == merge_linear_pipelines(shuffled)


@settings(max_examples=80, deadline=None)
@given(labelled)
def test_merge_of_one_and_with_empty_is_the_identity(rows) -> None:
    _, state = _fitted(rows)
    _, empty = _fitted([])
    assert merge_linear_pipelines([state]) == state
    if rows:
        assert merge_linear_pipelines([empty, state, empty]) == state


@settings(max_examples=80, deadline=None)
@given(st.lists(labelled.filter(bool), min_size=2, max_size=4),
       st.fixed_dictionaries({k: values for k in KEYS}))
def test_merged_logit_is_the_count_weighted_mean_of_the_logits(parts, x) -> None:
    """Raw-space averaging: on a vector with every feature, the merged pipeline computes the
    mean of what the merged pipelines computed, weighted by their label counts."""
    fitted = [_fitted(rows) for rows in parts]
    merged = load_linear_pipeline(merge_linear_pipelines([s for _, s in fitted]))
    n = [len(rows) for rows in parts]
    expected = math.fsum(k * _logit(pipe, x) for k, (pipe, _) in zip(n, fitted, strict=True))
    expected /= sum(n)
    scale = max(1.0, *(abs(_logit(pipe, x)) for pipe, _ in fitted))
    assert abs(_logit(merged, x) - expected) <= 1e-9 * scale


def test_retailers_measuring_in_different_units_merge_in_raw_units() -> None:
    """Amounts 10x apart: the same z-score means different amounts, so the scaled weights are
    not comparable; the merge averages what each model computes on the raw amount."""
    rng = random.Random(1)

    def rows(unit: float) -> list[tuple[dict[str, float], bool]]:
        out = []
        for _ in range(400):
            a = rng.uniform(0, 10)
            out.append(({"amount": a * unit, "noise": rng.gauss(0, 1)}, a > 7))
        return out
    (p1, s1), (p2, s2) = _fitted(rows(1.0)), _fitted(rows(10.0))
    merged = load_linear_pipeline(merge_linear_pipelines([s1, s2]))
    x = {"amount": 50.0, "noise": 0.0}
    assert math.isclose(_logit(merged, x), (_logit(p1, x) + _logit(p2, x)) / 2, rel_tol=1e-9,
                        abs_tol=1e-9)


@settings(max_examples=60, deadline=None)
@given(labelled)
def test_state_round_trips_through_json_and_goes_on_learning_alike(rows) -> None:
    pipe, state = _fitted(rows)
    clone = load_linear_pipeline(json.loads(json.dumps(state)))
    assert export_linear_pipeline(clone, state["linear"]["n"], state["linear"]["n_pos"],
                                  state["linear"]["n_neg"]) == state
    x = {"a": 1.0, "b": -2.0, "c": 3.0}
    assert clone.predict_proba_one(x) == pipe.predict_proba_one(x)
    clone.learn_one(x, True)
    pipe.learn_one(x, True)
    assert clone.predict_proba_one(x) == pipe.predict_proba_one(x)


def test_scaler_codec_round_trips() -> None:
    scaler = _scaler([{"a": 1.0, "b": 2.0}, {"a": 3.0}])
    assert scaler_to_dict(scaler_from_dict(scaler_to_dict(scaler))) == scaler_to_dict(scaler)


def test_unsupported_models_are_refused() -> None:
    adam = compose.Pipeline(preprocessing.StandardScaler(),
                            linear_model.LogisticRegression(optimizer=optim.Adam()))
    with pytest.raises(ValueError):
        export_linear_pipeline(adam, 0, 0, 0)
    with pytest.raises(ValueError):
        export_linear_pipeline(compose.Pipeline(linear_model.LogisticRegression()), 0, 0, 0)


@pytest.mark.parametrize(("patch", "field"), [
    ({"v": 2}, "v"),
    ({"kind": "risk_model"}, "kind"),
    ({"scaler": None}, "scaler"),
    ({"scaler": {"counts": {"a": 1}, "means": {}, "vars": {}}}, "scaler"),
    ({"scaler": {"counts": {"a": -1}, "means": {"a": 0.0}, "vars": {"a": 0.0}}},
     "scaler.counts.a"),
    ({"linear": {"weights": {"a": "x"}}}, "linear.weights.a"),
])
def test_bad_states_name_the_field(patch, field) -> None:
    _, state = _fitted([({"a": 1.0, "b": 1.0, "c": 1.0}, True)])
    bad = {**state, **patch}
    with pytest.raises(SchemaError) as err:
        load_linear_pipeline(bad)
    assert err.value.field == field
