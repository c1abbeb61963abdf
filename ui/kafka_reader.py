"""One background consumer per UI process: every retailer's decisions, transactions and labels,
and the shared config, rejection and federated topics, into a :class:`~ui.store.Store`.

It assigns partitions itself (no consumer group: the UI reads, it commits nothing), starts the
busy topics near their end (``tail`` records per partition: the store is capped anyway) and the
label and shared topics at the beginning (past verdicts and the config history). Retailers are
found in the broker's topic list, by the names of :mod:`fraud.topics`, every few seconds. When
Kafka is unreachable the status says so; librdkafka reconnects by itself and reading resumes
where it stopped. Verdicts go out through :class:`VerdictPublisher`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)

from fraud import topics
from fraud.schema import Decision, Label, SchemaError
from fraud.topics import RetailerTopics
from ui.store import KafkaStatus, Store, TopicRecord

log = logging.getLogger(__name__)
rdkafka_log = logging.getLogger(f"{__name__}.librdkafka")
"""librdkafka's own lines; quiet, since the status banner says when Kafka is unreachable."""
rdkafka_log.setLevel(logging.CRITICAL)

SHARED: Final = (topics.CONFIG, topics.CONFIG_REJECTED, topics.FL_GLOBAL)
DISCOVER_EVERY_S: Final = 3.0


def retailer_of(topic: str) -> str | None:
    """The retailer whose ``<R>.decisions`` topic this is, by the registry's naming.

    >>> retailer_of("acme.decisions"), retailer_of("acme.labels"), retailer_of("x.y")
    ('acme', None, None)
    """
    retailer = topic.rpartition(".")[0]
    return retailer if retailer and RetailerTopics(retailer).decisions == topic else None


@dataclass(frozen=True)
class ReaderSettings:
    bootstrap: str
    retailers: tuple[str, ...] = ()
    """Only these retailers; empty: every retailer with a decisions topic."""
    tail: int = 2_000
    """Past records read per partition of a decisions or transactions topic at start."""


def _text(exc: Exception) -> str:
    """A Kafka error as a sentence, without the ``KafkaError{code=...}`` wrapping."""
    first = exc.args[0] if exc.args else None
    return first.str() if isinstance(first, KafkaError) else str(exc)


