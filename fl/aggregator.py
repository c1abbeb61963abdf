"""The aggregator: sealed updates from ``qsfraud.fl.updates`` in, signed global models out.

:class:`Round` is the pure part (which update is accepted, when a round closes, what it
publishes). :class:`Aggregator` is the Kafka loop around it:

- one consumer group on the one-partition updates topic: only the member that holds the
  partition aggregates (the leader); the others wait;
- a transactional producer (``transactional.id`` shared by every aggregator process, created
  by the leader when it is assigned the partition): a round's global model and the consumed
  offsets of its updates are committed in one Kafka transaction
  (``send_offsets_to_transaction``), so after kill -9 the updates of an unpublished round are
  read again and a published round's are not;
- on every partition assignment the new leader initialises that transactional id, which
  fences a former leader that is only paused (its next commit fails and it exits, code 3)
  and completes or aborts its open transaction; then it rebuilds the round state from the
  last committed global model (its round and version) and continues from there.

Refusals (each counted in :attr:`Aggregator.metrics` and logged with its reason):
``oversized``, ``unknown_sender``, ``unauthorized``, ``tampered``, ``replayed``,
``outside_window``, ``malformed``, ``not_finite``, ``layout``, ``stale_round`` (an older
round), ``late`` (the round that just closed), ``future_round``, ``duplicate``.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from fl.client import GlobalModel, open_update, read_global_unverified_round, sign_global
from fl.strategies import FedAvg, FedMedian, FedTrimmedAvg, Strategy
from fl.update import ModelUpdate, UpdateFormatError, Vectors
from fl.watchlist import NEW_DEVICE_LIMITS, WatchlistUnion
from fraud.topics import FL_GLOBAL, FL_UPDATES
from pqc.errors import (
    EnvelopeError,
    MalformedEnvelope,
    OutsideTimeWindow,
    Replay,
    TamperedEnvelope,
    UnauthorizedSender,
    UnknownSender,
    WrongPurpose,
    WrongRecipient,
)
from pqc.freshness import FileFreshness, FreshnessStore, InMemoryFreshness
from pqc.keys import KeyStore
from streams.topics import TopicSpec, ensure_topics

STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "fedavg": FedAvg,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
}
GLOBAL_KEY = b"global"


def strategy_named(name: str) -> Strategy:
    """The strategy for ``--strategy``; ValueError naming the choices."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}: choose {', '.join(STRATEGIES)}") from None


