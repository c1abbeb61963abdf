"""The worker's FL client without Kafka: when it sends, what it seals, how it folds in."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fl.client import GlobalModel, open_update, sign_global, update_from_model
from fl.update import ModelUpdate
from fl.watchlist import entity_key, new_key, seal_watch_key
from fraud.decisions import PolicyConfig, decide
from fraud.models import RiskModel, RiverModel
from fraud.schema import Transaction
from pqc.freshness import InMemoryFreshness
from streams.fl_sync import (
    WATCH_KEY_FILE,
    FlClient,
    FlKeys,
    FlSetupError,
    GlobalFollower,
    WatchClient,
    fold_in_river,
    load_fl_keys,
    load_watch_key,
)
from streams.metrics import WorkerMetrics
from streams.settings import WorkerSettings
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


def _settings(fed: Federation, index: int, watch_key: Path | None = None) -> WorkerSettings:
    store = fed.retailers[index]
    return WorkerSettings(retailer=f"r{index}", bootstrap="", fl_identity=store.path,
                          fl_aggregator=store.path, fl_trust=store.path / "registry.json",
                          fl_watch_key=watch_key)


def test_the_watch_key_comes_from_the_flag_or_the_key_store_else_it_is_off(
        tmp_path: Path) -> None:
    fed = make_federation(tmp_path / "fed")  # its own: a key file in a shared store would leak
    keys = keys_of(fed, 1)
    assert load_watch_key(_settings(fed, 1), keys) is None  # no key: the watchlist is off
    key = new_key()
    store = fed.retailers[1]
    blob = seal_watch_key(key, fed.admin.identity,
                          store.registry.current_kem_key(store.identity.name), 1)
    (store.path / WATCH_KEY_FILE).write_bytes(blob)
    assert load_watch_key(_settings(fed, 1), keys) == key
    assert load_watch_key(_settings(fed, 1), keys) == key  # every start opens it again
    with pytest.raises(FlSetupError, match="--fl-watch-key"):
        load_watch_key(_settings(fed, 1, tmp_path / "missing"), keys)
    other = tmp_path / "for-r0.sealed"  # sealed to another retailer
    other.write_bytes(seal_watch_key(key, fed.admin.identity, fed.aggregator_kem, 2))
    with pytest.raises(FlSetupError, match="--fl-watch-key"):
        load_watch_key(_settings(fed, 1, other), keys)


def _tx(i: int, card: str, device: str | None = None) -> Transaction:
    return Transaction(tx_id=f"t{i}", retailer_id="r0", occurred_at=1767225600.0 + i,
                       amount=20.0, customer_id=f"c{i}", payment_instrument=card,
                       device_id=device)


def reports_alone(client: FlClient, model: RiskModel, fed: Federation) -> tuple[int, ModelUpdate]:
    """The update ``client`` seals with its reports and no new label: its round, and the
    update opened as the aggregator does."""
    client.ready = True
    due = client.next_update(model, 300.0, now=client.last_sent_at + 301)
    assert due is not None
    return due[0], open_update(due[1], fed.aggregator.kem, fed.aggregator.registry,
                               InMemoryFreshness())


def test_the_worker_reports_its_holds_and_holds_what_others_reported(
        fed: Federation, tmp_path: Path) -> None:
    key = new_key()
    metrics = WorkerMetrics("r0")
    client = FlClient(keys_of(fed), tmp_path / "seq.json", metrics, sync_labels=1)
    client.watch = WatchClient(key, tmp_path / "own.json", metrics)
    config = PolicyConfig()
    held = _tx(1, "card-held-here", "dev-1")
    decision = client.watch.after_decide(held, decide(held, 0.9, config))
    assert decision.action == "hold"  # its own hold: reported, not changed
    client.watch.after_decide(_tx(2, "card-fine"), decide(_tx(2, "card-fine"), 0.1, config))
    model = RiskModel()
    round_, update = reports_alone(client, model, fed)
    mine = {entity_key(key, "instrument", "card-held-here"), entity_key(key, "device", "dev-1")}
    assert set(update.watch) == mine and update.examples == 0
    assert client.watch.reporter.pending  # kept until the update is written
    client.sent(round_)
    assert not client.watch.reporter.pending

    stolen = entity_key(key, "instrument", "card-stolen")
    listed = {stolen: 1, **{k: 1 for k in mine}}  # its own reports come back: not others'
    client.fold(SimpleNamespace(model=model), GlobalModel(
        1, "r1-a", None, ("retailer-0", "retailer-1"), "fedavg", 0,
        update_from_model(model, "x", 1).vectors, listed))
    assert client.watch.watchlist is not None
    assert dict(client.watch.watchlist.reported) == {stolen: 1}
    tx = _tx(3, "card-stolen")
    raised = client.watch.after_decide(tx, decide(tx, 0.1, config))
    assert raised.action == "hold"
    assert raised.reasons[0] == "watchlist:instrument reported by 1 other retailer"
    again = _tx(4, "card-held-here")  # listed only by this retailer itself
    assert client.watch.after_decide(again, decide(again, 0.1, config)).action == "allow"
    assert not client.watch.reporter.pending  # a watchlist hold is never reported again
    assert 'qsfraud_fl_watch_holds_total{retailer="r0"} 1' in metrics.render()

    restarted = WatchClient(key, tmp_path / "own.json", metrics)  # own reports kept
    assert restarted.reporter.others(listed, time.time()) == {stolen: 1}


def test_reporting_what_was_sent_to_step_up_is_a_choice(tmp_path: Path) -> None:
    key = new_key()
    config = PolicyConfig()
    stepped = _tx(1, "card-stepped-up")
    holds_only = WatchClient(key, tmp_path / "a.json", WorkerMetrics("r0"))
    holds_only.after_decide(stepped, decide(stepped, 0.6, config))
    assert not holds_only.reporter.pending
    verify = WatchClient(key, tmp_path / "b.json", WorkerMetrics("r0"), report="verify")
    verify.listed(GlobalModel(1, "r1-a", None, ("retailer-1",), "fedavg", 0, {},
                              {entity_key(key, "instrument", "card-stepped-up"): 1}))
    decision = verify.after_decide(stepped, decide(stepped, 0.6, config))
    assert decision.action == "hold"  # reported (its own verify) and raised all the same
    assert set(verify.reporter.pending) == {entity_key(key, "instrument", "card-stepped-up")}
    with pytest.raises(ValueError, match="report"):
        WatchClient(key, tmp_path / "c.json", WorkerMetrics("r0"), report="allow")


def test_new_devices_are_reported_and_a_device_new_here_and_elsewhere_is_held(
        fed: Federation, tmp_path: Path) -> None:
    key = new_key()
    metrics = WorkerMetrics("r0")
    client = FlClient(keys_of(fed), tmp_path / "seq.json", metrics, sync_labels=1)
    client.watch = WatchClient(key, tmp_path / "own.json", metrics, new_devices=True,
                               new_min_score=0.2)
    config = PolicyConfig()
    mine = _tx(1, "card-1", "dev-first-here")
    assert client.watch.after_decide(mine, decide(mine, 0.1, config)).action == "allow"
    model = RiskModel()
    round_, update = reports_alone(client, model, fed)
    own = entity_key(key, "device", "dev-first-here")
    assert update.watch == () and update.watch_new == (own,)
    client.sent(round_)
    assert not client.watch.pending()
    assert (tmp_path / "fl-watch-devices.json").exists()

    phone = entity_key(key, "device", "fraud-phone")
    client.fold(SimpleNamespace(model=model), GlobalModel(
        1, "r1-a", None, ("retailer-0", "retailer-1"), "fedavg", 0,
        update_from_model(model, "x", 1).vectors, {}, {phone: 1, own: 1}))
    assert client.watch.watchlist is not None
    assert dict(client.watch.watchlist.new_devices) == {phone: 1}  # its own taken off
    stolen = _tx(2, "card-stolen", "fraud-phone")  # the phone is new here too
    raised = client.watch.after_decide(stolen, decide(stolen, 0.3, config))
    assert raised.action == "hold"
    assert raised.reasons[0] == "watchlist:device new at 1 other retailer"
    low = _tx(3, "card-other", "fraud-phone")
    assert client.watch.after_decide(low, decide(low, 0.1, config)).action == "allow"
    again = _tx(4, "card-1", "dev-first-here")  # listed only by this retailer itself
    assert client.watch.after_decide(again, decide(again, 0.3, config)).action == "allow"

    restarted = WatchClient(key, tmp_path / "own.json", metrics, new_devices=True)
    assert restarted.seen.sight(own, time.time() + 7200.0) > 3600.0  # known, not new
    assert restarted.new_reporter.others({own: 1, phone: 1}, time.time()) == {phone: 1}
    off = WatchClient(key, tmp_path / "off.json", metrics)  # the default: no device memory
    off.after_decide(mine, decide(mine, 0.1, config))
    assert not off.pending() and not off.seen.first_seen