class KafkaReader:
    """The reader thread; ``start``/``stop``. Never raises into the app: errors become status."""

    def __init__(self, settings: ReaderSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ui-kafka-reader", daemon=True)
        self._assigned: set[tuple[str, int]] = set()
        self._retailers: set[str] = set()
        self._labels_pending: dict[tuple[str, int], int] = {}
        self._transport_error = ""
        self._discovered = False

    def start(self) -> KafkaReader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _error(self, err: KafkaError) -> None:
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT,
                          KafkaError._RESOLVE):
            self._transport_error = err.str()

    def _run(self) -> None:
        # The transaction parser's module imports the models (River, scipy): 3-7 s on a busy
        # 2-core machine. Paid here, at start, not when the first transaction arrives, where it
        # held the first decision back from the feed for as long.
        import streams.scoring  # noqa: F401

        consumer = Consumer({
            "bootstrap.servers": self.settings.bootstrap, "group.id": "qsfraud-ui",
            "enable.auto.commit": False, "isolation.level": "read_committed",
            "error_cb": self._error, "reconnect.backoff.max.ms": 2000,
            "socket.connection.setup.timeout.ms": 3000, "logger": rdkafka_log,
        })
        next_discovery = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_discovery:
                    next_discovery = now + DISCOVER_EVERY_S
                    self._discover(consumer)
                if not self._assigned:
                    self._stop.wait(0.5)
                    continue
                for msg in consumer.consume(500, 0.2):
                    self._dispatch(msg)
                self._check_labels_loaded(consumer)
        except Exception as exc:  # keep the app up; the status shows what happened
            log.exception("UI Kafka reader stopped")
            self.store.set_status(KafkaStatus(False, f"reader stopped: {exc}"))
        finally:
            consumer.close()

    def _discover(self, consumer: Consumer) -> None:
        try:
            metadata = consumer.list_topics(timeout=3)
        except Exception as exc:  # KafkaException: unreachable, timed out
            self._unreachable(self._transport_error or _text(exc))
            return
        self._transport_error = ""
        wanted = set(self.settings.retailers)
        for name in metadata.topics:
            retailer = retailer_of(name)
            if retailer and (not wanted or retailer in wanted):
                self._retailers.add(retailer)
        names = set(SHARED)
        for retailer in self._retailers:
            t = RetailerTopics(retailer)
            names |= {t.decisions, t.transactions, t.labels}
        new = []
        for name in sorted(names):
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None:
                continue
            for partition in topic.partitions:
                if (name, partition) not in self._assigned:
                    new.append((name, partition))
        try:
            assignments = [self._start_at(consumer, name, p) for name, p in new]
        except Exception as exc:
            self._unreachable(_text(exc))
            return
        if assignments:
            consumer.incremental_assign(assignments)
            self._assigned.update(new)
        self._discovered = True
        self._status(True, "")

    def _start_at(self, consumer: Consumer, name: str, partition: int) -> TopicPartition:
        low, high = consumer.get_watermark_offsets(TopicPartition(name, partition), timeout=3)
        if name.endswith(".labels"):
            if high > low:
                self._labels_pending[(name, partition)] = high
            return TopicPartition(name, partition, OFFSET_BEGINNING)
        if name in SHARED:
            return TopicPartition(name, partition, OFFSET_BEGINNING)
        # decisions lag their transactions: read further back so the oldest ones find theirs
        tail = self.settings.tail * (2 if name.endswith(".transactions") else 1)
        return TopicPartition(name, partition, max(low, high - tail))

    def _check_labels_loaded(self, consumer: Consumer) -> None:
        if not self._labels_pending:
            if not self.store.status.labels_loaded and self.store.status.reachable:
                self._status(True, "")
            return
        positions = consumer.position([TopicPartition(t, p) for t, p in self._labels_pending])
        for tp in positions:
            if tp.offset >= self._labels_pending[(tp.topic, tp.partition)]:
                del self._labels_pending[(tp.topic, tp.partition)]

    def _status(self, reachable: bool, error: str) -> None:
        old = self.store.status
        since = old.since if old.reachable == reachable else time.time()
        loaded = self._discovered and not self._labels_pending
        self.store.set_status(KafkaStatus(reachable, error, since, tuple(sorted(self._retailers)),
                                          loaded))

    def _unreachable(self, error: str) -> None:
        self._status(False, error)

    def _dispatch(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("UI reader: %s", err)
            return
        name = msg.topic() or ""
        value = msg.value()
        if name in SHARED:
            ts = msg.timestamp()[1] / 1000.0 if msg.timestamp()[1] > 0 else time.time()
            self.store.add_record(TopicRecord(name, msg.offset() or 0, msg.key(), value, ts))
            return
        if value is None:
            return
        try:
            if name.endswith(".decisions"):
                key = msg.key()
                self.store.add_decision(Decision.from_json(value),
                                        key.decode("utf-8", "replace") if key else None)
            elif name.endswith(".labels"):
                self.store.add_label(Label.from_json(value))
            elif name.endswith(".transactions"):
                self._add_transaction(value)
        except (SchemaError, ValueError) as exc:  # not ours to fix: the workers' DLQ has it
            log.debug("UI reader skipped a record of %s: %s", name, exc)

    def _add_transaction(self, value: bytes) -> None:
        from streams.scoring import BadRecord, parse_transaction

        try:
            parsed = parse_transaction(value)
        except BadRecord:
            return
        if parsed.op == "d":
            return
        fields = parsed.tx.to_dict()
        for key in ("v", "kind"):
            fields.pop(key, None)
        if parsed.committed_at is not None:
            fields["committed_at"] = parsed.committed_at
        self.store.add_transaction(parsed.tx.tx_id, fields)


class VerdictPublisher:
    """Publishes an analyst's verdict as a :class:`~fraud.schema.Label` on ``<R>.labels``,
    keyed by the transaction's customer id, at most once per transaction per process (the
    store's claim) and never over a label already read back from Kafka."""

    def __init__(self, bootstrap: str, store: Store,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                                   "message.timeout.ms": 30_000, "linger.ms": 0,
                                   "logger": rdkafka_log})

    def publish(self, retailer: str, tx_id: str, customer_id: str | None,
                is_fraud: bool) -> str:
        """``sent``, ``sending`` (Kafka has not answered yet) or ``already`` (not sent)."""
        if not self.store.claim_verdict(tx_id, is_fraud):
            return "already"
        label = Label(tx_id=tx_id, is_fraud=is_fraud, source="analyst",
                      labelled_at=self.clock(), retailer_id=retailer)

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            self.store.settle_verdict(tx_id, err.str() if err is not None else None)

        self._producer.produce(RetailerTopics(retailer).labels, value=label.to_json(),
                               key=customer_id.encode() if customer_id else None,
                               on_delivery=delivered)
        self._producer.flush(5)
        held = self.store.verdict(tx_id)
        return held.state if held is not None else "sending"

    def poll(self) -> None:
        """Serve late delivery reports (a verdict sent while Kafka was away)."""
        self._producer.poll(0)


def publish_config(bootstrap: str, topic: str, scope: str, blob: bytes,
                   timeout: float = 10.0) -> None:
    """Publish one signed config blob keyed by its scope; raises if Kafka did not take it."""
    producer = Producer({"bootstrap.servers": bootstrap, "logger": rdkafka_log,
                         "message.timeout.ms": int(timeout * 1000)})
    errors: list[str] = []
    producer.produce(topic, key=scope.encode(), value=blob,
                     on_delivery=lambda err, _m: errors.append(err.str()) if err else None)
    if producer.flush(timeout + 1) or errors:
        raise RuntimeError(errors[0] if errors else f"Kafka did not acknowledge {topic}")


def decode_json(value: bytes | None) -> Any:
    """A JSON record's value, or None when it is not JSON (e.g. a signed binary envelope)."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