class Refused(Exception):
    """An update the aggregator will not use; ``reason`` is the metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def refusal_of(error: Exception) -> Refused:
    """The metric reason for an error from opening or parsing an update."""
    reasons: list[tuple[type[Exception], str]] = [
        (UnknownSender, "unknown_sender"), (UnauthorizedSender, "unauthorized"),
        (Replay, "replayed"), (OutsideTimeWindow, "outside_window"),
        (TamperedEnvelope, "tampered"), (WrongRecipient, "tampered"),
        (WrongPurpose, "malformed"), (MalformedEnvelope, "tampered"),
    ]
    for kind, reason in reasons:
        if isinstance(error, kind):
            return Refused(reason, str(error))
    if isinstance(error, UpdateFormatError) and "finite" in str(error):
        return Refused("not_finite", str(error))
    if isinstance(error, UpdateFormatError | EnvelopeError):
        return Refused("malformed", str(error))
    return Refused("malformed", repr(error))


def _aligned(current: Vectors, updates: Sequence[ModelUpdate]) -> tuple[Vectors, list[ModelUpdate]]:
    """Every update over the union of names: a name an update lacks (a feature its retailer
    never saw) takes the current global value, or the mean of the updates that have it."""
    names: dict[str, int] = {name: len(v) for name, v in current.items()}
    for update in updates:
        for name, values in update.vectors.items():
            names.setdefault(name, len(values))
    fill: Vectors = {}
    for name in names:
        if name in current:
            fill[name] = current[name]
        else:
            fill[name] = np.mean([u.vectors[name] for u in updates if name in u.vectors], axis=0)
    base = {name: np.array(fill[name]) for name in names}
    aligned = [
        ModelUpdate(u.participant, u.round, u.examples,
                    {name: u.vectors.get(name, fill[name]) for name in names})
        for u in updates
    ]
    return base, aligned


@dataclass
class Round:
    """One round in progress: what has been accepted, and when it may close."""

    number: int
    parent_version: str | None
    current: Vectors
    quorum: int
    deadline_s: float
    updates: dict[str, ModelUpdate] = field(default_factory=dict)
    opened_at: float | None = None
    watch: WatchlistUnion = field(default_factory=WatchlistUnion)
    """The union of the retailers' watchlist reports, carried from round to round."""
    watch_new: WatchlistUnion = field(
        default_factory=lambda: WatchlistUnion(NEW_DEVICE_LIMITS))
    """The union of the retailers' new-device reports (listed a few hours), likewise."""

    def offer(self, update: ModelUpdate, now: float) -> None:
        """Accept ``update`` into this round or raise :class:`Refused`."""
        if update.round < self.number - 1:
            raise Refused("stale_round", f"{update.participant} sent round {update.round}, "
                                         f"this is round {self.number}")
        if update.round == self.number - 1:
            raise Refused("late", f"{update.participant}'s update for round {update.round} "
                                  "came after it closed")
        if update.round > self.number:
            raise Refused("future_round", f"{update.participant} sent round {update.round}, "
                                          f"this is round {self.number}")
        if update.participant in self.updates:
            raise Refused("duplicate", f"second update from {update.participant} in round "
                                       f"{self.number}")
        for name, values in update.vectors.items():
            known = self.current.get(name)
            if known is None:
                known = next((u.vectors[name] for u in self.updates.values()
                              if name in u.vectors), None)
            if known is not None and len(known) != len(values):
                raise Refused("layout", f"{update.participant}.{name} has {len(values)} values, "
                                        f"the round has {len(known)}")
        self.updates[update.participant] = update
        if self.opened_at is None:
            self.opened_at = now

    def ready(self, now: float) -> bool:
        """Quorum reached, or the deadline passed with at least one update."""
        if len(self.updates) >= self.quorum:
            return True
        return self.opened_at is not None and now - self.opened_at >= self.deadline_s

    def close(self, strategy: Strategy, now: float | None = None) -> GlobalModel:
        """The global model this round publishes, with the watchlist as of ``now`` (wall
        clock by default)."""
        ordered = sorted(self.updates.values(), key=lambda u: u.participant)
        now = time.time() if now is None else now
        for update in ordered:
            if update.watch:
                self.watch.add(update.participant, update.watch, now)
            if update.watch_new:
                self.watch_new.add(update.participant, update.watch_new, now)
        current, aligned = _aligned(self.current, ordered)
        result = strategy.aggregate(self.number, current, aligned)
        return GlobalModel(
            round=self.number,
            version=f"r{self.number}-{uuid.uuid4().hex[:12]}",
            parent_version=self.parent_version,
            contributors=tuple(u.participant for u in ordered),
            strategy=strategy.name,
            examples=sum(u.examples for u in ordered),
            parameters=result.parameters,
            watchlist=self.watch.published(now),
            new_devices=self.watch_new.published(now),
        )

    def next(self, published: GlobalModel) -> Round:
        return Round(published.round + 1, published.version, published.parameters,
                     self.quorum, self.deadline_s, watch=self.watch,
                     watch_new=self.watch_new)


class RoundFreshness:
    """Sequence numbers accepted in the open round, kept apart until it is published.

    A restart reads the unpublished round's updates again: they must not look like replays
    then, so ``durable`` learns them only in :meth:`persist` (after the publication).
    """

    def __init__(self, durable: FreshnessStore) -> None:
        self.durable = durable
        self._pending: dict[tuple[str, str], int] = {}

    def last_sequence(self, sender: str, purpose: str) -> int | None:
        pending = self._pending.get((sender, purpose))
        return pending if pending is not None else self.durable.last_sequence(sender, purpose)

    def advance(self, sender: str, purpose: str, sequence: int) -> None:
        last = self.last_sequence(sender, purpose)
        if last is not None and sequence <= last:
            raise Replay(f"sequence {sequence} from {sender} ({purpose}) is not after {last}: "
                         "replay")
        self._pending[(sender, purpose)] = sequence

    def persist(self) -> None:
        for (sender, purpose), sequence in sorted(self._pending.items()):
            self.durable.advance(sender, purpose, sequence)
        self._pending.clear()

    def discard(self) -> None:
        self._pending.clear()


