"""Reasons of River models that cannot explain themselves: the features furthest from the
traffic's running mean."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fraud.models import RiverModel

HST = ({"class": "preprocessing.MinMaxScaler"},
       {"class": "anomaly.HalfSpaceTrees", "params": {"seed": 1}})
TREE = ({"class": "tree.HoeffdingAdaptiveTreeClassifier", "params": {"seed": 1}},)


def _traffic(model: RiverModel, n: int = 300) -> None:
    rng = random.Random(3)
    for _ in range(n):
        x = {"amount": rng.gauss(50, 10), "n_1h": float(rng.randrange(3)), "hour": 12.0}
        model.score_one(x, observe=True)
        model.learn_one(x, False)


@pytest.mark.parametrize("spec", [HST, TREE], ids=["HalfSpaceTrees", "HoeffdingAdaptiveTree"])
def test_a_model_that_cannot_explain_itself_gives_the_furthest_features(
        spec: tuple[dict[str, object], ...]) -> None:
    model = RiverModel(spec)
    _traffic(model)
    odd = {"amount": 400.0, "n_1h": 0.0, "hour": 12.0}
    reasons = model.contributions(odd, 2)
    assert reasons[0][0] == "amount"
    mean, std = model.traffic.mean("amount"), model.traffic.var("amount") ** 0.5
    assert reasons[0][1] == pytest.approx((400.0 - mean) / std)
    assert all(name != "hour" for name, _ in reasons)  # constant: never a reason
    below = model.contributions({"amount": 50.0, "n_1h": -20.0}, 1)
    assert below[0][0] == "n_1h" and below[0][1] > 0  # far below the mean is a reason too
    _, explained = model.score_and_explain_many(
        ("amount", "n_1h", "hour"), np.array([[400.0, 0.0, 12.0]]), 2)
    assert explained == [reasons]
    assert model.contributions(odd, 0) == [] and RiverModel(spec).contributions(odd) == []


def test_scoring_without_observing_learns_no_traffic() -> None:
    model = RiverModel(TREE)
    model.score_one({"amount": 1.0})
    model.learn_one({"amount": 1.0}, True)
    assert not model.traffic.stats


def test_the_linear_pipeline_still_explains_itself() -> None:
    model = RiverModel()
    _traffic(model)
    assert not model.traffic.stats  # its own scaler and weights give the reasons
    assert all(value > 0 for _, value in model.contributions({"amount": 400.0, "n_1h": 2.0}))
