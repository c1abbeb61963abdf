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
            await publisher.publish([(topic, 0, b"k", b"small")] * 3
                                    + [(topic, 1, b"k", b"other")] * 2)
            # acknowledged: the records are in the topic as publish returns
            assert [v for _, _, v in read_topic(kafka_bootstrap, topic, 0)] == [b"small"] * 3
            assert [v for _, _, v in read_topic(kafka_bootstrap, topic, 1)] == [b"other"] * 2
            with pytest.raises(KafkaException, match=rf"{topic}\[0\]"):
                await publisher.publish([(topic, 0, b"k", b"x" * 1000),
                                         (topic, 1, b"k", b"small")], timeout_s=30)
            # the failure was reported once: the next batch is judged on its own
            await publisher.publish([(topic, 0, b"k", b"after")])
            assert [v for _, _, v in read_topic(kafka_bootstrap, topic, 0)][-1] == b"after"
        finally:
            await publisher.stop()

    asyncio.run(scenario())
