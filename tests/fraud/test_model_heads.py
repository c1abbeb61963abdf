"""The default model's two linear heads: each equals a one-head model (``head_window=0``, the
math of the frozen reference ``tests/fraud/reference/risk_v2.py``) trained on its features, bit
for bit, and the model chooses its head by paired per-fraud evidence over the window: the full
head when it ranks the frauds above fewer legitimate rows by more than two standard errors,
unless the raw head's precision at the frauds is the higher by more than five; the raw head
when it wins either test.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fraud.models import RiskModel, merge_states
from fraud.models.risk import is_raw_input

KEYS = ("amount", "amount_log", "lat", "customer_n_1h", "country=FR", "shop__freq")
RAW = tuple(k for k in KEYS if is_raw_input(k))


def _dot(model: RiskModel, x: Mapping[str, float]) -> float:
    """The one-head model's linear score, summed in the kernel's order."""
    dot = model.intercept
    for _, c in model._terms(x):
        dot += c
    return dot


def _raw(x: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in x.items() if k in RAW}


def _z(d: list[float]) -> float:
    mean = sum(d) / len(d)
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1)) / math.sqrt(len(d))
    return mean / max(se, 1e-12)


def _evidence(window: list[tuple[float, float, bool]]) -> tuple[float, float]:
    """``(rank z, precision z)`` of the full head over the raw one, written plainly."""
    labels = [y for _, _, y in window]
    if sum(labels) < 2 or all(labels):
        return 0.0, 0.0

    def rank_losses(scores: list[float]) -> list[float]:
        neg = [s for s, y in zip(scores, labels, strict=True) if not y]
        return [(sum(v > s for v in neg) + 0.5 * sum(v == s for v in neg)) / len(neg)
                for s, y in zip(scores, labels, strict=True) if y]

    def precisions(scores: list[float]) -> list[float]:
        # precision at each fraud's threshold, tied scores counting as one threshold
        return [sum(y2 for s2, y2 in zip(scores, labels, strict=True) if s2 >= s)
                / sum(s2 >= s for s2 in scores)
                for s, y in zip(scores, labels, strict=True) if y]

    full = [f for f, _, _ in window]
    raw = [r for _, r, _ in window]
    rank = [a - b for a, b in zip(rank_losses(raw), rank_losses(full), strict=True)]
    precision = [a - b for a, b in zip(precisions(full), precisions(raw), strict=True)]
    return _z(rank), _z(precision)


def test_raw_inputs_are_the_columns_as_given() -> None:
    assert RAW == ("amount", "lat")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(4, 40), st.sampled_from((0.1, 0.3, 0.5)))
def test_heads_equal_one_head_models_and_the_choice_follows_paired_evidence(
        seed: int, window: int, fraud_rate: float) -> None:
    rng = random.Random(seed)
    model = RiskModel(head_window=window, learning_rate=0.1)
    full = RiskModel(head_window=0, learning_rate=0.1)
    raw = RiskModel(head_window=0, learning_rate=0.1)
    dots: list[tuple[float, float, bool]] = []
    expected_head = "raw"
    for i in range(6 * window):
        y = rng.random() < fraud_rate
        amount = rng.uniform(1, 100) + (150.0 if y and rng.random() < 0.5 else 0.0)
        x = {"amount": amount, "amount_log": float(np.log1p(amount)),
             "lat": rng.gauss(0, 1), "customer_n_1h": float(rng.randrange(4) + 3 * y),
             "country=FR": float(rng.random() < 0.5), "shop__freq": rng.uniform(-5, 0)}
        if rng.random() < 0.2:  # sparse vectors too
            del x[rng.choice(KEYS)]
        one_head = raw if expected_head == "raw" and raw.weights else full
        assert model.score_one(x) == one_head.score_one(_raw(x) if one_head is raw else x)
        assert model.contributions(x, 2) == one_head.contributions(
            _raw(x) if one_head is raw else x, 2)
        dots.append((_dot(full, x), _dot(raw, _raw(x)), y))
        model.learn_one(x, y)
        full.learn_one(x, y)
        raw.learn_one(_raw(x), y)
        assert model.weights == full.weights and model.intercept == full.intercept
        assert model.raw_weights == raw.weights and model.raw_intercept == raw.intercept
        n = len(dots)
        if n % max(window // 50, 1) == 0:
            rank_z, precision_z = _evidence(dots[-window:])
            if precision_z < -5.0 or rank_z < -2.0:
                expected_head = "raw"
            elif rank_z > 2.0:
                expected_head = "full"
        assert model.head == expected_head
        if i % 37 == 36:  # a restart from a checkpoint (all three: the scaler's m2 is
            # rebuilt from its variance, not bit for bit) continues with the same choice
            model, full, raw = (RiskModel.from_state(json.loads(json.dumps(m.export_state())))
                                for m in (model, full, raw))


def test_no_raw_input_scores_with_the_full_head() -> None:
    model, full = RiskModel(), RiskModel(head_window=0)
    for i in range(50):
        x = {"amount_log": float(i % 7), "customer_n_1h": float(i % 3)}
        assert model.score_one(x) == full.score_one(x)
        model.learn_one(x, i % 5 == 0)
        full.learn_one(x, i % 5 == 0)
    assert model.raw_weights == {}
    assert model.export_state()["head"]["n"] == 0  # nothing to choose: no window kept


def _trained(seed: int, window: int = 10) -> RiskModel:
    rng = random.Random(seed)
    model = RiskModel(head_window=window)
    for _ in range(40):
        y = rng.random() < 0.3
        model.learn_one({"amount": rng.uniform(0, 9) + 5 * y, "amount_log": rng.random()}, y)
    return model


def test_the_raw_head_merges_like_the_full_head() -> None:
    a, b = _trained(1), _trained(2)
    merged = merge_states([a.export_state(), b.export_state()])
    w = merged["raw_linear"]["weights"]["amount"]
    assert w == (a.raw_weights["amount"] * a.n + b.raw_weights["amount"] * b.n) / (a.n + b.n)
    assert "head" not in merged and "head" not in a.export_shared()  # local, never shared
    local = _trained(3)
    head = local.head
    local.load_shared(merged)
    assert local.raw_weights == RiskModel.from_state(merged).raw_weights
    assert local.head == head


def test_a_state_without_the_raw_head_loads_with_it_at_zero() -> None:
    state: dict[str, Any] = _trained(4).export_state()
    del state["raw_linear"], state["head"]
    model = RiskModel.from_state(state)
    assert set(model.raw_weights.values()) == {0.0} and model.head == "raw"


def test_a_smaller_window_keeps_the_most_recent_labels() -> None:
    model = _trained(5, window=10)
    recent = model.export_state()["head"]
    model.head_window = 4  # a config change
    model.learn_one({"amount": 1.0, "amount_log": 0.5}, False)
    kept = model.export_state()["head"]
    last4 = [(recent["n"] - 4 + j) % 10 for j in range(4)]
    # the 4 most recent labels, oldest first, then the new one in the oldest one's place
    assert kept["n"] == 5
    assert kept["labels"] == [False, *(recent["labels"][i] for i in last4[1:])]
    assert kept["full"][1:] == [recent["full"][i] for i in last4[1:]]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31), st.integers(4, 40))
def test_score_then_learn_equals_score_then_learn_one(seed: int, window: int) -> None:
    rng = random.Random(seed)
    fused = RiskModel(head_window=window, learning_rate=0.1, anomaly_min_events=5)
    twin = RiskModel(head_window=window, learning_rate=0.1, anomaly_min_events=5)
    for _ in range(6 * window):
        y = rng.random() < 0.3
        x = {k: rng.gauss(3.0 * y, 1.0) for k in KEYS if rng.random() < 0.8}
        assert fused.score_then_learn_one(x, y) == twin.score_one(x, observe=True)
        twin.learn_one(x, y)
        assert fused.export_state() == twin.export_state() and fused.head == twin.head
