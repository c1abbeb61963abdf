"""Differential privacy: the noise it adds, the combinations it refuses, the budget it reports."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fl.strategies import (
    ConfigurationError,
    DifferentialPrivacy,
    FedAvg,
    FedMedian,
    RDPAccountant,
    SecAggParticipant,
    SecureAggregation,
    X25519Agreement,
    clip_delta,
)
from fl.strategies.secagg import run_round
from fl.update import ModelUpdate


def gaussian_delta(epsilon: float, sigma: float) -> float:
    """The exact delta(epsilon) of one Gaussian mechanism of sensitivity 1 and std sigma
    (Balle & Wang 2018, Theorem 8): Phi(1/(2s) - e*s) - exp(e) * Phi(-1/(2s) - e*s)."""

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2.0))

    return phi(0.5 / sigma - epsilon * sigma) - math.exp(epsilon) * phi(
        -0.5 / sigma - epsilon * sigma
    )


def test_accountant_matches_known_values():
    accountant = RDPAccountant()
    assert accountant.epsilon(1e-5) == 0.0
    for _ in range(10):
        accountant.spend(2.0)
    # k = 10 Gaussian mechanisms, sigma = 2: RDP(alpha) = k * alpha / (2 sigma^2) = 1.25 alpha
    assert accountant.rdp(3.0) == pytest.approx(10 * 3.0 / (2 * 4.0))
    # eps = a + 2 sqrt(a log(1/delta)), a = 1.25, delta = 1e-5
    assert accountant.epsilon(1e-5) == pytest.approx(1.25 + 2 * math.sqrt(1.25 * math.log(1e5)))
    assert accountant.epsilon(1e-5) == pytest.approx(8.8371, abs=1e-4)


@given(
    sigmas=st.lists(st.floats(0.3, 20.0), min_size=1, max_size=20),
    delta=st.floats(1e-12, 0.1),
)
def test_closed_form_is_the_minimum_over_renyi_orders(sigmas, delta):
    accountant = RDPAccountant()
    for sigma in sigmas:
        accountant.spend(sigma)
    alphas = np.concatenate([1.0 + np.logspace(-4, 4, 20001), [accountant.best_alpha(delta)]])
    by_grid = np.min(accountant.rdp_slope * alphas + math.log(1.0 / delta) / (alphas - 1.0))
    assert accountant.epsilon(delta) == pytest.approx(by_grid, rel=1e-6)
    assert accountant.epsilon(delta) <= by_grid * (1 + 1e-12)


@given(sigma=st.floats(0.5, 10.0), delta=st.floats(1e-10, 1e-2))
def test_the_reported_epsilon_is_a_valid_bound_for_one_gaussian(sigma, delta):
    """The conversion is loose, never wrong: at the reported epsilon the exact delta is lower."""
    accountant = RDPAccountant()
    accountant.spend(sigma)
    assert gaussian_delta(accountant.epsilon(delta), sigma) <= delta


@given(sigmas=st.lists(st.floats(0.3, 20.0), min_size=1, max_size=30))
def test_the_budget_only_grows(sigmas):
    accountant = RDPAccountant()
    spent = [accountant.epsilon(1e-5)]
    for sigma in sigmas:
        accountant.spend(sigma)
        spent.append(accountant.epsilon(1e-5))
    assert all(b > a for a, b in itertools.pairwise(spent))
    assert accountant.rounds == len(sigmas)


def test_more_noise_spends_less():
    quiet, loud = RDPAccountant(), RDPAccountant()
    quiet.spend(0.5)
    loud.spend(5.0)
    assert loud.epsilon(1e-5) < quiet.epsilon(1e-5)


@pytest.mark.parametrize("inner", [FedAvg(), FedMedian()], ids=lambda s: s.name)
def test_dp_refuses_an_aggregation_its_noise_is_not_calibrated_to(inner):
    with pytest.raises(ConfigurationError, match="equal-weight mean"):
        DifferentialPrivacy(inner, noise_multiplier=1.0, clip_norm=1.0, participants=3)


def test_dp_refuses_an_unknown_clipping_place():
    with pytest.raises(ConfigurationError, match="clip_on"):
        DifferentialPrivacy(FedAvg(weighted=False), 1.0, 1.0, 3, clip_on="nowhere")


def test_noise_has_the_dp_fedavg_standard_deviation():
    """std = z * C / m around the mean of m clipped deltas, measured over many coordinates."""
    m, clip, z, size = 4, 0.5, 1.3, 200_000
    current = {"w": np.zeros(size)}
    updates = [ModelUpdate(f"p{i}", 1, 10, {"w": np.zeros(size)}) for i in range(m)]
    dp = DifferentialPrivacy(FedAvg(weighted=False), z, clip, m, rng=np.random.default_rng(1))
    result = dp.aggregate(1, current, updates)
    expected = z * clip / m
    assert result.metrics["noise_std"] == pytest.approx(expected)
    assert np.std(result.parameters["w"]) == pytest.approx(expected, rel=0.01)
    assert abs(np.mean(result.parameters["w"])) < 5 * expected / math.sqrt(size)


def test_server_side_dp_clips_every_delta_and_reports_the_budget():
    current = {"w": np.zeros(3)}
    updates = [
        ModelUpdate("a", 1, 5, {"w": [100.0, 0.0, 0.0]}),
        ModelUpdate("b", 1, 9, {"w": [0.0, 0.1, 0.0]}),
    ]
    dp = DifferentialPrivacy(FedAvg(weighted=False), 1e-9, 1.0, 2, rng=np.random.default_rng(0))
    result = dp.aggregate(1, current, updates)
    np.testing.assert_allclose(result.parameters["w"], [0.5, 0.05, 0.0], atol=1e-6)
    assert result.metrics["dp_rounds"] == 1
    first = result.metrics["epsilon"]
    second = dp.aggregate(2, result.parameters, [ModelUpdate("a", 2, 1, {"w": [0.0] * 3})])
    assert second.metrics["epsilon"] > first


def test_fewer_participants_than_expected_shrink_the_step_not_the_privacy():
    current = {"w": np.array([1.0])}
    updates = [ModelUpdate(p, 1, 3, {"w": [2.0]}) for p in "ab"]
    dp = DifferentialPrivacy(FedAvg(weighted=False), 1e-9, 10.0, 4)
    assert dp.aggregate(1, current, updates).parameters["w"][0] == pytest.approx(1.5)


@given(
    deltas=st.lists(st.lists(st.floats(-100, 100), min_size=3, max_size=3), min_size=1, max_size=6),
    clip=st.floats(0.1, 10.0),
    expected=st.integers(1, 8),
    clip_on_server=st.booleans(),
)
def test_one_participant_moves_the_released_mean_by_at_most_c_over_m(
    deltas, clip, expected, clip_on_server
):
    """The sensitivity the noise is calibrated to, checked with the noise switched off: adding
    or removing any one participant moves the output by at most C / m."""
    current = {"w": np.array([0.5, -1.0, 2.0])}
    updates = [
        ModelUpdate(f"p{i}", 1, 1, {"w": current["w"] + np.array(d)}) for i, d in enumerate(deltas)
    ]
    clip_on = "server" if clip_on_server else "client"
    if not clip_on_server:  # participants clip their own delta
        updates = [
            ModelUpdate(u.participant, 1, 1, clip_delta(u.vectors, current, clip)[0])
            for u in updates
        ]
    dp = DifferentialPrivacy(FedAvg(weighted=False), 1e-100, clip, expected, clip_on=clip_on)
    with_all = dp.aggregate(1, current, updates).parameters["w"]
    without_one = dp.aggregate(1, current, updates[1:]).parameters["w"]
    assert np.linalg.norm(with_all - without_one) <= clip / expected * (1 + 1e-9)


def test_a_round_where_nobody_learned_is_noised_and_counted_too():
    """Releasing the exact global parameters would tell that nobody learned this round."""
    current = {"w": np.array([1.0, 2.0])}
    dp = DifferentialPrivacy(FedAvg(weighted=False), 1.0, 1.0, 2, rng=np.random.default_rng(5))
    result = dp.aggregate(1, current, [ModelUpdate("a", 1, 0, {"w": [5.0, 5.0]})])
    assert not np.array_equal(result.parameters["w"], current["w"])
    assert result.metrics["dp_rounds"] == 1
    assert result.metrics["epsilon"] > 0.0


def test_client_side_dp_tells_participants_to_clip_and_runs_under_secure_aggregation():
    dp = DifferentialPrivacy(FedAvg(weighted=False), 1e-9, 2.0, 2, clip_on="client")
    assert dp.config(1) == {"clip_norm": 2.0}
    secure = SecureAggregation(dp)
    assert secure.config(1)["clip_norm"] == 2.0
    current = {"w": np.zeros(2)}
    people = {p: SecAggParticipant(p, X25519Agreement()) for p in "abc"}
    updates = {
        p: ModelUpdate(p, 1, 10, {"w": [1.0, x]})
        for p, x in zip("abc", (0.0, 1.0, 2.0), strict=True)
    }
    result = run_round(secure, 1, current, people, updates, drop={"b"})
    np.testing.assert_allclose(result.parameters["w"], [1.0, 1.0], atol=1e-6)
    assert result.metrics["dp_rounds"] == 1
    assert result.metrics["noise_std"] == pytest.approx(1e-9 * 2.0 / 2)


def test_server_side_dp_cannot_run_under_secure_aggregation():
    dp = DifferentialPrivacy(FedAvg(weighted=False), 1.0, 1.0, 2, clip_on="server")
    with pytest.raises(ConfigurationError, match="not both"):
        SecureAggregation(dp)
