"""River models chosen as plain data: the allow-list, River's checks on each allowed class,
and the worker's model interface over them."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import checks, datasets, evaluate, metrics

from fraud.models.river_model import RiverModel, spec_tuple
from fraud.models.river_spec import ALLOWED, LINEAR_SPEC, OPTIMIZERS, build_estimator, check_spec
from fraud.schema import SchemaError

# River's checks read River's bundled Phishing data; an anomaly detector's checks download
# CreditCard, so HalfSpaceTrees is checked through RiverModel below (a classifier).
CHECKABLE = sorted(name for name in ALLOWED if name != "anomaly.HalfSpaceTrees")
_SMALL = {"forest.ARFClassifier": {"n_models": 3, "seed": 1},
          "tree.HoeffdingAdaptiveTreeClassifier": {"seed": 1}}


@pytest.mark.parametrize("name", CHECKABLE)
def test_each_allowed_river_class_passes_rivers_checks(name: str) -> None:
    make = ALLOWED[name][0]  # transformers are not a whole spec: built directly
    checks.check_estimator(make(**_SMALL.get(name, {})))


@pytest.mark.parametrize("params", list(RiverModel._unit_test_params()),
                         ids=lambda p: p["spec"][-1]["class"] if p else "linear")
def test_river_model_passes_rivers_checks(params: dict[str, Any]) -> None:
    checks.check_estimator(RiverModel(**params))


def test_every_allowed_class_builds_with_every_parameter() -> None:
    for name, (_, kinds) in ALLOWED.items():
        params: dict[str, Any] = {}
        for key, kind in kinds.items():
            params[key] = {"bool": True, "int": 3, "float": 0.5,
                           "optimizer": {"class": "optim.SGD", "params": {"lr": 0.1}}}[kind]
        if name == "anomaly.HalfSpaceTrees":
            params["window_size"] = 10
        if name == "linear_model.LogisticRegression":
            params["l1"] = 0.0  # River supports l1 or l2, not both
        spec = [{"class": name, "params": params}]
        if name.startswith("preprocessing."):
            spec.append({"class": "linear_model.LogisticRegression"})
        build_estimator(spec)
    assert set(OPTIMIZERS) == {"optim.SGD", "optim.Adam"}


@pytest.mark.parametrize(("spec", "field"), [
    ("preprocessing.StandardScaler", "model"),
    ([], "model"),
    ([{"class": "builtins.eval"}], "model[0].class"),
    ([{"class": "linear_model.LogisticRegression", "extra": 1}], "model[0].extra"),
    ([{"class": "linear_model.LogisticRegression", "params": {"loss": "hinge"}}],
     "model[0].params.loss"),
    ([{"class": "linear_model.LogisticRegression", "params": {"l2": "0.1"}}],
     "model[0].params.l2"),
    ([{"class": "linear_model.LogisticRegression", "params": {"l2": float("nan")}}],
     "model[0].params.l2"),
    ([{"class": "forest.ARFClassifier", "params": {"n_models": 2.5}}],
     "model[0].params.n_models"),
    ([{"class": "linear_model.LogisticRegression", "params": {"l1": 0.1, "l2": 0.1}}],
     "model[0].params"),
    ([{"class": "linear_model.LogisticRegression",
       "params": {"optimizer": {"class": "optim.FTRLProximal"}}}],
     "model[0].params.optimizer.class"),
    ([{"class": "preprocessing.StandardScaler"}, {"class": "preprocessing.StandardScaler"}],
     "model[1].class"),
    ([{"class": "tree.HoeffdingTreeClassifier"}, {"class": "linear_model.LogisticRegression"}],
     "model[0].class"),
])
def test_bad_specs_name_the_field(spec: Any, field: str) -> None:
    with pytest.raises(SchemaError) as err:
        check_spec(spec)
    assert err.value.field == field


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True)
    | st.sampled_from([*ALLOWED, *OPTIMIZERS, "os.system", "class", "params", "lr", "seed"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["class", "params", "lr", "seed", "l2", "optimizer",
                                       "n_models", "with_std"]), inner, max_size=3),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_is_a_valid_spec_or_a_schema_error(doc: Any) -> None:
    try:
        steps = check_spec(doc)
    except SchemaError:
        return
    assert json.loads(json.dumps(steps)) == steps
    build_estimator(steps)


def _rows(n: int, seed: int) -> list[tuple[dict[str, float], bool]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        y = rng.random() < 0.1
        out.append(({"amount": rng.gauss(6.0 if y else 2.0, 1.0),
                     "velocity": rng.gauss(2.0 if y else 0.0, 1.0)}, y))
    return out


def test_linear_model_state_is_plain_data_and_explains_itself() -> None:
    model = RiverModel()
    for x, y in _rows(600, 1):
        model.learn_one(x, y)
    state = model.export_state()
    assert state["linear"]["n"] == 600 == model.n
    clone = RiverModel.from_state(json.loads(json.dumps(state)))
    x = {"amount": 7.0, "velocity": 3.0}
    assert clone.predict_proba_one(x) == model.predict_proba_one(x)
    assert [k for k, _ in model.contributions(x)] in (["amount", "velocity"],
                                                     ["velocity", "amount"])
    keys = ("amount", "velocity")
    X = np.array([[x[k] for k in keys] for x, _ in _rows(20, 2)])
    scores, reasons = model.score_and_explain_many(keys, X, 2)
    rows = [dict(zip(keys, r, strict=True)) for r in X.tolist()]
    assert scores == [model.predict_proba_one(r)[True] for r in rows]
    assert reasons == [model.contributions(r, 2) for r in rows]


def test_other_models_checkpoint_with_rivers_serialisation_only() -> None:
    model = RiverModel(spec_tuple([{"class": "forest.ARFClassifier",
                                    "params": {"n_models": 3, "seed": 7}}]))
    for x, y in _rows(300, 3):
        model.learn_one(x, y)
    with pytest.raises(ValueError):
        model.export_state()
    restored = RiverModel.from_checkpoint(model.to_checkpoint())
    probe = {"amount": 5.0, "velocity": 1.0}
    assert restored.predict_proba_one(probe) == model.predict_proba_one(probe)
    assert restored.n == 300 and restored.contributions(probe) == []
    with pytest.raises(ValueError):
        RiverModel.from_checkpoint(b"not a checkpoint")


def test_an_anomaly_detector_learns_from_traffic_not_from_scoring() -> None:
    model = RiverModel(spec_tuple([
        {"class": "preprocessing.MinMaxScaler"},
        {"class": "anomaly.HalfSpaceTrees", "params": {"seed": 3, "window_size": 50}}]))
    rng = random.Random(4)
    probe_normal, probe_odd = {"amount": 2.0, "velocity": 0.0}, {"amount": 9.0, "velocity": 8.0}
    keys = ("amount", "velocity")
    X = np.array([[rng.gauss(2.0, 0.5), rng.gauss(0.0, 1.0)] for _ in range(400)])
    model.score_and_explain_many(keys, X, 3, observe=True)
    twin = RiverModel.from_checkpoint(model.to_checkpoint())
    model.score_and_explain_many(keys, X + 5.0, 3)
    # scoring learned nothing (River's scalers may add empty entries: compare behaviour)
    assert model.score_and_explain_many(keys, X, 0) == twin.score_and_explain_many(keys, X, 0)
    model.learn_one(probe_odd, True)  # labels are counted, the detector does not learn them
    assert model.n == 1
    assert model.score_one(probe_odd) > model.score_one(probe_normal)


@pytest.mark.parametrize("params", list(RiverModel._unit_test_params()),
                         ids=lambda p: p["spec"][-1]["class"] if p else "linear")
def test_runs_under_progressive_validation(params: dict[str, Any]) -> None:
    model = RiverModel(**params)
    evaluate.progressive_val_score(datasets.Phishing().take(300), model, metrics.LogLoss())
    assert model.n == 300


def test_default_spec_is_rivers_linear_pipeline() -> None:
    assert check_spec(list(LINEAR_SPEC)) == list(LINEAR_SPEC)
    assert RiverModel().export_state()["kind"] == "river_linear"
