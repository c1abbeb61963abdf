"""The federated watchlist: keyed hashes, the aggregator's bounded union, the retailer's view,
the key's distribution and the replay the simulation measures with."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl.aggregator import Round, strategy_named
from fl.client import GlobalModel
from fl.update import ModelUpdate, UpdateFormatError
from fl.watchlist import (
    HASH_HEX,
    NEW_DEVICE_LIMITS,
    ReplaySettings,
    Reporter,
    SeenDevices,
    UnionLimits,
    WatchFormatError,
    WatchlistUnion,
    entity_key,
    hasher,
    new_key,
    open_watch_key,
    replay,
    replay_new_devices,
    seal_watch_key,
    watchlist_from_wire,
    watchlist_to_wire,
)
from fraud.decisions import PolicyConfig, Watchlist, decide
from pqc.errors import OutsideTimeWindow, Replay, UnauthorizedSender, WrongRecipient
from pqc.freshness import InMemoryFreshness
from tests.fl.conftest import Federation

KEY = bytes(range(32))


def test_entity_key_depends_on_key_kind_and_value_and_hides_the_value() -> None:
    k = entity_key(KEY, "instrument", "pi-1")
    assert len(k) == HASH_HEX and "pi-1" not in k
    assert k == entity_key(KEY, "instrument", "pi-1")
    assert k != entity_key(KEY, "device", "pi-1")
    assert k != entity_key(KEY, "instrument", "pi-2")
    assert k != entity_key(bytes(32), "instrument", "pi-1")
    with pytest.raises(ValueError, match="kind"):
        entity_key(KEY, "ip", "10.0.0.1")


def test_union_counts_distinct_retailers_and_expires_after_the_horizon() -> None:
    union = WatchlistUnion(UnionLimits(horizon_s=100.0))
    a, b = entity_key(KEY, "device", "d1"), entity_key(KEY, "device", "d2")
    union.add("r1", [a, a], 0.0)
    union.add("r2", [a, b], 50.0)
    assert union.published(60.0) == {a: 2, b: 1}
    assert union.published(120.0) == {a: 1, b: 1}  # r1's report of a is older than 100 s
    assert union.published(151.0) == {}


def test_a_poisoner_cannot_list_more_than_its_caps() -> None:
    union = WatchlistUnion(UnionLimits(max_per_report=10, max_per_retailer=25,
                                       max_entries=1000))
    honest = entity_key(KEY, "instrument", "stolen")
    union.add("honest", [honest], 0.0)
    for report in range(10):
        keys = [entity_key(KEY, "instrument", f"victim-{report}-{i}") for i in range(50)]
        assert union.add("poisoner", keys, float(report)) == 10
    listed = union.published(10.0)
    assert sum(1 for k in listed if k != honest) == 25  # its newest 25, no more
    assert listed[honest] == 1
    assert union.refused == 400


def test_union_keeps_at_most_max_entries_newest_first() -> None:
    union = WatchlistUnion(UnionLimits(max_entries=3))
    keys = [entity_key(KEY, "device", f"d{i}") for i in range(5)]
    for i, k in enumerate(keys):
        union.add(f"r{i}", [k], float(i))
    assert set(union.published(5.0)) == set(keys[2:])


def test_reporter_reports_held_rows_and_tells_others_from_its_own() -> None:
    reporter = Reporter(hasher(KEY), threshold=0.8, horizon_s=100.0, margin_s=10.0)
    tx = {"payment_instrument": "pi-1", "device_id": "d-1"}
    reporter.observe(tx, 0.5, 0.0)
    assert reporter.take(0.0) == []
    reporter.observe(tx, 0.9, 1.0)
    sent = reporter.take(5.0)
    assert sorted(sent) == sorted([entity_key(KEY, "instrument", "pi-1"),
                                   entity_key(KEY, "device", "d-1")])
    assert reporter.take(6.0) == []
    other = entity_key(KEY, "device", "d-9")
    listed = {sent[0]: 1, sent[1]: 3, other: 2}
    assert reporter.others(listed, 7.0) == {sent[1]: 2, other: 2}
    # the union may date the report a little later than it was sent: still its own at 114
    assert reporter.others(listed, 114.0) == {sent[1]: 2, other: 2}
    assert reporter.others(listed, 116.0) == listed  # its own reports expired


def test_watchlist_wire_round_trips_and_refuses_raw_ids() -> None:
    listed = {entity_key(KEY, "device", "d1"): 2}
    assert watchlist_from_wire(watchlist_to_wire(listed)) == listed
    with pytest.raises(WatchFormatError, match="not a hashed key"):
        watchlist_from_wire({"v": 1, "listed": {"pi_03003005b688b661": 1}})
    with pytest.raises(WatchFormatError, match="count"):
        watchlist_from_wire({"v": 1, "listed": {next(iter(listed)): 0}})


@settings(max_examples=50, deadline=None)
@given(st.recursive(st.none() | st.integers() | st.text(max_size=5) | st.floats(),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                        max_size=3)))
def test_watchlist_wire_parser_refuses_with_its_error_or_accepts(wire: object) -> None:
    with contextlib.suppress(WatchFormatError):
        watchlist_from_wire(wire)


def test_consortium_key_is_sealed_by_an_admin_to_one_retailer(federation: Federation) -> None:
    admin, r0, r1 = federation.admin, federation.retailers[0], federation.retailers[1]
    key = new_key()
    blob = seal_watch_key(key, admin.identity,
                          r0.registry.current_kem_key(r0.identity.name), 1)
    fresh = InMemoryFreshness()
    assert open_watch_key(blob, r0.kem, r0.registry, fresh) == key
    with pytest.raises(Replay):
        open_watch_key(blob, r0.kem, r0.registry, fresh)
    with pytest.raises(WrongRecipient):  # the aggregator, or another retailer, cannot open it
        open_watch_key(blob, federation.aggregator.kem, federation.aggregator.registry,
                       InMemoryFreshness())
    with pytest.raises(WrongRecipient):
        open_watch_key(blob, r1.kem, r1.registry, InMemoryFreshness())
    forged = seal_watch_key(key, r1.identity, r0.registry.current_kem_key(r0.identity.name), 2)
    with pytest.raises(UnauthorizedSender):  # only an admin hands out the key
        open_watch_key(forged, r0.kem, r0.registry, InMemoryFreshness())


def _rows(spec: list[tuple[float, str, str, float, bool]]) -> tuple[list, list, list, list, list]:
    times = [t for t, *_ in spec]
    retailers = [r for _, r, *_ in spec]
    entities = [{"payment_instrument": card, "device_id": None} for _, _, card, *_ in spec]
    return times, retailers, entities, [s for *_, s, _ in spec], [y for *_, y in spec]


def test_replay_lists_a_held_card_for_other_retailers_after_the_next_exchange() -> None:
    rows = _rows([
        (0.0, "a", "warm", 0.1, False),
        (10.0, "a", "stolen", 0.9, True),    # a holds it: reported at the next exchange
        (100.0, "b", "stolen", 0.2, True),   # before the exchange at 300 s: passes
        (400.0, "b", "stolen", 0.2, True),   # after it: listed by 1 other retailer
        (410.0, "a", "stolen", 0.2, True),   # a reported it itself: not "other"
        (420.0, "b", "fine", 0.2, False),
    ])
    hits = replay(*rows, ReplaySettings(signal="hold", exchange_every_s=300.0), KEY)
    assert hits == [0, 0, 0, 1, 0, 0]


def test_replay_review_waits_for_the_analyst_and_ignores_false_alarms() -> None:
    rows = _rows([
        (0.0, "a", "stolen", 0.9, True),
        (0.0, "a", "false-alarm", 0.9, False),
        (1000.0, "b", "stolen", 0.1, True),       # review due at 3600 s: not yet
        (1000.0, "b", "false-alarm", 0.1, False),
        (4000.0, "b", "stolen", 0.1, True),
        (4000.0, "b", "false-alarm", 0.1, False),  # never confirmed: never listed
    ])
    settings_ = ReplaySettings(signal="review", exchange_every_s=60.0, review_s=3600.0)
    assert replay(*rows, settings_, KEY) == [0, 0, 0, 0, 1, 0]


def test_the_decision_rule_holds_what_the_replay_lists() -> None:
    key_of = hasher(KEY)
    watch = Watchlist({key_of("instrument", "stolen"): 2}, key_of)
    tx = {"tx_id": "t", "retailer_id": "b", "payment_instrument": "stolen"}
    decision = watch.escalate(decide(tx, 0.1, PolicyConfig()), tx)
    assert decision.action == "hold"
    assert decision.reasons[0] == "watchlist:instrument reported by 2 other retailers"


def test_replay_lists_a_device_new_at_one_retailer_while_it_is_new_at_the_next() -> None:
    h = 3600.0
    spec = [
        (-2 * h, "a", "known"), (-2 * h, "b", "known"),  # both have known it for hours
        (10.0, "a", "fraud-phone"),       # new at a: reported at the next exchange (300 s)
        (100.0, "b", "fraud-phone"),      # before it: not listed yet
        (400.0, "b", "fraud-phone"),      # new at b (300 s ago) and listed as new at a
        (400.0, "a", "fraud-phone"),      # new at a, and b reported it new (at 100 s)
        (10.0, "a", "solo"), (400.0, "a", "solo"),  # a's own report: not "other"
        (500.0, "b", "known"),            # known here: never
        (1000.0, "a", "phone-2"),         # new at a, ...
        (1000.0 + 2 * h, "b", "phone-2"), # ... new at b too, but a's report has expired
        (2000.0, "c", "old-here"), (2000.0, "a", "old-here"),
        (2000.0 + 2 * h, "c", "old-here"),  # listed (a: new 2 h ago, within 6 h) but c has
    ]                                       # known it for 2 h, longer than new_here_s
    times = [t for t, _, _ in spec]
    retailers = [r for _, r, _ in spec]
    entities = [{"payment_instrument": None, "device_id": d} for *_, d in spec]
    order = sorted(range(len(spec)), key=lambda i: times[i])
    limits = UnionLimits(horizon_s=h, max_per_report=1000, max_per_retailer=20_000)
    hits = replay_new_devices([times[i] for i in order], [retailers[i] for i in order],
                              [entities[i] for i in order], KEY, limits=limits)
    by_row = dict(zip(order, hits, strict=True))
    assert [by_row[i] for i in range(len(spec))] == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert NEW_DEVICE_LIMITS.horizon_s == 6 * h


def test_seen_devices_tell_new_from_known_forget_the_stalest_and_survive_a_restart(
        tmp_path: Path) -> None:
    seen = SeenDevices(max_entries=2)
    a, b, c = (entity_key(KEY, "device", d) for d in ("a", "b", "c"))
    assert seen.sight(a, 0.0) == 0.0 and seen.sight(b, 10.0) == 0.0
    assert seen.sight(a, 20.0) == 20.0  # a seen again: b is now the stalest
    assert seen.sight(c, 30.0) == 0.0   # past the bound: b forgotten
    assert seen.sight(b, 40.0) == 0.0   # so b is new again
    seen.save(tmp_path / "seen.json")
    assert not seen.changed
    restored = SeenDevices(max_entries=2)
    restored.restore(json.loads((tmp_path / "seen.json").read_text()))
    assert restored.first_seen == seen.first_seen
    with pytest.raises(WatchFormatError, match="not a hashed key"):
        SeenDevices().restore({"v": 1, "seen": [["dev-raw", 1.0]]})


def test_the_new_device_rule_needs_new_here_a_listing_and_the_score() -> None:
    key_of = hasher(KEY)
    phone = key_of("device", "fraud-phone")
    watch = Watchlist({}, key_of, new_devices={phone: 1}, new_min_score=0.2)
    tx = {"tx_id": "t", "retailer_id": "b", "device_id": "fraud-phone"}
    held = watch.escalate(decide(tx, 0.25, PolicyConfig()), tx, new_here=True)
    assert held.action == "hold"
    assert held.reasons[0] == "watchlist:device new at 1 other retailer"
    assert watch.escalate(decide(tx, 0.25, PolicyConfig()), tx).action == "allow"  # known here
    assert watch.escalate(decide(tx, 0.1, PolicyConfig()), tx, new_here=True).action == "allow"
    other = {**tx, "device_id": "another-phone"}
    assert watch.escalate(decide(other, 0.5, PolicyConfig()), other,
                          new_here=True).action == "verify"  # not listed: the policy's
    with pytest.raises(ValueError, match="new_min_score"):
        Watchlist({}, key_of, new_min_score=1.5)


# ---------------------------------------------------------------------------- on the wire


def _update(who: str, round_: int, watch: tuple[str, ...] = ()) -> ModelUpdate:
    return ModelUpdate(who, round_, 5, {"intercept": [0.0]}, watch)


def test_update_carries_hashed_keys_only() -> None:
    keys = (entity_key(KEY, "device", "d1"), entity_key(KEY, "instrument", "p1"))
    update = _update("r1", 2, keys)
    assert ModelUpdate.from_wire(update.to_wire()) == update
    assert "watch" not in _update("r1", 2).to_wire()  # the v1 form, unchanged without reports
    with pytest.raises(UpdateFormatError, match=r"^watch: .*not a hashed key"):
        ModelUpdate.from_wire({**update.to_wire(), "watch": ["pi_03003005b688b661"]})


def test_new_device_reports_ride_beside_the_holds_in_their_own_field() -> None:
    held, new = entity_key(KEY, "instrument", "p1"), entity_key(KEY, "device", "d-new")
    update = ModelUpdate("r1", 2, 5, {"intercept": [0.0]}, (held,), (new,))
    wire = update.to_wire()
    assert (wire["watch"], wire["watch_new"]) == ([held], [new])
    assert ModelUpdate.from_wire(wire) == update
    assert "watch_new" not in _update("r1", 2, (held,)).to_wire()
    with pytest.raises(UpdateFormatError, match=r"^watch_new: .*not a hashed key"):
        ModelUpdate.from_wire({**wire, "watch_new": ["dev-raw"]})
    model = GlobalModel(3, "r3-x", None, ("a",), "fedavg", 10, {"intercept": np.array([0.5])},
                        {held: 1}, {new: 2})
    again = GlobalModel.from_wire(model.to_wire())
    assert (dict(again.watchlist), dict(again.new_devices)) == ({held: 1}, {new: 2})
    assert "new_devices" not in GlobalModel(3, "r3-x", None, ("a",), "fedavg", 10,
                                            {"intercept": np.array([0.5])}).to_wire()


def test_rounds_list_new_devices_for_hours_not_a_day() -> None:
    new = entity_key(KEY, "device", "d-new")
    first = Round(1, None, {}, quorum=1, deadline_s=10.0)
    first.offer(ModelUpdate("a", 1, 5, {"intercept": [0.0]}, (), (new,)), 0.0)
    published = first.close(strategy_named("fedavg"), now=1000.0)
    assert (dict(published.new_devices), dict(published.watchlist)) == ({new: 1}, {})
    second = first.next(published)
    second.offer(_update("a", 2), 0.0)
    later = second.close(strategy_named("fedavg"), now=1000.0 + 6 * 3600.0 + 1.0)
    assert dict(later.new_devices) == {}  # 6 hours after the report


def test_global_model_carries_the_watchlist() -> None:
    listed = {entity_key(KEY, "device", "d1"): 2}
    model = GlobalModel(3, "r3-x", "r2-y", ("a", "b"), "fedavg", 10,
                        {"intercept": np.array([0.5])}, listed)
    assert GlobalModel.from_wire(model.to_wire()).watchlist == listed
    bare = GlobalModel(3, "r3-x", "r2-y", ("a", "b"), "fedavg", 10,
                       {"intercept": np.array([0.5])})
    assert "watchlist" not in bare.to_wire()
    with pytest.raises(UpdateFormatError, match=r"^watchlist"):
        GlobalModel.from_wire({**model.to_wire(), "watchlist": {"v": 1, "listed": {"d1": 1}}})


def test_rounds_union_the_reports_and_carry_them_to_the_next_round() -> None:
    stolen = entity_key(KEY, "instrument", "stolen")
    device = entity_key(KEY, "device", "fraud-phone")
    first = Round(1, None, {}, quorum=2, deadline_s=10.0)
    first.offer(_update("a", 1, (stolen, device)), 0.0)
    first.offer(_update("b", 1, (stolen,)), 0.0)
    published = first.close(strategy_named("fedavg"), now=1000.0)
    assert published.watchlist == {stolen: 2, device: 1}
    second = first.next(published)
    second.offer(_update("c", 2), 0.0)
    assert second.close(strategy_named("fedavg"), now=2000.0).watchlist == published.watchlist
    third = second.next(second.close(strategy_named("fedavg"), now=2000.0))
    third.offer(_update("c", 3), 0.0)
    expired = third.close(strategy_named("fedavg"), now=1000.0 + 86400.0 + 1.0)
    assert expired.watchlist == {}  # a day after the last report


def test_a_sealed_key_at_rest_opens_for_a_year_not_after(federation: Federation) -> None:
    admin, r0 = federation.admin, federation.retailers[0]
    key = new_key()
    blob = seal_watch_key(key, admin.identity, r0.registry.current_kem_key(r0.identity.name),
                          1, now=1_000_000.0)
    later = 1_000_000.0 + 300 * 86400.0  # a worker restarted months after the admin sealed it
    assert open_watch_key(blob, r0.kem, r0.registry, InMemoryFreshness(), now=later) == key
    with pytest.raises(OutsideTimeWindow):
        open_watch_key(blob, r0.kem, r0.registry, InMemoryFreshness(),
                       now=1_000_000.0 + 401 * 86400.0)


def test_the_union_survives_a_restart_through_its_state_file(tmp_path: Path) -> None:
    path = tmp_path / "watch.json"
    assert WatchlistUnion.load(path).entries == {}  # no file yet: empty
    stolen = entity_key(KEY, "instrument", "stolen")
    device = entity_key(KEY, "device", "fraud-phone")
    union = WatchlistUnion(UnionLimits(max_per_report=1))
    union.add("a", [stolen, device], 10.0)
    union.add("b", [stolen], 20.0)
    union.save(path)
    again = WatchlistUnion.load(path)
    assert again.entries == union.entries and again.refused == 1
    assert again.published(30.0) == {stolen: 2}
    union.add("a", [stolen], 10.0)  # re-read updates after a crash add nothing new
    assert union.entries == again.entries
    for bad in ({"v": 2, "entries": {}}, {"v": 1, "entries": {"pi_1": {"a": 1.0}}},
                {"v": 1, "entries": {stolen: {"a": "now"}}}, {"v": 1, "entries": {stolen: {}}}):
        with pytest.raises(WatchFormatError):
            WatchlistUnion.from_state(bad)


def test_own_reports_survive_a_restart(tmp_path: Path) -> None:
    key_of = hasher(KEY)
    reporter = Reporter(key_of)
    reporter.report({"payment_instrument": "stolen", "device_id": None}, 5.0)
    keys = list(reporter.pending)
    reporter.sent(keys, 10.0)
    assert not reporter.pending and reporter.own == {keys[0]: 10.0}
    reporter.save_own(tmp_path / "own.json")
    restarted = Reporter(key_of)
    restarted.restore_own(json.loads((tmp_path / "own.json").read_text()))
    assert restarted.others({keys[0]: 2}, 20.0) == {keys[0]: 1}  # its own report taken off
    with pytest.raises(WatchFormatError):
        restarted.restore_own({"v": 1, "own": {"pi_1": 1.0}})
