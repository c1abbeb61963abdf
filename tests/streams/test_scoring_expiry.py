"""Bounded state: entity state and ``scored`` entries expire by event time, with tombstones,
also after a restore from the changelogs (whose order is not the order of event times)."""

from __future__ import annotations

import json
import math
import random
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fraud.schema import InputBounds
from streams.scoring import (
    CLOCK_MAX_AHEAD_S,
    EncodedStore,
    InputRecord,
    ScoredStore,
    ScoringPipeline,
    TrackedStore,
)
from streams.settings import WorkerSettings

DAY = 86400.0
HORIZON = 8 * DAY
T0 = 1_767_225_600.0  # 2026-01-01, long before the wall clock of any run


def tx(i: int, at: float, customer: str | None = None, **extra: Any) -> dict:
    return {"tx_id": f"t{i}", "retailer_id": "acme", "amount": 10.0 + i,
            "customer_id": customer or f"c{i}", "payment_instrument": f"p{i}",
            "device_id": f"d{i}", "ip": f"10.0.0.{i % 250}", "occurred_at": at, **extra}


def record(value: dict, partition: int = 0) -> InputRecord:
    return InputRecord(json.dumps(value).encode(), None, partition, 0, None, "acme.transactions")


def pipeline(bucket_s: float = HORIZON / 32) -> ScoringPipeline:
    return ScoringPipeline("acme", features=EncodedStore(bucket_s=bucket_s),
                           scored=ScoredStore(bucket_s=bucket_s))


def changelog(pipe: ScoringPipeline) -> dict[str, list[tuple[int, bytes, bytes | None]]]:
    """What the worker would write to the two changelogs now."""
    return {"features": pipe.features.drain_encoded(), "scored": pipe.scored.drain_encoded()}


def restored(records: dict[str, list[tuple[int, bytes, bytes | None]]],
             bucket_s: float = HORIZON / 32) -> ScoringPipeline:
    """A pipeline whose stores are rebuilt from changelog records as faust's memory store
    does (in log order, a tombstone deletes), its index marked for rebuilding."""
    pipe = pipeline(bucket_s)
    for name, store in (("features", pipe.features), ("scored", pipe.scored)):
        for partition, raw_key, raw_value in records[name]:
            key = json.loads(raw_key)
            if raw_value is None:
                store.data.pop(key, None)
                store.key_partition.pop(key, None)
                continue
            store.data[key] = raw_value
            store.key_partition[key] = partition
    pipe.reindex_pending = True
    return pipe


def test_expiry_counts_event_time_not_wall_time():
    pipe = pipeline()
    pipe.process_batch([record(tx(i, T0 + i * 3600.0)) for i in range(24)])
    # months of wall time have passed since T0, one day of event time: nothing goes
    assert pipe.expire(HORIZON) == (0, 0)
    assert len(pipe.scored) == 24 and len(pipe.features) == 4 * 24
    pipe.process_batch([record(tx(100, T0 + 9 * DAY))])
    gone_features, gone_scored = pipe.expire(HORIZON)
    # what is 8 days behind the clock (all 24 here), to within one bucket (6 h)
    assert 18 <= gone_scored <= 24 and gone_features == 4 * gone_scored
    assert "t0" not in pipe.scored.data and "t100" in pipe.scored.data
    pipe.process_batch([record(tx(101, T0 + 9 * DAY + 6 * 3600))])
    pipe.expire(HORIZON)
    assert sorted(pipe.scored.data) == ["t100", "t101"] and len(pipe.features) == 8


def test_an_entity_seen_again_lives_on_and_expired_keys_get_tombstones_where_they_live():
    pipe = pipeline()
    pipe.process_batch([record(tx(1, T0, customer="old"), partition=1),
                        record(tx(2, T0, customer="busy"), partition=2)])
    pipe.process_batch([record(tx(3, T0 + 5 * DAY, customer="busy"), partition=3)])
    changelog(pipe)
    pipe.process_batch([record(tx(4, T0 + 9 * DAY, customer="new"), partition=0)])
    changelog(pipe)
    pipe.expire(HORIZON)
    written = changelog(pipe)
    tombstones = {(p, json.loads(k)) for p, k, v in written["features"] if v is None}
    assert (1, "c:old") in tombstones and (1, "d:d1") in tombstones
    # "busy" was written last on partition 3 (its changelog record lives there): it stays
    assert "c:busy" in pipe.features.data and all("busy" not in k for _, k in tombstones)
    assert {(p, json.loads(k)) for p, k, v in written["scored"] if v is None} == {
        (1, "t1"), (2, "t2")}
    assert all(v is None for _, _, v in written["features"] + written["scored"])


