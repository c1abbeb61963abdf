"""The fast paths give bit-identical results to the reference implementation (commit 6f653c3).

``tests/fraud/reference/*.py`` are frozen copies of the feature extractor and the risk model
before the fast paths were added (``risk_v2``: re-frozen when the model became a River
classifier; ``features_v2``: the label history added, written plainly; their headers say what
changed); every output and every exported state must be equal, not merely close.

``risk_v2`` has one linear head: it is the model with ``head_window=0``, and the default model
wherever its vectors have no raw input (the worker's extractor vectors), where the raw head
has only an intercept and never scores. The two heads are checked against two one-head models
in ``tests/fraud/test_model_heads.py``.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fraud.features import FEATURE_NAMES, FeatureExtractor
from fraud.models import RiskModel
from fraud.schema import Transaction

_HERE = Path(__file__).parent / "reference"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"fraud_reference_{name}", _HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ref_features = _load("features_v2")
ref_risk = _load("risk_v2")


def _ref_params(new: RiskModel) -> Any:
    """``new``'s parameters for the one-head reference (which has no ``head_window``)."""
    params = new.params.to_dict()
    del params["head_window"]
    return ref_risk.ModelParams.from_dict(params)


def _one_head(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without what the one-head reference does not have: ``head_window`` and the
    raw head (weights, intercept and the local head choice)."""
    out = {k: v for k, v in state.items() if k not in ("raw_linear", "head")}
    out["params"] = {k: v for k, v in state["params"].items() if k != "head_window"}
    return out
BLENDED = {"learning_rate": 0.03, "max_pos_weight": 20.0, "anomaly_weight": 0.1,
           "warmup_positives": 20.0}
"""The defaults before the ablations in fraud/models/README.md: up-weighting and the blend."""

gaps = st.sampled_from((0.0, 1.0, 30.0, 299.0, 599.9, 600.0, 601.0, 3599.0, 3600.0, 5000.0,
                        86399.0, 86400.0, 90000.0, -50.0))
events = st.lists(st.tuples(
    gaps,
    st.floats(0.0, 5000.0),
    st.sampled_from(("c1", "c2", "c3", None)),
    st.sampled_from(("p1", "p2", None)),
    st.sampled_from(("d1", "d2", "d3", None)),
    st.sampled_from(("10.0.0.1", "10.0.0.2", None)),
    st.sampled_from(("web", "app", "pos")),
    st.sampled_from((None, "", "SPRING", "WELCOME", "X1", "X2")),
    st.integers(1, 5),
    st.booleans(),
), max_size=80)


def _stream(spec: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    t = 1_700_000_000.0
    out = []
    for gap, amount, c, p, d, ip, channel, coupon, items, mismatch in spec:
        t += gap
        out.append({"occurred_at": t, "amount": amount, "customer_id": c,
                    "payment_instrument": p, "device_id": d, "ip": ip, "channel": channel,
                    "coupon_code": coupon, "item_count": items, "address_mismatch": mismatch})
    return out


@settings(max_examples=150, deadline=None)
@given(events, st.sampled_from(("", "r1/")))
def test_features_equal_the_reference(spec: list[tuple[Any, ...]], prefix: str) -> None:
    new, ref = FeatureExtractor(prefix), ref_features.FeatureExtractor(prefix)
    s_new: dict[str, Any] = {}
    s_ref: dict[str, Any] = {}
    s_val: dict[str, Any] = {}
    for tx in _stream(spec):
        expected = ref.extract(tx, s_ref)
        got = new.extract(tx, s_new)
        assert got == expected and tuple(got) == tuple(expected) == FEATURE_NAMES
        assert new.extract_values(tx, s_val) == list(expected.values())
    assert json.dumps(s_new) == json.dumps(s_ref) == json.dumps(s_val)


def test_features_equal_the_reference_on_generated_traffic() -> None:
    from fraud.generator import GeneratorConfig, generate

    rows = list(generate(GeneratorConfig(retailers=2, days=3, tx_per_day=300, seed=5)))
    new, ref = FeatureExtractor(), ref_features.FeatureExtractor()
    s_new: dict[str, Any] = {}
    s_ref: dict[str, Any] = {}
    for row in rows:
        tx = Transaction.from_dict({k: v for k, v in row.items() if k not in (
            "is_fraud", "scenario", "label_source", "labelled_at")})
        assert new.extract(tx, s_new) == ref.extract(tx, s_ref)
        assert new.extract_fields(s_new, tx.occurred_at + 1.0, 3.0, "c", None) == \
            ref.extract_fields(s_ref, tx.occurred_at + 1.0, 3.0, "c", None)
        if len(s_new) % 3 == 0:  # labels known for some transactions (deterministically)
            for fx, state in ((new, s_new), (ref, s_ref)):
                fx.learn_label(state, tx.occurred_at, tx.customer_id, tx.payment_instrument,
                               tx.device_id, row["is_fraud"])
    assert s_new == s_ref
    assert any(v.get("lf") for v in s_new.values())


KEYS = ("a", "b", "c", "d", "e")
values = st.one_of(st.floats(-1e3, 1e3), st.sampled_from((0.0, 1.0, -0.0)))
# ops: (kind, vector, label); kinds hit score_one (observe or not), learn_one, contributions,
# score_and_explain; most vectors share one key order (the fast path), some do not
fixed = st.tuples(*(values for _ in KEYS)).map(lambda vs: dict(zip(KEYS, vs, strict=True)))
sparse = st.dictionaries(st.sampled_from(KEYS), values, min_size=1)
ops = st.lists(st.tuples(
    st.sampled_from(("score", "peek", "learn", "explain", "both")),
    st.one_of(fixed, fixed, fixed, sparse),
    st.booleans(),
), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops, st.integers(0, 40))
def test_model_equals_the_reference(seq: list[tuple[str, dict[str, float], bool]],
                                    min_events: int) -> None:
    params = {"anomaly_min_events": min_events, "l2": 0.01 if min_events % 2 else 0.0,
              **(BLENDED if min_events % 3 else {})}
    new = RiskModel.from_params({**params, "head_window": 0})
    ref = ref_risk.RiskModel(_ref_params(new))
    for kind, x, y in seq:
        if kind == "score":
            assert new.score_one(x, observe=True) == ref.score_one(x, observe=True)
        elif kind == "peek":
            assert new.score_one(x) == ref.score_one(x, observe=False)
            assert new.predict_proba_one(x)[True] == ref.score_one(x, observe=False)
            assert new.predict_proba_many([x]) == ref.predict_proba_many([x])
        elif kind == "learn":
            new.learn_one(x, y)
            ref.learn_one(x, y)
        elif kind == "explain":
            assert new.contributions(x, 2) == ref.contributions(x, 2)
        else:
            expected = ref.score_one(x, observe=y), ref.contributions(x, 3)
            assert new.score_and_explain(x, 3, observe=y) == expected
        assert _one_head(new.export_state()) == ref.export_state()
    assert json.dumps(_one_head(new.export_state())) == json.dumps(ref.export_state())


def test_model_equals_the_reference_on_the_feature_stream() -> None:
    """The real hot path: extractor dicts, score, explain, learn; reloads in between."""
    rng = random.Random(7)
    fx = FeatureExtractor()
    state: dict[str, Any] = {}
    new = RiskModel()  # the default: both heads, but the extractor's vectors have no raw input
    ref = ref_risk.RiskModel(_ref_params(new))
    stream = [{"occurred_at": 1e9 + 40.0 * i, "amount": rng.uniform(1, 900),
               "customer_id": f"c{rng.randrange(30)}",
               "payment_instrument": f"p{rng.randrange(40)}",
               "device_id": f"d{rng.randrange(20)}", "ip": f"i{rng.randrange(10)}",
               "channel": rng.choice(("web", "app", "pos")),
               "coupon_code": rng.choice((None, None, "K"))} for i in range(1500)]
    for i, tx in enumerate(stream):
        x = fx.extract(tx, state)
        if i % 2:
            score, top = new.score_and_explain(x, 3, observe=True)
        elif i % 4:
            score, top = new.predict_proba_one(x)[True], None
            new.learn_unsupervised_one(x)
        else:
            score, top = new.score_one(x, observe=True), None
        assert score == ref.score_one(x, observe=True)
        if top is not None:
            assert top == ref.contributions(x, 3)
        if i % 3:
            y = rng.random() < 0.1
            new.learn_many([x], [y])
            ref.learn_one(dict(zip(FEATURE_NAMES, list(x.values()), strict=True)), y)
        if i % 500 == 499:  # a restart from a checkpoint, and a new shared model
            new = RiskModel.from_state(json.loads(json.dumps(new.export_state())))
            ref = ref_risk.RiskModel.from_state(json.loads(json.dumps(ref.export_state())))
            new.load_shared(new.export_shared())
            ref.load_shared(ref.export_shared())
    assert _one_head(new.export_state()) == ref.export_state()
    assert new.raw_weights == {}  # no raw input: the raw head has nothing to score with


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.booleans(), st.integers(0, 4)), max_size=25),
       st.integers(0, 40))
def test_batch_scoring_equals_the_reference_row_by_row(
        batches: list[tuple[int, bool, int]], min_events: int) -> None:
    """``score_and_explain_many`` on batches (learning between them) against the reference's
    ``score_one`` + ``contributions`` per row: scores, reasons and state all equal."""
    rng = random.Random(len(batches) * 41 + min_events)
    params = {"anomaly_min_events": min_events, **(BLENDED if min_events % 3 else {})}
    new = RiskModel.from_params({**params, "head_window": 0})
    ref = ref_risk.RiskModel(_ref_params(new))
    for size, observe, k in batches:
        rows = [[rng.choice((0.0, 1.0, rng.gauss(3, 2), rng.uniform(-50, 50))) for _ in KEYS]
                for _ in range(size)]
        scores, tops = new.score_and_explain_many(KEYS, np.array(rows).reshape(size, len(KEYS)),
                                                  k, observe)
        for row, score, top in zip(rows, scores, tops, strict=True):
            x = dict(zip(KEYS, row, strict=True))
            assert score == ref.score_one(x, observe=observe)
            assert top == ref.contributions(x, k)
        for row in rows[:2]:
            y = rng.random() < 0.3
            new.learn_one(dict(zip(KEYS, row, strict=True)), y)
            ref.learn_one(dict(zip(KEYS, row, strict=True)), y)
        assert _one_head(new.export_state()) == ref.export_state()
