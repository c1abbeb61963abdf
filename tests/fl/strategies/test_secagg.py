"""Secure aggregation: masks cancel, one masked update looks random, dropouts are recovered,
and secure + robust in one round is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl.strategies import (
    Aggregate,
    ClippedUpdates,
    ConfigurationError,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    FixedPoint,
    KEMAgreement,
    MaskedRound,
    MaskedUpdate,
    SecAggParticipant,
    SecureAggregation,
    X25519Agreement,
)
from fl.strategies.secagg import (
    RecoveryIncomplete,
    SecAggError,
    ValueOutOfRange,
    mask_stream,
    run_round,
)
from fl.update import ModelUpdate, UpdateFormatError
from pqc.backend import X25519_ML_KEM_768, get_backend

CURRENT = {"b": np.zeros(1), "w": np.zeros(4)}


def key_agreed(ids, agreement=X25519Agreement, round_=1, **kwargs):
    """Participants that have run the key agreement of ``round_`` with each other."""
    people = {p: SecAggParticipant(p, agreement(), **kwargs) for p in ids}
    roster = {p: person.advertise() for p, person in people.items()}
    inbox: dict[str, dict[str, bytes]] = {p: {} for p in people}
    for p, person in people.items():
        for peer, message in person.share(round_, roster).items():
            inbox[peer][p] = message
    for p, person in people.items():
        person.receive(inbox[p])
    return people


def update(p, examples, flat, round_=1):
    return ModelUpdate(p, round_, examples, {"b": flat[:1], "w": flat[1:5]})


@settings(max_examples=60, deadline=None)
@given(data=st.data(), weighted=st.booleans())
def test_the_unmasked_sum_equals_plain_fedavg_for_any_participants_and_dropouts(data, weighted):
    ids = data.draw(
        st.lists(st.text("abcdefgh", min_size=1, max_size=2), min_size=2, max_size=7, unique=True)
    )
    drop = set(data.draw(st.sets(st.sampled_from(ids), max_size=len(ids) - 2)))
    updates = {
        p: update(
            p,
            data.draw(st.integers(0, 500)),
            data.draw(st.lists(st.floats(-1e3, 1e3), min_size=5, max_size=5)),
        )
        for p in ids
    }
    strategy = FedAvg(weighted=weighted)
    people = {p: SecAggParticipant(p, X25519Agreement()) for p in ids}
    secure = run_round(SecureAggregation(strategy), 1, CURRENT, people, updates, drop=drop)
    survivors = [u for p, u in updates.items() if p not in drop]
    plain = strategy.aggregate(1, CURRENT, survivors)
    for name in CURRENT:
        np.testing.assert_allclose(secure.parameters[name], plain.parameters[name], atol=1e-6)
    assert secure.metrics["dropped"] == len(drop)
    assert secure.metrics["participants"] == len(survivors)


@pytest.mark.parametrize(
    "agreement",
    [KEMAgreement, lambda: KEMAgreement(get_backend().kem(X25519_ML_KEM_768)), X25519Agreement],
    ids=["ML-KEM-768", "X25519MLKEM768", "X25519"],
)
def test_masks_cancel_exactly_in_the_fixed_point_sum(agreement):
    """Without dropouts the sum of masked vectors is bit-identical to the sum of encodings."""
    codec = FixedPoint()
    rng = np.random.default_rng(3)
    people = key_agreed("abcde", agreement)
    plain = {p: update(p, int(rng.integers(1, 100)), rng.normal(0, 10, 5)) for p in people}
    masked = [people[p].mask(plain[p], FedAvg()) for p in people]
    total = sum((m.values for m in masked), start=np.zeros(6, dtype=np.uint64))
    expected = sum(
        (
            codec.encode(
                np.append(np.concatenate([u.vectors["b"], u.vectors["w"]]) * u.examples, u.examples)
            )
            for u in plain.values()
        ),
        start=np.zeros(6, dtype=np.uint64),
    )
    assert np.array_equal(total, expected)
    for m, p in zip(masked, people, strict=True):  # no single masked vector is its encoding
        assert not np.array_equal(m.values, codec.encode(np.append(plain[p].vectors["b"], 0)))


def bit_frequencies_look_uniform(values: np.ndarray) -> None:
    n = len(values)
    bits = (values[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    ones = bits.sum(axis=0)
    assert np.all(np.abs(ones - n / 2) < 6 * math.sqrt(n) / 2), ones
    counts = np.bincount(
        np.frombuffer(values.astype("<u8").tobytes(), dtype=np.uint8), minlength=256
    )
    expected = 8 * n / 256
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 255 + 6 * math.sqrt(2 * 255), chi2  # mean 255, std sqrt(510)


@pytest.mark.parametrize("fill", [0.0, 1.0, -1e3], ids=["zeros", "ones", "large"])
def test_one_masked_update_is_indistinguishable_from_random(fill):
    """What the aggregator holds of one participant: every bit is a fair coin, every byte
    value equally frequent, whatever the update (all zeros included)."""
    size = 8191
    people = key_agreed("abc", KEMAgreement)
    plain = ModelUpdate("b", 1, 7, {"w": np.full(size, fill)})
    masked = people["b"].mask(plain, FedAvg())
    bit_frequencies_look_uniform(masked.values)
    # and two participants' masked vectors are unrelated to each other
    other = people["a"].mask(ModelUpdate("a", 1, 7, {"w": np.full(size, fill)}), FedAvg())
    bit_frequencies_look_uniform(masked.values ^ other.values)


def test_masks_differ_between_rounds_and_pairs():
    seed = bytes(range(32))
    assert not np.array_equal(mask_stream(seed, 1, 16), mask_stream(seed, 2, 16))
    assert not np.array_equal(mask_stream(seed, 1, 16), mask_stream(bytes(32), 1, 16))
    assert np.array_equal(mask_stream(seed, 1, 16)[:8], mask_stream(seed, 1, 8))


@pytest.mark.parametrize(
    "robust",
    [FedMedian(), FedTrimmedAvg(0.2), ClippedUpdates(FedAvg(), 1.0)],
    ids=lambda s: s.name,
)
def test_secure_and_robust_in_one_round_is_refused_at_construction(robust):
    with pytest.raises(ConfigurationError, match="choose secure or robust aggregation"):
        SecureAggregation(robust)


def test_clipping_on_top_of_secure_aggregation_is_refused_at_construction():
    with pytest.raises(ConfigurationError, match="participants clip their own delta"):
        ClippedUpdates(SecureAggregation(FedAvg()), 1.0)


class SumOnly(FedAvg):
    """Publishes the unmasked weighted sum itself, to compare it with the plain one."""

    def aggregate_sum(self, round, current, weighted_sum, total_weight, participants):
        return Aggregate({**weighted_sum, "weight": np.array([total_weight])})


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_the_unmasked_sum_is_the_plain_sum_within_the_fixed_point_precision(data):
    ids = data.draw(st.lists(st.sampled_from("abcdefghij"), min_size=2, max_size=8, unique=True))
    drop = set(data.draw(st.sets(st.sampled_from(ids), max_size=len(ids) - 2)))
    bits = data.draw(st.integers(8, 40))
    codec = FixedPoint(fraction_bits=bits, max_participants=16)
    bound = min(1e6, codec.limit / 1000)
    updates = {
        p: update(
            p,
            data.draw(st.integers(0, 1000)),
            data.draw(st.lists(st.floats(-bound / 1001, bound / 1001), min_size=5, max_size=5)),
        )
        for p in ids
    }
    people = {p: SecAggParticipant(p, X25519Agreement(), codec) for p in ids}
    secure = SecureAggregation(SumOnly(), codec)
    result = run_round(secure, 1, CURRENT, people, updates, drop=drop).parameters
    survivors = [u for p, u in updates.items() if p not in drop]
    for name in CURRENT:
        terms = [u.examples * u.vectors[name] for u in survivors]
        plain = sum(terms, start=np.zeros_like(CURRENT[name]))
        # rounding to fixed point, plus the float sum's own rounding
        tolerance = len(survivors) * codec.precision + 1e-15 * len(terms) * sum(
            (np.abs(t) for t in terms), start=np.ones_like(plain)
        )
        assert np.all(np.abs(result[name] - plain) <= tolerance)
    assert result["weight"][0] == sum(u.examples for u in survivors)


def test_secure_aggregation_refuses_plain_updates():
    with pytest.raises(ConfigurationError, match="masked"):
        SecureAggregation(FedAvg()).aggregate(1, CURRENT, [])


def test_a_late_update_after_recovery_started_is_refused():
    people = key_agreed("abc")
    state = MaskedRound(SecureAggregation(FedAvg()), 1, CURRENT, list(people))
    for p in "ab":
        state.collect(people[p].mask(update(p, 1, np.ones(5)), FedAvg()))
    survivors, dropped = state.close()
    assert (survivors, dropped) == (["a", "b"], ["c"])
    late = people["c"].mask(update("c", 1, np.ones(5)), FedAvg())
    with pytest.raises(SecAggError, match="after the round closed"):
        state.collect(late)
    for p in survivors:
        state.recover(p, people[p].reveal(survivors, dropped))
    np.testing.assert_allclose(state.aggregate().parameters["w"], np.ones(4), atol=1e-7)


def test_a_survivor_that_does_not_reveal_leaves_the_sum_masked():
    people = key_agreed("abcd")
    state = MaskedRound(SecureAggregation(FedAvg()), 1, CURRENT, list(people))
    for p in "abc":
        state.collect(people[p].mask(update(p, 1, np.ones(5)), FedAvg()))
    survivors, dropped = state.close()
    state.recover("a", people["a"].reveal(survivors, dropped))
    state.recover("b", people["b"].reveal(survivors, dropped))
    with pytest.raises(RecoveryIncomplete, match="c did not reveal its seed with d"):
        state.aggregate()


def test_a_participant_does_not_reveal_when_too_few_survive():
    people = key_agreed("abc")
    people["a"].mask(update("a", 1, np.ones(5)), FedAvg())
    with pytest.raises(SecAggError, match="only 1 survivors"):
        people["a"].reveal(["a"], ["b", "c"])
    with pytest.raises(SecAggError, match="split the round's roster"):
        people["a"].reveal(["a", "b"], ["b", "c"])
    with pytest.raises(SecAggError, match="has not sent"):
        people["b"].reveal(["a", "b"], ["c"])


def test_masking_needs_the_whole_key_agreement_and_the_right_round():
    people = {p: SecAggParticipant(p, X25519Agreement()) for p in "ab"}
    roster = {p: person.advertise() for p, person in people.items()}
    people["b"].share(1, roster)  # b never hears from a
    with pytest.raises(SecAggError, match="no pair seed yet with"):
        people["b"].mask(update("b", 1, np.ones(5)), FedAvg())
    people = key_agreed("ab")
    with pytest.raises(SecAggError, match="round 2"):
        people["a"].mask(update("a", 1, np.ones(5), round_=2), FedAvg())
    with pytest.raises(SecAggError, match="unexpected key-agreement message"):
        people["a"].receive({"b": b""})  # b sorts after a: a initiates, b does not


def test_values_out_of_the_fixed_point_range_are_refused_not_wrapped():
    people = key_agreed("ab", codec=FixedPoint(fraction_bits=24, max_participants=10))
    huge = update("a", 1000, np.array([1e8, 0, 0, 0, 0]))  # 1e11 > 2^39 / 10
    with pytest.raises(ValueOutOfRange, match="out of the encodable range"):
        people["a"].mask(huge, FedAvg())
    with pytest.raises(ValueOutOfRange):
        FixedPoint().encode(np.array([np.nan]))


@given(st.lists(st.floats(-1e6, 1e6), max_size=50), st.integers(0, 40))
def test_fixed_point_round_trips_within_its_precision(values, bits):
    codec = FixedPoint(fraction_bits=bits, max_participants=2 ** (22 - bits // 2))
    array = np.array(values, dtype=np.float64)
    if array.size and np.max(np.abs(array)) >= codec.limit:
        with pytest.raises(ValueOutOfRange):
            codec.encode(array)
        return
    assert np.all(np.abs(codec.decode(codec.encode(array)) - array) <= codec.precision)


def test_the_aggregator_refuses_masked_updates_that_do_not_fit():
    people = key_agreed("abc")
    secure = SecureAggregation(FedAvg())
    masked = [people[p].mask(update(p, 1, np.ones(5)), FedAvg()) for p in "abc"]
    with pytest.raises(SecAggError, match="two masked updates"):
        secure.aggregate_masked(1, CURRENT, [masked[0], masked[0]], list("abc"), {})
    with pytest.raises(SecAggError, match="outside the roster"):
        secure.aggregate_masked(1, CURRENT, masked, list("ab"), {})
    with pytest.raises(SecAggError, match="expected 2 and 6"):
        secure.aggregate_masked(2, CURRENT, masked, list("abc"), {})
    short = MaskedUpdate("a", 1, masked[0].values[:3])
    with pytest.raises(SecAggError, match="3 values"):
        secure.aggregate_masked(1, CURRENT, [short, *masked[1:]], list("abc"), {})


def test_masked_updates_travel_as_versioned_plain_data():
    people = key_agreed("ab")
    masked = people["a"].mask(update("a", 1, np.ones(5)), FedAvg())
    wire = masked.to_wire()
    assert wire["v"] == 1 and isinstance(wire["masked"], str)
    back = MaskedUpdate.from_wire(wire)
    assert (back.participant, back.round) == ("a", 1)
    assert np.array_equal(back.values, masked.values)
    for bad, field in [
        ({"masked": "***"}, "masked"),
        ({"masked": "AAAA"}, "masked"),
        ({"masked": 3}, "masked"),
        ({"v": 0}, "v"),
    ]:
        with pytest.raises(UpdateFormatError) as caught:
            MaskedUpdate.from_wire({**wire, **bad})
        assert caught.value.field == field


def test_the_round_config_tells_participants_how_to_encode():
    config = SecureAggregation(FedAvg(), FixedPoint(20, 50)).config(3)
    assert config == {"secure_aggregation": True, "fraction_bits": 20, "max_participants": 50}


def test_a_participant_alone_does_not_send_its_update():
    people = key_agreed("a")
    with pytest.raises(SecAggError, match="in clear"):
        people["a"].mask(update("a", 1, np.ones(5)), FedAvg())


def test_only_survivors_of_a_closed_round_reveal():
    people = key_agreed("abc")
    state = MaskedRound(SecureAggregation(FedAvg()), 1, CURRENT, list(people))
    state.collect(people["a"].mask(update("a", 1, np.ones(5)), FedAvg()))
    with pytest.raises(SecAggError, match="not a survivor of a closed round"):
        state.recover("a", {})
    state.close()
    with pytest.raises(SecAggError, match="not a survivor"):
        state.recover("b", {})


def test_a_round_nobody_completed_keeps_the_global_parameters():
    people = key_agreed("ab")
    state = MaskedRound(SecureAggregation(FedAvg()), 1, CURRENT, list(people))
    assert state.close() == ([], ["a", "b"])
    result = state.aggregate()
    assert all(np.array_equal(result.parameters[k], CURRENT[k]) for k in CURRENT)
