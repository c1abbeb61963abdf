"""FedAvg, FedMedian, FedTrimmedAvg and update clipping on plain (unmasked) updates."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fl.strategies import ClippedUpdates, FedAvg, FedMedian, FedTrimmedAvg, clip_delta
from fl.strategies.clipping import l2_norm
from fl.update import ModelUpdate, UpdateFormatError, Vectors

values = st.floats(-1e3, 1e3, allow_nan=False)
flat_vectors = st.lists(values, min_size=5, max_size=5)


def vectors_from(flat: list[float]) -> Vectors:
    return {"b": np.array(flat[:1]), "w": np.array(flat[1:5])}


ZERO = vectors_from([0.0] * 5)


@st.composite
def rounds(draw: st.DrawFn, min_size: int = 1, max_size: int = 8) -> list[ModelUpdate]:
    """Updates of round 1 from distinct participants, some of which learned nothing."""
    count = draw(st.integers(min_size, max_size))
    ids = draw(
        st.lists(
            st.text("abcdefgh", min_size=1, max_size=3), min_size=count, max_size=count, unique=True
        )
    )
    return [
        ModelUpdate(p, 1, draw(st.integers(0, 500)), vectors_from(draw(flat_vectors))) for p in ids
    ]


def same(a: Vectors, b: Vectors) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


ALL = [FedAvg(), FedAvg(weighted=False), FedMedian(), FedTrimmedAvg(0.2)]


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: s.name)
@given(flat=flat_vectors, examples=st.lists(st.integers(1, 10**6), min_size=1, max_size=9))
def test_identical_updates_aggregate_to_that_update(strategy, flat, examples):
    updates = [ModelUpdate(f"p{i}", 1, n, vectors_from(flat)) for i, n in enumerate(examples)]
    result = strategy.aggregate(1, ZERO, updates).parameters
    for name, expected in vectors_from(flat).items():
        np.testing.assert_allclose(result[name], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: s.name)
@given(updates=rounds(), data=st.data())
def test_the_result_does_not_depend_on_arrival_order(strategy, updates, data):
    shuffled = data.draw(st.permutations(updates))
    first = strategy.aggregate(1, ZERO, updates).parameters
    assert same(first, strategy.aggregate(1, ZERO, shuffled).parameters)  # bit for bit


@given(updates=rounds())
def test_fedavg_weights_by_examples_learned_this_round(updates):
    total = sum(u.examples for u in updates)
    result = FedAvg().aggregate(1, ZERO, updates).parameters
    for name in ZERO:
        if total == 0:
            expected = ZERO[name]
        else:
            expected = sum(u.examples * u.vectors[name] for u in updates) / total
        np.testing.assert_allclose(result[name], expected, rtol=1e-9, atol=1e-9)


def test_a_participant_that_learned_nothing_contributes_nothing():
    current = {"w": np.array([7.0])}
    learned = ModelUpdate("a", 1, 3, {"w": [1.0]})
    idle = ModelUpdate("b", 1, 0, {"w": [1e9]})
    for strategy in ALL:
        assert strategy.aggregate(1, current, [learned, idle]).parameters["w"][0] == 1.0


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: s.name)
def test_a_round_where_nobody_learned_keeps_the_global_parameters(strategy):
    current = {"w": np.array([7.0, 8.0])}
    updates = [ModelUpdate(p, 1, 0, {"w": [1.0, 2.0]}) for p in "ab"]
    result = strategy.aggregate(1, current, updates).parameters
    assert same(result, current)
    assert result["w"] is not current["w"]
    assert same(strategy.aggregate(1, current, []).parameters, current)


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: s.name)
def test_updates_that_do_not_fit_the_round_are_refused(strategy):
    current = {"w": np.zeros(2)}
    good = ModelUpdate("a", 1, 1, {"w": [1.0, 2.0]})
    with pytest.raises(UpdateFormatError, match="round"):
        strategy.aggregate(1, current, [good, ModelUpdate("b", 2, 1, {"w": [1.0, 2.0]})])
    with pytest.raises(UpdateFormatError, match="two updates from a"):
        strategy.aggregate(1, current, [good, good])
    with pytest.raises(UpdateFormatError, match="layout"):
        strategy.aggregate(1, current, [ModelUpdate("b", 1, 1, {"w": [1.0]})])
    with pytest.raises(UpdateFormatError, match="missing"):
        strategy.aggregate(1, current, [ModelUpdate("b", 1, 1, {"v": [1.0, 2.0]})])


@pytest.mark.parametrize("strategy", [FedMedian(), FedTrimmedAvg(0.2)], ids=lambda s: s.name)
@given(
    honest=st.lists(flat_vectors, min_size=3, max_size=9),
    data=st.data(),
)
def test_a_poisoned_minority_cannot_drag_robust_aggregation(strategy, honest, data):
    """One participant (or fewer than beta * m for the trimmed mean) sends 1e6 x the others:
    the robust result stays within the honest values' range, and near their mean."""
    m = len(honest) + 1
    poisoned_count = 1 if isinstance(strategy, FedMedian) else max(0, int(0.2 * m))
    poisoned_count = min(poisoned_count, (m - 1) // 2)
    honest_updates = [ModelUpdate(f"h{i}", 1, 10, vectors_from(v)) for i, v in enumerate(honest)]
    scale = data.draw(st.sampled_from([1e6, -1e6]))
    poisoned = [
        ModelUpdate(f"x{i}", 1, 10, vectors_from([scale * (1.0 + abs(x)) for x in honest[0]]))
        for i in range(poisoned_count)
    ]
    result = strategy.aggregate(1, ZERO, honest_updates + poisoned).parameters
    for name in ZERO:
        stacked = np.stack([u.vectors[name] for u in honest_updates])
        assert np.all(result[name] >= stacked.min(axis=0) - 1e-9)
        assert np.all(result[name] <= stacked.max(axis=0) + 1e-9)


def test_poisoning_moves_fedavg_but_not_median_or_trimmed_mean():
    rng = np.random.default_rng(7)
    honest = [ModelUpdate(f"h{i}", 1, 100, {"w": rng.normal(1.0, 0.1, 50)}) for i in range(9)]
    honest_mean = np.mean([u.vectors["w"] for u in honest], axis=0)
    evil = ModelUpdate("evil", 1, 100, {"w": honest[0].vectors["w"] * 1e6})
    current = {"w": np.zeros(50)}
    damage = {
        s.name: float(
            np.max(np.abs(s.aggregate(1, current, [*honest, evil]).parameters["w"] - honest_mean))
        )
        for s in (FedAvg(), FedMedian(), FedTrimmedAvg(0.1))
    }
    assert damage["FedAvg"] > 1e4
    assert damage["FedMedian"] < 0.2
    assert damage["FedTrimmedAvg(beta=0.1)"] < 0.2


def test_trimmed_mean_with_beta_zero_is_the_plain_mean():
    updates = [ModelUpdate(p, 1, n, {"w": [x]}) for p, n, x in [("a", 1, 1.0), ("b", 9, 4.0)]]
    assert FedTrimmedAvg(0.0).aggregate(1, {"w": np.zeros(1)}, updates).parameters["w"][0] == 2.5


@pytest.mark.parametrize("beta", [-0.1, 0.5, 1.0])
def test_trimmed_mean_refuses_a_beta_that_cuts_everything(beta):
    with pytest.raises(ValueError, match="beta"):
        FedTrimmedAvg(beta)


@given(flat=flat_vectors, base=flat_vectors, clip=st.floats(1e-3, 1e3))
def test_clipping_bounds_the_norm_of_the_delta(flat, base, clip):
    current = vectors_from(base)
    clipped, changed = clip_delta(vectors_from(flat), current, clip)
    delta = {k: clipped[k] - current[k] for k in current}
    original = l2_norm({k: vectors_from(flat)[k] - current[k] for k in current})
    assert l2_norm(delta) <= clip * (1 + 1e-9) + 1e-9
    assert changed == (original > clip)
    if not changed:
        assert same(clipped, vectors_from(flat))


@given(updates=rounds(), clip=st.floats(1e-2, 1e2))
def test_clipped_fedavg_moves_the_global_model_at_most_clip_norm(updates, clip):
    current = vectors_from([1.0, 2.0, 3.0, 4.0, 5.0])
    updates = [ModelUpdate(u.participant, 1, u.examples, u.vectors) for u in updates]
    result = ClippedUpdates(FedAvg(), clip).aggregate(1, current, updates)
    moved = l2_norm({k: result.parameters[k] - current[k] for k in current})
    assert moved <= clip * (1 + 1e-9) + 1e-9
    assert result.metrics["clipped"] <= len(updates)


def test_clipping_wraps_a_robust_strategy_too():
    current = {"w": np.zeros(2)}
    updates = [
        ModelUpdate(p, 1, 1, {"w": [x, 0.0]}) for p, x in [("a", 1.0), ("b", 3.0), ("c", 50.0)]
    ]
    result = ClippedUpdates(FedMedian(), clip_norm=2.0).aggregate(1, current, updates)
    assert result.parameters["w"].tolist() == [2.0, 0.0]
    assert result.metrics["clipped"] == 2


def test_clipping_refuses_a_norm_that_is_not_positive():
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="clip_norm"):
            ClippedUpdates(FedAvg(), bad)


def test_configure_sends_each_participant_the_round_and_parameters():
    current = {"w": np.array([1.0])}
    instructions = ClippedUpdates(FedAvg(), 1.0).configure(4, current, ["a", "b"])
    assert sorted(instructions) == ["a", "b"]
    assert instructions["a"].round == 4
    assert same(instructions["b"].parameters, current)