@dataclass
class AggregatorSettings:
    bootstrap: str
    quorum: int = 3
    deadline_s: float = 30.0
    strategy: str = "fedavg"
    max_update_bytes: int = 1 << 20
    updates_topic: str = FL_UPDATES
    global_topic: str = FL_GLOBAL
    group_id: str = "qsfraud-aggregator"
    transactional_id: str = "qsfraud-aggregator"
    session_timeout_ms: int = 10_000
    metrics_interval_s: float = 10.0
    freshness_path: str | None = None
    watchlist_path: str | None = None
    """Where the watchlist union is kept across restarts (None: in memory only)."""


def new_devices_path(watchlist_path: str) -> str:
    """Where the union of new-device reports is kept, beside the watchlist's state file."""
    return watchlist_path + ".new-devices"


class Aggregator:
    """The Kafka loop: see the module docstring."""

    def __init__(self, settings: AggregatorSettings, keys: KeyStore,
                 log: TextIO = sys.stderr) -> None:
        self.settings = settings
        self.keys = keys
        self.strategy = strategy_named(settings.strategy)
        self.log = log
        self.metrics: Counter[str] = Counter()
        durable = (FileFreshness(settings.freshness_path) if settings.freshness_path
                   else InMemoryFreshness())
        self._freshness = RoundFreshness(durable)
        self._watch = WatchlistUnion()
        self._watch_new = WatchlistUnion(NEW_DEVICE_LIMITS)
        self._round: Round | None = None
        self._stopping = False
        self._last_metrics = time.monotonic()

    # -- logging ---------------------------------------------------------------------------
    def _emit(self, event: Mapping[str, Any]) -> None:
        print(json.dumps(event, separators=(",", ":"), sort_keys=True), file=self.log,
              flush=True)

    def metrics_line(self) -> dict[str, Any]:
        refused = {k[len("refused."):]: v for k, v in self.metrics.items()
                   if k.startswith("refused.")}
        return {"metric": "aggregator", "round": self._round.number if self._round else None,
                "accepted": self.metrics["accepted"], "published": self.metrics["published"],
                "refused": refused}

    # -- state -----------------------------------------------------------------------------
    def _last_global(self) -> GlobalModel | None:
        """The last committed global model on the global topic (read_committed)."""
        s = self.settings
        consumer = Consumer({"bootstrap.servers": s.bootstrap, "group.id": f"{s.group_id}-state",
                             "enable.auto.commit": False, "enable.partition.eof": True,
                             "isolation.level": "read_committed"})
        last: GlobalModel | None = None
        try:
            consumer.assign([TopicPartition(s.global_topic, 0, OFFSET_BEGINNING)])
            while True:
                msg = consumer.poll(10.0)
                if msg is None:
                    raise TimeoutError(f"reading {s.global_topic} timed out")
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        break
                    raise KafkaException(err)
                value = msg.value()
                if value:
                    last = GlobalModel.from_wire(read_global_unverified_round(value))
        finally:
            consumer.close()
        return last

    def _restore(self) -> None:
        last = self._last_global()
        s = self.settings
        if s.watchlist_path:
            # saved before each publication's commit: re-read updates add their reports
            # again, which changes nothing (a report is a time per retailer and key)
            self._watch = WatchlistUnion.load(s.watchlist_path, self._watch.limits)
            self._watch_new = WatchlistUnion.load(new_devices_path(s.watchlist_path),
                                                  NEW_DEVICE_LIMITS)
        if last is None:
            self._round = Round(1, None, {}, s.quorum, s.deadline_s, watch=self._watch,
                                watch_new=self._watch_new)
        else:
            self._round = Round(last.round + 1, last.version, last.parameters, s.quorum,
                                s.deadline_s, watch=self._watch, watch_new=self._watch_new)
        self._freshness.discard()
        self._emit({"event": "leader", "round": self._round.number,
                    "parent_version": self._round.parent_version})

    # -- the loop --------------------------------------------------------------------------
    def offer(self, blob: bytes | None, now: float) -> None:
        """Open one record and offer it to the round (refusals are counted and logged)."""
        assert self._round is not None
        try:
            if blob is None or len(blob) > self.settings.max_update_bytes:
                raise Refused("oversized", f"{len(blob or b'')} bytes, at most "
                                           f"{self.settings.max_update_bytes}")
            try:
                update = open_update(blob, self.keys.kem, self.keys.registry, self._freshness)
            except (EnvelopeError, UpdateFormatError, ValueError) as exc:
                raise refusal_of(exc) from None
            self._round.offer(update, now)
        except Refused as refusal:
            self.metrics[f"refused.{refusal.reason}"] += 1
            self._emit({"event": "refused", "reason": refusal.reason, "detail": refusal.detail,
                        "round": self._round.number})
            return
        self.metrics["accepted"] += 1
        self._emit({"event": "accepted", "participant": update.participant,
                    "round": update.round, "examples": update.examples})

    def _publish(self, producer: Producer, consumer: Consumer) -> None:
        assert self._round is not None
        published = self._round.close(self.strategy)
        if self.settings.watchlist_path:
            self._round.watch.save(self.settings.watchlist_path)
            self._round.watch_new.save(new_devices_path(self.settings.watchlist_path))
        seq = time.time_ns()  # increases across restarts without any state
        blob = sign_global(published, self.keys.identity, seq)
        producer.begin_transaction()
        producer.produce(self.settings.global_topic, key=GLOBAL_KEY, value=blob)
        producer.send_offsets_to_transaction(consumer.position(consumer.assignment()),
                                             consumer.consumer_group_metadata())
        producer.commit_transaction()
        self._freshness.persist()
        self.metrics["published"] += 1
        self._emit({"event": "published", "round": published.round,
                    "version": published.version, "parent_version": published.parent_version,
                    "contributors": list(published.contributors),
                    "strategy": published.strategy, "examples": published.examples,
                    "watchlist": len(published.watchlist),
                    "new_devices": len(published.new_devices)})
        self._round = self._round.next(published)

    def stop(self) -> None:
        self._stopping = True

    def run(self, rounds: int | None = None) -> int:
        """Aggregate until :meth:`stop` (or ``rounds`` rounds published); 0 on a clean stop."""
        s = self.settings
        ensure_topics(s.bootstrap, [TopicSpec(s.updates_topic, 1, {}),
                                    TopicSpec(s.global_topic, 1, {"cleanup.policy": "compact"})])
        consumer = Consumer({"bootstrap.servers": s.bootstrap, "group.id": s.group_id,
                             "enable.auto.commit": False, "auto.offset.reset": "earliest",
                             "isolation.level": "read_committed",
                             "session.timeout.ms": s.session_timeout_ms,
                             "heartbeat.interval.ms": max(s.session_timeout_ms // 5, 100)})
        producer: Producer | None = None

        def on_assign(c: Consumer, partitions: list[TopicPartition]) -> None:
            nonlocal producer
            if not partitions:
                return
            # Only the leader holds the transactional id: initialising it fences a paused or
            # partitioned former leader and waits until its open transaction is finished, so
            # the last global read next is final.
            producer = Producer({"bootstrap.servers": s.bootstrap,
                                 "transactional.id": s.transactional_id})
            producer.init_transactions(30)
            self._restore()

        def on_revoke(c: Consumer, partitions: list[TopicPartition]) -> None:
            nonlocal producer
            producer = None
            self._round = None
            self._emit({"event": "revoked"})

        consumer.subscribe([s.updates_topic], on_assign=on_assign, on_revoke=on_revoke)
        published_here = 0
        self._emit({"event": "started", "group": s.group_id})
        try:
            while not self._stopping:
                msg = consumer.poll(0.2)
                now = time.monotonic()
                if msg is not None:
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            self._emit({"event": "kafka_error", "error": str(err)})
                    elif self._round is not None:
                        self.offer(msg.value(), now)
                if producer is not None and self._round is not None and self._round.ready(now):
                    self._publish(producer, consumer)
                    published_here += 1
                    self._emit(self.metrics_line())
                    if rounds is not None and published_here >= rounds:
                        break
                if now - self._last_metrics >= s.metrics_interval_s:
                    self._last_metrics = now
                    self._emit(self.metrics_line())
        except KafkaException as exc:
            error = exc.args[0]
            self._emit({"event": "fenced" if error.code() in (
                KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
                KafkaError.INVALID_PRODUCER_EPOCH) else "kafka_error", "error": str(error)})
            return 3
        finally:
            self._emit(self.metrics_line())
            consumer.close()
        return 0
