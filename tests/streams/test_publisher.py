"""BatchPublisher on real Kafka: acknowledged writes, and a record the broker refuses."""

from __future__ import annotations

import asyncio
import time

import pytest
from confluent_kafka import KafkaException

from streams.app import BatchPublisher
from streams.topics import TopicSpec, ensure_topics


def test_publish_returns_once_acknowledged_and_raises_for_a_refused_record(
    kafka_bootstrap: str,
) -> None:
    topic = f"publisher-{time.time_ns()}"
    # the broker refuses records over 200 bytes on this topic (librdkafka's own limit is 1 MB)
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 1, {"max.message.bytes": "200"})])
    publisher = BatchPublisher(kafka_bootstrap)
    asyncio.run(publisher.publish([(topic, 0, b"k", b"small")] * 5))
    assert publisher.producer.flush(0) == 0
    with pytest.raises(KafkaException, match=rf"{topic}\[0\]"):
        asyncio.run(publisher.publish([(topic, 0, b"k", b"x" * 1000),
                                       (topic, 0, b"k", b"small")], timeout_s=30))
    # the failure was reported once: the next batch is judged on its own
    asyncio.run(publisher.publish([(topic, 0, b"k", b"small")]))
