"""GapFiller on real Kafka: offsets faust skipped are read back before the batch; the empty
offsets of a transactional log (markers, aborted records) are not read."""

from __future__ import annotations

import asyncio
import time
from itertools import pairwise

from confluent_kafka import Consumer, Producer, TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from streams.app import GapFiller, LogGaps
from streams.scoring import InputRecord, Record
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
        first, filled, reads = asyncio.run(filler.fill([_record(topic, o) for o in (0, 1, 2)]))
        assert [r.offset for r in first] == [0, 1, 2] and filled == 0 and reads == 0
        # faust acked 3..6 without handing them over: they come first, from Kafka
        batch, filled, reads = asyncio.run(filler.fill([_record(topic, o) for o in (7, 8, 9)]))
        assert [r.offset for r in batch] == list(range(3, 10))
        assert [r.value for r in batch] == [f"v{i}".encode() for i in range(3, 10)]
        assert filled == 4 and reads == 1
        assert filler.next_offset == {0: 10}
    finally:
        filler.close()


def test_a_fill_that_spans_a_reset_keeps_no_old_positions(kafka_bootstrap: str) -> None:
    topic = _topic_with_ten_records(kafka_bootstrap)
    filler = GapFiller(kafka_bootstrap, f"group-{topic}", topic)

    async def rebalance_meanwhile() -> None:
        await asyncio.sleep(0)  # the fill is now waiting for the broker in its thread
        filler.reset()

    async def scenario() -> tuple[list[Record], int]:
        (batch, filled, _reads), _ = await asyncio.gather(
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


def _transactional_topic(bootstrap: str) -> str:
    """Three committed transactions of 3 records and an aborted one between them, as the
    CDC writes: a marker after each transaction, 4 aborted records."""
    topic = f"gaps-tx-{time.time_ns()}"
    ensure_topics(bootstrap, [TopicSpec(topic, 1, {})])
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": topic})
    producer.init_transactions(30)
    n = 0
    for commit in (True, True, False, True):
        producer.begin_transaction()
        for _ in range(3 if commit else 4):
            producer.produce(topic, key=b"k", value=f"v{n}".encode(), partition=0)
            n += 1
        if commit:
            producer.commit_transaction(30)
        else:
            assert producer.flush(30) == 0  # written, then aborted (not just dropped)
            producer.abort_transaction(30)
    return topic


def _fetch_committed(bootstrap: str, topic: str) -> list[InputRecord]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"fetch-{topic}",
                         "enable.auto.commit": False, "isolation.level": "read_committed"})
    consumer.assign([TopicPartition(topic, 0, 0)])
    out: list[InputRecord] = []
    deadline = time.monotonic() + 30
    try:
        while len(out) < 9 and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                out.append(InputRecord(msg.value(), msg.key(), 0, msg.offset() or 0, None,
                                       topic))
    finally:
        consumer.close()
    return out


def test_the_empty_offsets_of_a_transactional_log_are_not_read(kafka_bootstrap: str) -> None:
    topic = _transactional_topic(kafka_bootstrap)
    records = _fetch_committed(kafka_bootstrap, topic)
    # offsets 3 and 7 are commit markers, 8-11 aborted records, 12 the abort's marker
    assert [r.offset for r in records] == [0, 1, 2, 4, 5, 6, 13, 14, 15]
    noted = GapFiller(kafka_bootstrap, f"group-{topic}", topic)
    blind = GapFiller(kafka_bootstrap, f"group-blind-{topic}", topic)
    try:
        for fetch in (records[:2], records[2:5], records[5:]):  # as the consumer fetched
            noted.log_gaps.fetched(topic, 0, fetch)
        batch, filled, reads = asyncio.run(noted.fill(list(records)))
        assert [r.offset for r in batch] == [r.offset for r in records]
        assert (filled, reads) == (0, 0)
        # without the notes the same batch is whole too, at the cost of a read a gap
        batch, filled, reads = asyncio.run(blind.fill(list(records)))
        assert [r.offset for r in batch] == [r.offset for r in records]
        assert (filled, reads) == (0, 2)
    finally:
        noted.close()
        blind.close()


def test_records_dropped_after_they_were_fetched_are_still_read(kafka_bootstrap: str) -> None:
    topic = _transactional_topic(kafka_bootstrap)
    records = _fetch_committed(kafka_bootstrap, topic)
    filler = GapFiller(kafka_bootstrap, f"group-{topic}", topic)
    try:
        filler.log_gaps.fetched(topic, 0, records)
        # faust dropped 4 and 5 (fetched, never handed over): 4-6 is no empty gap
        kept = [r for r in records if r.offset not in (4, 5)]
        batch, filled, reads = asyncio.run(filler.fill(kept))
        assert [r.offset for r in batch] == [r.offset for r in records]
        assert (filled, reads) == (2, 1)
    finally:
        filler.close()