def test_after_a_restore_expiry_takes_age_from_the_values_not_the_changelog_order():
    rng = random.Random(7)
    times = [T0 + rng.uniform(0, 10 * DAY) for _ in range(300)]
    original = pipeline()
    # out of event-time order, as several partitions interleave in a changelog
    for i, at in enumerate(times):
        original.process_batch([record(tx(i, at, customer=f"c{i % 120}"), partition=i % 4)])
    records = changelog(original)
    records = {name: list(reversed(recs)) if name == "scored" else recs
               for name, recs in records.items()}  # insertion order says nothing of age
    copy = restored(records)
    assert set(copy.features.data) == set(original.features.data)
    later = T0 + 12 * DAY
    for pipe in (original, copy):
        pipe.process_batch([record(tx(999, later, customer="late"))])
        pipe.expire(HORIZON)
    assert copy.clock == original.clock == later
    assert set(copy.features.data) == set(original.features.data)
    assert set(copy.scored.data) == set(original.scored.data)
    cutoff = later - HORIZON
    bucket = HORIZON / 32
    for i, at in enumerate(times):
        if at <= cutoff - bucket:
            assert f"t{i}" not in copy.scored.data
        elif at > cutoff:
            assert f"t{i}" in copy.scored.data
    for key in copy.features.data:
        assert copy.features.get(key)["last"] > cutoff - bucket, key


def test_a_restore_brings_the_clock_up_to_the_newest_state():
    original = pipeline()
    original.process_batch([record(tx(1, T0)), record(tx(2, T0 + 9 * DAY))])
    copy = restored(changelog(original))
    assert copy.clock is None
    assert copy.expire(HORIZON) == (4, 1)  # reindexed first: the clock is T0 + 9 days
    assert copy.clock == T0 + 9 * DAY and list(copy.scored.data) == ["t2"]


def test_scored_entries_of_unknown_age_expire_one_horizon_after_the_restore():
    original = pipeline()
    original.process_batch([record(tx(1, T0))])
    records = changelog(original)
    records["scored"].append((0, b'"legacy"', b'{"d":{},"x":[],"at":5.0,"l":0,"p":0}'))
    copy = restored(records)
    copy.expire(HORIZON)
    assert "legacy" in copy.scored.data  # dated to the clock (T0) now
    copy.process_batch([record(tx(2, T0 + 4 * DAY))])
    copy.expire(HORIZON)
    assert "legacy" in copy.scored.data
    copy.process_batch([record(tx(3, T0 + 9 * DAY))])
    copy.expire(HORIZON)
    assert "legacy" not in copy.scored.data and "t1" not in copy.scored.data


def test_labels_learn_from_entries_within_the_horizon_and_a_learned_entry_keeps_its_age():
    pipe = pipeline()
    pipe.process_batch([record(tx(1, T0)), record(tx(2, T0 + 2 * DAY))])
    label = InputRecord(b'{"tx_id": "t1", "is_fraud": true, "source": "chargeback", '
                        b'"labelled_at": ' + str(T0 + 3 * DAY).encode() + b'}', None, 0, 0, None,
                        "acme.labels")
    assert pipe.learn_batch([label]).learned == 1
    pipe.process_batch([record(tx(3, T0 + 9 * DAY))])
    pipe.expire(HORIZON)
    # relearning wrote t1 again at the clock of then, yet it goes by its own occurred_at
    assert sorted(pipe.scored.data) == ["t2", "t3"]
    assert pipe.learn_batch([label]).unknown == 1


