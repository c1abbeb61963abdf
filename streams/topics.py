"""Topic creation with final partition counts, and reading a whole (compacted) topic.

Every topic a worker touches is created up front (names from :mod:`fraud.topics`), so
nothing is auto-created with a default partition count: the retailer's data topics and the
tables' changelogs share one partition count (faust co-partitions them), the config and
checkpoint topics are compacted. :func:`settle_partitions` picks that count: the one
``<R>.transactions`` already has (the CDC may have created it), else the configured one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams.settings import FEATURES_TABLE, SCORED_TABLE, WorkerSettings

log = logging.getLogger(__name__)

COMPACTED = {"cleanup.policy": "compact"}

_T = TypeVar("_T")


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def worker_topics(settings: WorkerSettings) -> list[TopicSpec]:
    """Every topic of one retailer's workers, with its partition count and config.

    >>> [t.name for t in worker_topics(WorkerSettings("acme", "x"))][:3]
    ['acme.transactions', 'acme.labels', 'acme.decisions']
    """
    n = settings.partitions
    return [
        TopicSpec(settings.transactions_topic, n, {}),
        TopicSpec(settings.labels_topic, n, {}),
        TopicSpec(settings.decisions_topic, n, {}),
        TopicSpec(settings.topics.entity_requests, n, {}),
        TopicSpec(settings.topics.entity_fragments, n, {}),
        TopicSpec(settings.dlq_topic, 1, {}),
        TopicSpec(settings.changelog_topic(FEATURES_TABLE), n, COMPACTED),
        TopicSpec(settings.changelog_topic(SCORED_TABLE), n, COMPACTED),
        TopicSpec(settings.checkpoints_topic, 1, COMPACTED),
        TopicSpec(settings.config_topic, 1, COMPACTED),
        TopicSpec(settings.config_rejected_topic, 1, {}),
        TopicSpec(f"{settings.app_id}-__assignor-__leader", 1, {}),
    ]


class PartitionMismatch(RuntimeError):
    """A retailer's topics exist with partition counts the worker cannot work with."""


def _partition_counts(admin: AdminClient, timeout: float) -> dict[str, int]:
    return {name: len(meta.partitions)
            for name, meta in admin.list_topics(timeout=timeout).topics.items()
            if meta.error is None}


def settle_partitions(settings: WorkerSettings, timeout: float = 30.0) -> WorkerSettings:
    """``settings`` with the partition count its topics must have.

    If ``<R>.transactions`` exists (the CDC creates it when it starts first) with another
    count than ``settings.partitions``, a worker with ``adapt_partitions`` takes that count
    for all its partitioned topics (changelogs included); otherwise, or if another of its
    topics already has a different count, :class:`PartitionMismatch` says which, both
    counts and the fix, in one line.
    """
    existing = _partition_counts(AdminClient({"bootstrap.servers": settings.bootstrap}),
                                 timeout)
    inputs, wanted = settings.transactions_topic, settings.partitions
    have = existing.get(inputs)
    if have is not None and have != wanted:
        if not settings.adapt_partitions:
            raise PartitionMismatch(
                f"topic {inputs} has {have} partitions, the worker was asked for {wanted} "
                f"(--partitions): start it with --partitions {have} or without --partitions "
                f"(it then takes the existing count), or delete {inputs} and its workers' "
                f"topics to start over with {wanted}")
        log.info("%s has %d partitions: the worker uses %d (not %d)", inputs, have, have,
                 wanted)
        settings = replace(settings, partitions=have)
    for spec in worker_topics(settings):
        count = existing.get(spec.name)
        if count is not None and count != spec.partitions:
            raise PartitionMismatch(
                f"topic {spec.name} has {count} partitions, the worker needs "
                f"{spec.partitions} (those of {inputs}): delete {spec.name} so the worker "
                f"creates it with {spec.partitions} (a changelog's table then starts empty), "
                f"or give {inputs} {count} partitions")
    return settings


def ensure_topics(bootstrap: str, specs: list[TopicSpec], timeout: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; returns the names created.

    An existing topic with another partition count than wanted is an error (its keys would
    map to other partitions than the tables' changelogs).
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = admin.list_topics(timeout=timeout).topics
    for spec in specs:
        have = existing.get(spec.name)
        if have is not None and have.error is None and len(have.partitions) != spec.partitions:
            raise PartitionMismatch(
                f"topic {spec.name} has {len(have.partitions)} partitions, "
                f"this worker needs {spec.partitions}"
            )
    wanted = [NewTopic(s.name, s.partitions, 1, config=s.config)
              for s in specs if s.name not in existing]
    created = []
    if wanted:
        for name, future in admin.create_topics(wanted, request_timeout=timeout).items():
            try:
                future.result(timeout=timeout)
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    _wait_for_leaders(admin, [s.name for s in specs], timeout)
    return created


def _wait_for_leaders(admin: AdminClient, names: list[str], timeout: float) -> None:
    """Block until every partition of ``names`` has a leader (new topics take a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        missing = [n for n in names if n not in topics or topics[n].error is not None
                   or any(p.leader < 0 for p in topics[n].partitions.values())]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics without a leader: {', '.join(missing)}")
        time.sleep(0.2)


def _until_answered(ask: Callable[[], _T], timeout: float) -> _T:
    """``ask()``, retried for up to ``timeout`` s while the broker cannot answer yet (a
    partition's leader being elected, a new group's coordinator not ready)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ask()
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def watermarks(consumer: Consumer, tp: TopicPartition, timeout: float = 30.0) -> tuple[int, int]:
    """``(low, high)`` offsets of ``tp``, retrying while its leader is being elected."""
    low, high = _until_answered(lambda: consumer.get_watermark_offsets(tp, timeout=timeout),
                                timeout)
    return int(low), int(high)


def committed_offset(consumer: Consumer, tp: TopicPartition, timeout: float = 30.0) -> int | None:
    """The consumer's group's committed offset of ``tp`` (None if it has none), retrying
    while the group's coordinator is not ready."""
    offset = _until_answered(lambda: consumer.committed([tp], timeout=10)[0].offset, timeout)
    return int(offset) if offset is not None and offset >= 0 else None


def read_topic(
    bootstrap: str, topic: str, partition: int = 0, timeout: float = 30.0
) -> Iterator[tuple[int, bytes | None, bytes | None]]:
    """``(offset, key, value)`` of every record now in one partition, then stop."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "qsfraud-reader",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "isolation.level": "read_committed"})
    try:
        low, high = watermarks(consumer, TopicPartition(topic, partition), timeout)
        if high <= low:
            return
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
        while True:
            msg = consumer.poll(timeout)
            if msg is None:
                raise TimeoutError(f"reading {topic}[{partition}] timed out")
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    return
                raise KafkaException(err)
            offset = msg.offset() or 0
            yield offset, msg.key(), msg.value()
            if offset >= high - 1:
                return
    finally:
        consumer.close()
