"""BatchPublisher on real Kafka: acknowledged writes, and a record the broker refuses."""

from __future__ import annotations

import asyncio
import time

import pytest
from confluent_kafka import KafkaException

from streams.app import BatchPublisher
from streams.topics import TopicSpec, ensure_topics, read_topic


def test_publish_returns_once_acknowledged_and_raises_for_a_refused_record(
    kafka_bootstrap: str,
) -> None:
    topic = f"publisher-{time.time_ns()}"
    # the broker refuses batches over 200 bytes on this topic
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 2, {"max.message.bytes": "200"})])

    async def scenario() -> None:
        publisher = BatchPublisher(kafka_bootstrap)
        try:
            await publisher.publish((topic, [(0, b"k", b"small")] * 3
                                     + [(1, b"k", b"other")] * 2))
            # acknowledged: the records are in the topic as publish returns
            assert [v for _, _, v in read_topic(kafka_bootstrap, topic, 0)] == [b"small"] * 3
            assert [v for _, _, v in read_topic(kafka_bootstrap, topic, 1)] == [b"other"] * 2
            with pytest.raises(KafkaException, match=rf"{topic}\[0\]"):
                await publisher.publish((topic, [(0, b"k", b"x" * 1000), (1, b"k", b"small")]),
                                        timeout_s=30)
            # the failure was reported once: the next batch is judged on its own
            await publisher.publish((topic, [(0, b"k", b"after")]))
            assert [v for _, _, v in read_topic(kafka_bootstrap, topic, 0)][-1] == b"after"
        finally:
            await publisher.stop()

    asyncio.run(scenario())


def test_a_publish_that_waits_meanwhile_gets_its_own_failure_not_another_callers(
    kafka_bootstrap: str,
) -> None:
    # The label agent and the worker's timers share one publisher. Here one caller's batch
    # is queued while the producer fetches its new topic's metadata, and another caller
    # flushes meanwhile: each must get its own outcome (the first one a refused record).
    known = f"publisher-known-{time.time_ns()}"
    fresh = [f"publisher-fresh-{n}-{time.time_ns()}" for n in range(3)]
    ensure_topics(kafka_bootstrap, [TopicSpec(known, 1, {}),
                                    *(TopicSpec(t, 1, {"max.message.bytes": "200"})
                                      for t in fresh)])

    async def scenario() -> None:
        publisher = BatchPublisher(kafka_bootstrap)
        try:
            await publisher.publish((known, [(0, b"k", b"first")]))
            for n, topic in enumerate(fresh):
                refused, written = await asyncio.gather(
                    publisher.publish((topic, [(0, b"k", b"x" * 1000)]), timeout_s=30),
                    publisher.publish((known, [(0, b"k", str(n).encode())])),
                    return_exceptions=True)
                assert isinstance(refused, KafkaException) and topic in str(refused)
                assert written is None
        finally:
            await publisher.stop()

    asyncio.run(scenario())
    assert [v for _, _, v in read_topic(kafka_bootstrap, known)] == [
        b"first", *(str(n).encode() for n in range(len(fresh)))]


def test_records_beyond_one_batch_go_out_in_several_in_order(kafka_bootstrap: str) -> None:
    topic = f"publisher-full-{time.time_ns()}"
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 1, {})])
    values = [f"{n:03d}".encode() * 40 for n in range(10)]  # 120 bytes each

    async def scenario() -> None:
        publisher = BatchPublisher(kafka_bootstrap, max_batch_bytes=300)
        try:
            await publisher.publish((topic, [(0, b"k", v) for v in values]))
        finally:
            await publisher.stop()

    asyncio.run(scenario())
    assert [v for _, _, v in read_topic(kafka_bootstrap, topic)] == values
