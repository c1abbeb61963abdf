"""The worker's FL client without Kafka: when it sends, what it seals, how it folds in."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fl.client import GlobalModel, open_update, sign_global, update_from_model
from fraud.models import RiskModel, RiverModel
from pqc.freshness import InMemoryFreshness
from streams.fl_sync import (
    FlClient,
    FlKeys,
    FlSetupError,
    GlobalFollower,
    fold_in_river,
    load_fl_keys,
)
from streams.metrics import WorkerMetrics
from tests.fl.conftest import Federation, make_federation


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return make_federation(tmp_path_factory.mktemp("fed"))


def keys_of(fed: Federation, index: int = 0) -> FlKeys:
    store = fed.retailers[index]
    return FlKeys(store, fed.aggregator_kem, store.registry)


def labelled(rng: np.random.Generator, n: int, shift: float = 2.0) -> list[tuple[dict, bool]]:
    out = []
    for _ in range(n):
        y = bool(rng.random() < 0.3)
        out.append(({"amount": float(rng.normal(shift if y else 0.0, 1.0)),
                     "velocity": float(rng.normal(1.0 if y else 0.0, 1.0))}, y))
    return out


def global_of(model_vectors: dict, round_: int, version: str) -> GlobalModel:
    return GlobalModel(round_, version, None, ("retailer-1",), "fedavg", 100, model_vectors)


def test_one_update_a_round_after_n_labels_or_the_interval(fed: Federation, tmp_path: Path):
    client = FlClient(keys_of(fed), tmp_path / "seq.json", WorkerMetrics("r"), sync_labels=10)
    model = RiskModel()
    rng = np.random.default_rng(1)
    examples = labelled(rng, 5)
    for x, y in examples:
        model.learn_one(x, y)
    client.learned(examples)
    assert client.next_update(model, 300.0) is None  # not ready: the global is not read yet
    client.ready = True
    assert client.next_update(model, 300.0, now=client.last_sent_at + 1) is None  # 5 < 10
    due = client.next_update(model, 300.0, now=client.last_sent_at + 301)  # the interval
    assert due is not None and due[0] == 1
    client.sent(due[0])
    update = open_update(due[1], fed.aggregator.kem, fed.aggregator.registry,
                         InMemoryFreshness())
    assert (update.participant, update.round, update.examples) == ("retailer-0", 1, 5)
    more = labelled(rng, 20)
    client.learned(more)
    assert client.next_update(model, 300.0) is None  # round 1 is not closed yet
    client.fold(SimpleNamespace(model=model),
                global_of(update_from_model(model, "x", 1).vectors, 1, "r1-a"))
    due = client.next_update(model, 300.0)  # 20 labels >= 10
    assert due is not None and due[0] == 2
    assert 'qsfraud_fl_global_round{retailer="r"} 1' in client.metrics.render()


def test_sequence_numbers_keep_increasing_across_restarts(fed: Federation, tmp_path: Path):
    path = tmp_path / "seq.json"
    first = FlClient(keys_of(fed), path, WorkerMetrics("r"))
    sequences = [first._next_sequence() for _ in range(3)]
    again = FlClient(keys_of(fed), path, WorkerMetrics("r"))  # a restarted worker
    sequences.append(again._next_sequence())
    assert sequences == sorted(set(sequences))
    # the aggregator's freshness store refuses a replay of the first after the later ones
    fresh = InMemoryFreshness()
    for s in sequences:
        fresh.advance("retailer-0", "fl.update", s)


def test_fold_is_personalised_and_refuses_a_stale_round(fed: Federation, tmp_path: Path):
    client = FlClient(keys_of(fed), tmp_path / "seq.json", WorkerMetrics("r"))
    rng = np.random.default_rng(2)
    local = RiskModel()
    examples = labelled(rng, 300)
    for x, y in examples:
        local.learn_one(x, y)
    client.learned(examples)
    before = dict(local.weights)
    other = RiskModel()  # a retailer whose fraud looks the other way round
    for x, y in labelled(np.random.default_rng(3), 300, shift=-2.0):
        other.learn_one(x, y)
    pipeline = SimpleNamespace(model=local)
    client.fold(pipeline, global_of(update_from_model(other, "x", 3).vectors, 3, "r3-b"))
    assert local.version == "r3-b" and client.global_round == 3
    # its own data, the opposite of the federation's, chose to keep its own parameters
    assert 'qsfraud_fl_mix{retailer="r"} 0\n' in client.metrics.render()
    assert local.weights == before and local.weights["amount"] > 0
    assert local.export_delta()["linear"]["n"] == 0  # the base: its labels are not re-sent
    client.fold(pipeline, global_of(update_from_model(other, "x", 2).vectors, 2, "r2-c"))
    text = client.metrics.render()
    assert 'outcome="refused",reason="stale_round"' in text
    assert local.version == "r3-b"


def test_a_global_the_model_already_holds_is_not_folded_twice(fed: Federation, tmp_path: Path):
    client = FlClient(keys_of(fed), tmp_path / "seq.json", WorkerMetrics("r"))
    model = RiskModel()
    for x, y in labelled(np.random.default_rng(4), 50):
        model.learn_one(x, y)
    glob = global_of(update_from_model(model, "x", 7).vectors, 7, "r7-d")
    model.version = "r7-d"  # as restored from a checkpoint taken after that fold-in
    weights = dict(model.weights)
    client.fold(SimpleNamespace(model=model), glob)
    assert model.weights == weights and client.global_round == 7


def test_river_linear_pipeline_federates(fed: Federation, tmp_path: Path):
    client = FlClient(keys_of(fed), tmp_path / "seq.json", WorkerMetrics("r"), sync_labels=1)
    client.ready = True
    model = RiverModel()
    examples = labelled(np.random.default_rng(5), 100)
    for x, y in examples:
        model.learn_one(x, y)
    client.learned(examples)
    due = client.next_update(model, 300.0)
    assert due is not None
    client.sent(due[0])
    update = open_update(due[1], fed.aggregator.kem, fed.aggregator.registry,
                         InMemoryFreshness())
    assert update.examples == 100 and "f/amount" in update.vectors
    shifted = {k: v + 0.5 for k, v in update.vectors.items()}
    mix = fold_in_river(model, global_of(shifted, 1, "r1-e"), examples)
    assert mix in (0.0, 0.25, 0.5, 0.75, 1.0) and model.version == "r1-e"
    assert model.n == 100  # its own label counts, never the federation's
    client.fold(SimpleNamespace(model=model), global_of(shifted, 2, "r2-e"))
    more = labelled(np.random.default_rng(6), 7)
    for x, y in more:
        model.learn_one(x, y)
    client.learned(more)
    due = client.next_update(model, 300.0)
    assert due is not None
    update = open_update(due[1], fed.aggregator.kem, fed.aggregator.registry,
                         InMemoryFreshness())
    assert update.examples == 7  # only the labels learned since the last fold-in


def test_follower_refuses_what_the_aggregator_did_not_sign(fed: Federation):
    metrics = WorkerMetrics("r")
    follower = GlobalFollower("unused:1", "t", fed.retailers[0].registry, metrics,
                              deliver=lambda g: None)
    glob = global_of({"intercept": np.array([0.1])}, 4, "r4-f")
    good = sign_global(glob, fed.aggregator.identity, 10)
    assert follower.offer(good) is not None
    assert follower.offer(good) is None  # replayed
    by_retailer = sign_global(global_of({"intercept": np.array([0.1])}, 5, "r5-f"),
                              fed.retailers[1].identity, 11)
    assert follower.offer(by_retailer) is None  # a retailer is not the aggregator
    tampered = bytearray(sign_global(global_of({"intercept": np.array([0.2])}, 6, "r6"),
                                     fed.aggregator.identity, 12))
    tampered[-10] ^= 1
    assert follower.offer(bytes(tampered)) is None
    old = sign_global(global_of({"intercept": np.array([0.1])}, 3, "r3-f"),
                      fed.aggregator.identity, 13)
    assert follower.offer(old) is None  # an older round, freshly signed
    text = metrics.render()
    for reason in ("replayed", "unauthorized", "tampered", "stale_round"):
        assert f'outcome="refused",reason="{reason}"' in text, text


def test_unusable_key_files_are_named(fed: Federation, tmp_path: Path):
    bundle = tmp_path / "agg.json"
    import json

    from pqc.keys import public_bundle

    bundle.write_text(json.dumps(public_bundle(fed.aggregator)))
    registry = fed.retailers[0].path / "registry.json"
    keys = load_fl_keys(fed.retailers[0].path, bundle, registry)
    assert keys.participant == "retailer-0" and keys.aggregator_kem.role == "aggregator"
    with pytest.raises(FlSetupError, match="not a retailer"):
        load_fl_keys(fed.admin.path, bundle, registry)
    retailer_bundle = tmp_path / "r1.json"
    retailer_bundle.write_text(json.dumps(public_bundle(fed.retailers[1])))
    with pytest.raises(FlSetupError, match="not an aggregator"):
        load_fl_keys(fed.retailers[0].path, retailer_bundle, registry)
    with pytest.raises(FlSetupError, match="--fl-trust"):
        load_fl_keys(fed.retailers[0].path, bundle, tmp_path / "missing.json")


def test_fl_needs_all_three_key_flags() -> None:
    from streams.settings import WorkerSettings

    with pytest.raises(ValueError, match="--fl-identity, --fl-aggregator and --fl-trust"):
        WorkerSettings("acme", "x", fl_identity=Path("keys"))
    assert not WorkerSettings("acme", "x").fl_enabled
