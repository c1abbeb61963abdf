"""GapFiller on real Kafka: offsets faust skipped are read back before the batch."""

from __future__ import annotations

import asyncio
import time

from confluent_kafka import Producer

from streams.app import GapFiller
from streams.scoring import InputRecord
from streams.topics import TopicSpec, ensure_topics


def _topic_with_ten_records(bootstrap: str) -> str:
    topic = f"gaps-{time.time_ns()}"
    ensure_topics(bootstrap, [TopicSpec(topic, 1, {})])
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(10):
        producer.produce(topic, key=b"k", value=f"v{i}".encode(), partition=0)
    assert producer.flush(30) == 0
    return topic


def _record(topic: str, offset: int) -> InputRecord:
    return InputRecord(f"v{offset}".encode(), b"k", 0, offset, None, topic)


def test_a_skipped_range_is_read_from_kafka_before_the_batch(kafka_bootstrap: str) -> None:
    topic = _topic_with_ten_records(kafka_bootstrap)
    filler = GapFiller(kafka_bootstrap, f"group-{topic}", topic)
    try:
        first, filled = asyncio.run(filler.fill([_record(topic, o) for o in (0, 1, 2)]))
        assert [r.offset for r in first] == [0, 1, 2] and filled == 0
        # faust acked 3..6 without handing them over: they come first, from Kafka
        batch, filled = asyncio.run(filler.fill([_record(topic, o) for o in (7, 8, 9)]))
        assert [r.offset for r in batch] == list(range(3, 10))
        assert [r.value for r in batch] == [f"v{i}".encode() for i in range(3, 10)]
        assert filled == 4
        assert filler.next_offset == {0: 10}
    finally:
        filler.close()


def test_a_fill_that_spans_a_reset_keeps_no_old_positions(kafka_bootstrap: str) -> None:
    topic = _topic_with_ten_records(kafka_bootstrap)
    filler = GapFiller(kafka_bootstrap, f"group-{topic}", topic)

    async def rebalance_meanwhile() -> None:
        await asyncio.sleep(0)  # the fill is now waiting for the broker in its thread
        filler.reset()

    async def scenario() -> tuple[list[InputRecord], int]:
        (batch, filled), _ = await asyncio.gather(
            filler.fill([_record(topic, 5)]), rebalance_meanwhile())
        return batch, filled

    try:
        batch, filled = asyncio.run(scenario())
        # the batch is still whole (its records are processed before they are acked) ...
        assert [r.offset for r in batch] == [0, 1, 2, 3, 4, 5] and filled == 5
        # ... but the position from before the rebalance is not kept
        assert filler.next_offset == {}
    finally:
        filler.close()