def test_one_transaction_dated_far_ahead_does_not_expire_everything():
    pipe = pipeline()
    far = record(tx(2, 4e9))  # the year 2096
    assert [json.loads(d.value)["reason"] for d in pipe.process_batch([far]).dead_letters] == [
        "out-of-range"]  # the input bounds refuse it first; below, bounds that let it in
    pipe = pipeline()
    pipe.bounds = InputBounds(max_future_s=math.inf)
    pipe.process_batch([record(tx(1, T0))])
    pipe.process_batch([far])
    assert pipe.clock is not None and pipe.clock <= time.time() + CLOCK_MAX_AHEAD_S
    now_ish = time.time()
    pipe.expire(HORIZON)
    assert "t2" in pipe.scored.data
    assert pipe.clock <= now_ish + CLOCK_MAX_AHEAD_S + 1


def test_the_size_cap_drops_the_oldest_by_event_time():
    pipe = pipeline()
    times = [T0 + DAY * k / 10 for k in (5, 1, 9, 3, 7)]
    pipe.process_batch([record(tx(i, at)) for i, at in enumerate(times)])
    pipe.expire(HORIZON, max_scored=3)
    kept = sorted(pipe.scored.data, key=lambda k: times[int(k[1:])])
    assert [times[int(k[1:])] for k in kept] == sorted(times)[2:]


@settings(max_examples=60, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, 30), st.floats(0, 50)), max_size=80),
       restore_at=st.integers(0, 80), clock=st.floats(0, 80), horizon=st.floats(1, 30))
def test_expire_removes_exactly_what_is_older_than_the_horizon_to_within_a_bucket(
        writes: list[tuple[int, float]], restore_at: int, clock: float, horizon: float):
    bucket = 2.0
    store = TrackedStore(bucket_s=bucket)
    last: dict[str, float] = {}
    for n, (k, t) in enumerate(writes):
        if n == restore_at:  # a restore: same values, the index rebuilt from them
            store = TrackedStore(dict(store.data), dict(store.key_partition), bucket_s=bucket)
            store.reindex()
        key = f"k{k}"
        t = max(t, last.get(key, t))  # as the feature extractor keeps "last"
        store.at(writes[n][1])
        store[key] = {"last": t}
        last[key] = t
    cutoff = clock - horizon
    store.expire(cutoff, clock)
    for key, t in last.items():
        if t <= cutoff - bucket:
            assert key not in store.data
        elif t > cutoff:
            assert key in store.data


@pytest.mark.parametrize("horizon, ttl", [(DAY, DAY / 2), (3 * DAY, 3 * DAY), (5 * DAY, 7 * DAY)])
def test_a_horizon_not_longer_than_the_longest_window_and_the_label_delay_is_refused(
        horizon: float, ttl: float):
    with pytest.raises(ValueError, match=r"state horizon .* must be longer than the longest "
                                         r"feature window .* and the label delay"):
        WorkerSettings("acme", "x", state_horizon_s=horizon, scored_ttl_s=ttl)
    assert WorkerSettings("acme", "x", state_horizon_s=horizon + ttl + DAY,
                          scored_ttl_s=ttl).state_horizon_s == horizon + ttl + DAY


def test_a_limited_expiry_takes_the_rest_in_the_next_calls():
    store = TrackedStore(bucket_s=10.0)
    store.at(1.0)
    for i in range(25):
        store[f"k{i}"] = {"last": 1.0}
    store.at(15.0)
    for i in range(25, 30):
        store[f"k{i}"] = {"last": 15.0}
    assert [store.expire(cutoff=12.0, now=30.0, limit=10) for _ in range(4)] == [10, 10, 5, 0]
    assert sorted(store.data) == [f"k{i}" for i in range(25, 30)]
    store.at(40.0)
    for i in range(30, 40):
        store[f"k{i}"] = {"last": 40.0}
    # the size cap: oldest first, at most `limit` a call
    assert store.expire(cutoff=0.0, now=40.0, max_entries=6, limit=4) == 4
    assert store.expire(cutoff=0.0, now=40.0, max_entries=6, limit=4) == 4
    assert store.expire(cutoff=0.0, now=40.0, max_entries=6, limit=4) == 1
    assert sorted(store.data) == [f"k{i}" for i in range(34, 40)]