def test_the_last_records_of_a_quiet_partition_are_read_when_faust_never_hands_them_over(
    kafka_bootstrap: str,
) -> None:
    topic = _topic_with_ten_records(kafka_bootstrap)
    filler = GapFiller(kafka_bootstrap, f"group-{topic}", topic, quiet_s=2.0)
    try:
        async def scenario() -> None:
            first, _, _ = await filler.fill([_record(topic, o) for o in (0, 1, 2)])
            assert [r.offset for r in first] == [0, 1, 2]
            now = time.monotonic()
            # 3..9 were fetched and dropped: no later record shows the jump
            assert not await filler.check_tail({0: 10}, now + 0.5)  # not quiet yet
            assert await filler.check_tail({0: 10}, now + 2.5)
            tail, filled, reads = await filler.fill([])
            assert [r.offset for r in tail] == list(range(3, 10))
            assert [r.value for r in tail] == [f"v{i}".encode() for i in range(3, 10)]
            assert (filled, reads) == (7, 0)
            assert filler.next_offset == {0: 10}
            # faust hands some of them over after all: not processed twice
            late, filled, reads = await filler.fill([_record(topic, o) for o in (8, 9)])
            assert late == [] and (filled, reads) == (0, 0)
            # nothing beyond the high watermark: nothing more to read
            assert not await filler.check_tail({0: 10}, now + 10.0)
        asyncio.run(scenario())
    finally:
        filler.close()


def test_a_tail_of_transaction_markers_is_read_once_and_quickly(kafka_bootstrap: str) -> None:
    topic = _transactional_topic(kafka_bootstrap)
    records = _fetch_committed(kafka_bootstrap, topic)
    filler = GapFiller(kafka_bootstrap, f"group-{topic}", topic, quiet_s=2.0)
    try:
        async def scenario() -> None:
            filler.log_gaps.fetched(topic, 0, records)
            await filler.fill(list(records))
            assert filler.next_offset == {0: 16}  # offset 16 is the last commit's marker
            started = time.monotonic()
            assert not await filler.check_tail({0: 17}, started + 3.0)
            assert time.monotonic() - started < 2.0  # the end of the log, not a timeout
            assert filler.next_offset == {0: 17}
        asyncio.run(scenario())
    finally:
        filler.close()


class _Fetched:
    def __init__(self, offset: int) -> None:
        self.offset = offset


@given(st.lists(st.integers(1, 4), min_size=1, max_size=40), st.data())
def test_log_gaps_note_exactly_the_jumps_between_fetched_records(
    steps: list[int], data: st.DataObject,
) -> None:
    offsets = [sum(steps[:i + 1]) for i in range(len(steps))]
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(offsets) - 1)))))
    gaps = LogGaps(["t"])
    for lo, hi in zip([0, *cuts], [*cuts, len(offsets)], strict=True):
        gaps.fetched("t", 0, [_Fetched(o) for o in offsets[lo:hi]])
    for prev, offset in pairwise(offsets):
        assert gaps.take("t", 0, offset) == (prev + 1 if offset > prev + 1 else None)
    gaps.clear()
    assert gaps.take("t", 0, offsets[-1]) is None
    gaps.fetched("other", 0, [_Fetched(1), _Fetched(5)])  # not one of its topics
    assert gaps.take("other", 0, 5) is None


def test_an_open_transaction_at_the_tail_is_decided_once_it_commits(
    kafka_bootstrap: str,
) -> None:
    """A quiet partition whose last records are in a transaction still open (the CDC's
    commit waits out a broker restart): the high watermark is past them, a ``read_committed``
    read ends before them. They are not 'only markers': when faust hands them over after
    the commit, they are processed."""
    topic = _topic_with_ten_records(kafka_bootstrap)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": topic})
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(10, 13):
        producer.produce(topic, key=b"k", value=f"v{i}".encode(), partition=0)
    assert producer.flush(30) == 0  # written at 10..12, not committed
    filler = GapFiller(kafka_bootstrap, f"group-{topic}", topic, quiet_s=2.0)
    try:
        async def scenario() -> None:
            await filler.fill([_record(topic, o) for o in range(10)])
            now = time.monotonic()
            assert not await filler.check_tail({0: 13}, now + 2.5)  # nothing readable yet
            assert filler.next_offset == {0: 10}
            producer.commit_transaction(30)
            batch, filled, reads = await filler.fill([_record(topic, o) for o in (10, 11, 12)])
            assert [r.offset for r in batch] == [10, 11, 12] and (filled, reads) == (0, 0)
        asyncio.run(scenario())
    finally:
        filler.close()
