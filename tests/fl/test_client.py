"""fl.client: model <-> update vectors, sealing, the signed global model, the fold-in."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl.client import (
    MIX_GRID,
    GlobalModel,
    MixRecord,
    StaleGlobal,
    blend,
    fold_in,
    open_global,
    open_update,
    seal_update,
    sign_global,
    state_from_vectors,
    update_from_model,
    update_from_state,
    vectors_from_state,
)
from fl.update import ModelUpdate, UpdateFormatError
from fraud.models.risk import RiskModel
from pqc.errors import Replay, TamperedEnvelope, UnauthorizedSender, UnknownSender
from pqc.freshness import InMemoryFreshness
from tests.fl.conftest import Federation


def trained(seed: int, n: int = 200, shift: float = 0.0) -> tuple[RiskModel, list]:
    rng = random.Random(seed)
    model = RiskModel()
    data = []
    for _ in range(n):
        y = rng.random() < 0.2
        amount = rng.gauss(3.0 if y else 0.0, 1.0) + shift
        x = {"amount": amount, "night": float(rng.random() < 0.5)}
        model.learn_one(x, y)
        data.append((x, y))
    return model, data


def test_update_counts_only_labels_since_the_last_global() -> None:
    model, _ = trained(1, 120)
    first = update_from_model(model, "retailer-0", 1)
    assert first.examples == 120
    assert set(first.vectors) == {"f/amount", "f/night", "intercept"}
    glob = GlobalModel(1, "g1", None, ("retailer-0",), "FedAvg", 120, first.vectors)
    fold_in(model, glob, [])
    assert update_from_model(model, "retailer-0", 2).examples == 0
    rng = random.Random(2)
    for _ in range(30):
        model.learn_one({"amount": rng.gauss(0, 1)}, False)
    assert update_from_model(model, "retailer-0", 2).examples == 30


def test_vectors_round_trip_through_a_state() -> None:
    model, data = trained(3)
    state = model.export_shared()
    vectors = vectors_from_state(state)
    rebuilt = RiskModel.from_state(state_from_vectors(vectors, state, state["linear"]["n"], "v"))
    for x, _ in data[:20]:
        assert rebuilt.supervised_proba(x) == pytest.approx(model.supervised_proba(x), abs=1e-9)


def test_sealed_update_opens_only_for_the_aggregator_and_once(federation: Federation) -> None:
    retailer = federation.retailers[0]
    update = ModelUpdate(retailer.identity.name, 4, 10, {"w": [1.0, 2.0]})
    blob = seal_update(update, retailer.identity, federation.aggregator_kem, 7)
    fresh = InMemoryFreshness()
    agg = federation.aggregator
    assert open_update(blob, agg.kem, agg.registry, fresh) == update
    with pytest.raises(Replay):
        open_update(blob, agg.kem, agg.registry, fresh)
    tampered = bytearray(blob)
    tampered[-100] ^= 1
    with pytest.raises(TamperedEnvelope):
        open_update(bytes(tampered), agg.kem, agg.registry, InMemoryFreshness())


def test_update_from_a_non_retailer_or_a_stranger_is_refused(federation: Federation) -> None:
    agg = federation.aggregator
    admin = federation.admin
    blob = seal_update(ModelUpdate("admin-1", 1, 1, {"w": [1.0]}), admin.identity,
                       federation.aggregator_kem, 1)
    with pytest.raises(UnauthorizedSender):
        open_update(blob, agg.kem, agg.registry, InMemoryFreshness())
    outsider = federation.outsider
    blob = seal_update(ModelUpdate("retailer-x", 1, 1, {"w": [1.0]}), outsider.identity,
                       outsider.registry.current_kem_key("aggregator"), 1)
    with pytest.raises(UnknownSender):
        open_update(blob, agg.kem, agg.registry, InMemoryFreshness())


def test_update_claiming_another_participant_is_refused(federation: Federation) -> None:
    r0 = federation.retailers[0]
    blob = seal_update(ModelUpdate("retailer-1", 1, 1, {"w": [1.0]}), r0.identity,
                       federation.aggregator_kem, 1)
    agg = federation.aggregator
    with pytest.raises(UpdateFormatError, match="participant"):
        open_update(blob, agg.kem, agg.registry, InMemoryFreshness())


def test_global_model_verifies_and_stale_rounds_are_refused(federation: Federation) -> None:
    glob = GlobalModel(3, "g3", "g2", ("retailer-0", "retailer-1"), "FedAvg", 50,
                       {"intercept": np.array([0.5])})
    blob = sign_global(glob, federation.aggregator.identity, 3)
    registry = federation.retailers[1].registry
    fresh = InMemoryFreshness()
    opened = open_global(blob, registry, fresh, last_round=2)
    assert opened.to_wire() == glob.to_wire()
    with pytest.raises(Replay):
        open_global(blob, registry, fresh, last_round=2)
    with pytest.raises(StaleGlobal):
        open_global(sign_global(glob, federation.aggregator.identity, 4), registry,
                    InMemoryFreshness(), last_round=3)
    forged = sign_global(glob, federation.retailers[0].identity, 5)
    with pytest.raises(UnauthorizedSender):
        open_global(forged, registry, InMemoryFreshness())


def test_fold_in_is_personalised_not_an_overwrite() -> None:
    local, data = trained(5, 300)
    other, _ = trained(6, 300, shift=5.0)  # a retailer whose data looks nothing like ours
    bad = update_from_model(other, "retailer-9", 1).vectors
    glob = GlobalModel(1, "g1", None, ("retailer-9",), "FedAvg", 300, bad)
    mix = fold_in(local, glob, data[-100:])
    assert mix < 1.0  # our own labels say the foreign model is worse: we keep ours mostly
    assert local.version == "g1"
    similar, _ = trained(7, 300)
    glob2 = GlobalModel(2, "g2", "g1", ("retailer-8",), "FedAvg", 300,
                        update_from_model(similar, "retailer-8", 2).vectors)
    assert fold_in(local, glob2, data[-100:]) in MIX_GRID


def test_fold_in_with_a_record_moves_on_out_of_sample_evidence_only() -> None:
    own, data = trained(10, 400)
    same = GlobalModel(1, "g1", None, ("a",), "FedAvg", 400,
                       update_from_model(own, "a", 1).vectors)
    record = MixRecord()
    assert fold_in(own, same, data[-200:], record=record) == 0.0  # no evidence yet: own
    assert fold_in(own, same, data[-200:], record=record, fresh=trained(11, 300)[1]) == 0.0
    # a retailer whose own labels taught it nothing, and a global model that learned a lot
    rng = random.Random(12)
    noisy = RiskModel()
    for x, _ in trained(12, 100)[1]:
        noisy.learn_one(x, rng.random() < 0.2)
    good = GlobalModel(2, "g2", None, ("b",), "FedAvg", 6000,
                       update_from_model(trained(13, 6000)[0], "b", 2).vectors)
    record = MixRecord()
    recent = trained(14, 200)[1]
    assert fold_in(noisy, good, recent, record=record) == 0.0
    # the frozen candidates then rank labels none of them learned: the global model's win
    assert fold_in(noisy, good, recent, record=record, fresh=trained(15, 400)[1]) > 0.0
    assert record.frauds > 50


def test_labels_observed_as_they_come_give_the_record_of_scoring_them_at_the_fold_in() -> None:
    own, data = trained(16, 400)
    good = GlobalModel(2, "g2", None, ("b",), "FedAvg", 6000,
                       update_from_model(trained(13, 6000)[0], "b", 2).vectors)
    fresh = trained(17, 500)[1]
    at_once, as_they_come, capped = MixRecord(), MixRecord(), MixRecord(limit=300)
    for record in (at_once, as_they_come, capped):
        fold_in(RiskModel.from_state(own.export_state()), good, data[-200:], record=record)
    for start in range(0, len(fresh), 37):  # as a worker's label batches come
        as_they_come.observe(fresh[start:start + 37])
        capped.observe(fresh[start:start + 37])
    at_once.score(fresh)
    as_they_come.score()
    assert (as_they_come.sums, as_they_come.squares, as_they_come.frauds) == (
        at_once.sums, at_once.squares, at_once.frauds)
    assert at_once.frauds > 10
    capped.score()  # the newest 300 only, as if only those had come
    newest = MixRecord()
    fold_in(RiskModel.from_state(own.export_state()), good, data[-200:], record=newest)
    newest.score(fresh[-300:])
    assert (capped.sums, capped.frauds) == (newest.sums, newest.frauds)


def test_keeping_the_own_model_leaves_its_future_as_if_nothing_was_folded_in() -> None:
    folded, data = trained(20, 300)
    untouched, _ = trained(20, 300)
    rng = random.Random(21)
    wider = RiskModel()  # the federation knows a feature this retailer has not seen yet
    for _ in range(300):
        y = rng.random() < 0.3
        wider.learn_one({"amount": rng.gauss(2.0 if y else 0.0, 1.0),
                         "velocity": rng.gauss(3.0 if y else 0.0, 1.0)}, y)
    glob = GlobalModel(1, "g1", None, ("b",), "FedAvg", 300,
                       update_from_model(wider, "b", 1).vectors)
    assert fold_in(folded, glob, data[-100:], grid=(0.0,)) == 0.0
    later = [({"amount": rng.gauss(0.0, 1.0), "night": 1.0,
               "velocity": rng.gauss(0.0, 1.0)}, rng.random() < 0.2) for _ in range(500)]
    for x, y in later:
        folded.learn_one(x, y)
        untouched.learn_one(x, y)
    assert [folded.score_one(x) for x, _ in later] == [untouched.score_one(x) for x, _ in later]


def test_without_evidence_either_way_the_own_model_is_kept() -> None:
    few, data = trained(30, 10)  # fewer than 20 labels
    learned = GlobalModel(1, "g1", None, ("b",), "FedAvg", 300,
                          update_from_model(trained(31, 300)[0], "b", 1).vectors)
    assert fold_in(few, learned, data, record=MixRecord()) == 0.0
    assert fold_in(few, learned, data) == 0.0
    legit_only = [(x, False) for x, _ in trained(32, 100)[1]]  # labels, but no fraud yet
    assert fold_in(few, learned, legit_only, record=MixRecord()) == 0.0
    assert fold_in(few, learned, legit_only) == 0.0


def test_fold_in_keeps_local_counts_so_nothing_is_counted_twice() -> None:
    local, data = trained(8, 150)
    n_before = local.n
    glob = GlobalModel(1, "g1", None, ("a", "b"), "FedAvg", 10_000,
                       update_from_model(trained(9, 150)[0], "a", 1).vectors)
    fold_in(local, glob, data)
    assert local.n == n_before  # the global's 10,000 are not added to ours
    assert local.export_delta()["linear"]["n"] == 0


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["a", "b", "c"]),
                    st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=2), min_size=1),
    st.dictionaries(st.sampled_from(["b", "c", "d"]),
                    st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=2), min_size=1),
    st.sampled_from(MIX_GRID),
)
def test_blend_is_between_local_and_global(local: dict, glob: dict, mix: float) -> None:
    lv = {k: np.array(v) for k, v in local.items()}
    gv = {k: np.array(v) for k, v in glob.items()}
    out = blend(lv, gv, mix)
    assert set(out) == (set(lv) | set(gv) if mix > 0.0 else set(lv))
    for name, values in out.items():
        lo = np.minimum(lv.get(name, gv.get(name)), gv.get(name, lv.get(name)))
        hi = np.maximum(lv.get(name, gv.get(name)), gv.get(name, lv.get(name)))
        assert np.all(values >= lo - 1e-6) and np.all(values <= hi + 1e-6)
    if mix == 0.0:
        assert all(np.array_equal(out[k], lv[k]) for k in lv)


@settings(max_examples=50, deadline=None)
@given(st.recursive(st.none() | st.integers() | st.text(max_size=5) | st.floats(),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                        max_size=3)))
def test_global_wire_parser_names_the_field_or_accepts(wire: object) -> None:
    with contextlib.suppress(UpdateFormatError):
        GlobalModel.from_wire(wire)


def test_river_linear_pipeline_round_trips_through_update_vectors() -> None:
    from river import linear_model, preprocessing

    from fraud.models.river_state import export_linear_pipeline, load_linear_pipeline

    pipe = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    rng = random.Random(11)
    rows = [({"amount": rng.gauss(3.0 if y else 0.0, 1.0), "n": rng.random()}, y)
            for y in (rng.random() < 0.3 for _ in range(200))]
    for x, y in rows:
        pipe.learn_one(x, y)
    state = export_linear_pipeline(pipe, n=200, n_pos=sum(y for _, y in rows),
                                   n_neg=sum(not y for _, y in rows), version="local")
    vectors = update_from_state(state, "retailer-0", 1, 200).vectors
    assert set(vectors) == {"f/amount", "f/n", "intercept"}
    rebuilt = load_linear_pipeline(state_from_vectors(vectors, state, 200, "g1"))
    for x, _ in rows[:20]:
        assert rebuilt.predict_proba_one(x)[True] == pytest.approx(
            pipe.predict_proba_one(x)[True], abs=1e-9)
