"""The faust app of one retailer: score, decide and learn on every transaction.

``create_app(settings, runtime)`` builds the app: two agents (``<R>.transactions`` ->
decisions, ``<R>.labels`` -> learning) that take batches with :func:`message_batches`, two
changelog-backed tables on the memory store (``features``: entity state; ``scored``: the
dedup and label-feature store), a checkpoint timer, an expiry timer, and ``/metrics`` on
faust's web server. :func:`run_worker` creates the topics, restores the model checkpoint,
replays the signed config topic, then runs the faust worker.

Writes: each batch's changed table keys are produced by a :class:`BatchPublisher` (one
produce request for all partitions) and awaited until the broker acknowledged them; then
its decisions and dead letters are produced, and acknowledged by the next batch's wait (or
when the input goes idle); only then are the batch's messages acked (their offsets
committable). So a decision is never visible before its ``scored`` entry is durable, and
committed offsets never run ahead of written decisions (at-least-once; redeliveries are
answered from ``scored``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from confluent_kafka import Consumer, KafkaException, TopicPartition
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode import Service
from mode.utils.futures import maybe_async

from fraud.models import RiskModel, RiverModel
from pqc.freshness import TimeWindow
from pqc.keys import load_registry
from streams.checkpoints import checkpoint_value, model_from_checkpoints
from streams.config_stream import ConfigApplier, ConfigDocument, ConfigFollower, Outcome
from streams.metrics import WorkerMetrics
from streams.scoring import (
    InputRecord,
    OutputRecord,
    Record,
    ScoredStore,
    ScoringPipeline,
    TrackedStore,
    collect_youngest_generation_only,
)
from streams.settings import FEATURES_TABLE, SCORED_TABLE, WorkerSettings
from streams.topics import (
    committed_offset,
    ensure_topics,
    read_topic,
    watermarks,
    worker_topics,
)

log = logging.getLogger(__name__)

Write = tuple[int, bytes | None, bytes | None]
"""A record to write to a topic: partition, key, value (the form of
:meth:`TrackedStore.drain_encoded`, so a changelog is written without a copy)."""


class LogGaps:
    """Offsets where a partition's log holds no record for this consumer: transaction
    markers (one after each committed or aborted transaction: the CDC writes in
    transactions), the records of aborted transactions, compacted records.

    :meth:`fetched` sees every batch of records the consumer fetches, before faust hands
    any over, and notes each jump between two fetched records. :class:`GapFiller` reads
    only the jumps not noted: records that were fetched and then dropped (faust's), never
    empty offsets. Only ``topics`` are noted (the changelogs, read by the same consumer at
    recovery, are compacted: full of jumps nobody takes). Cleared on a rebalance, as the
    fillers' positions are.

    >>> gaps = LogGaps(["t"])
    >>> class Rec:
    ...     def __init__(self, offset): self.offset = offset
    >>> gaps.fetched("t", 0, [Rec(9), Rec(10)])
    >>> gaps.fetched("t", 0, [Rec(13), Rec(14), Rec(16)])  # 11, 12 and 15 hold nothing
    >>> gaps.take("t", 0, 13), gaps.take("t", 0, 16), gaps.take("t", 0, 14)
    (11, 15, None)
    """

    def __init__(self, topics: Iterable[str]) -> None:
        self.topics = frozenset(topics)
        self._last: dict[tuple[str, int], int] = {}
        self._starts: dict[tuple[str, int], dict[int, int]] = {}

    def fetched(self, topic: str, partition: int, records: Sequence[Any]) -> None:
        """Note ``records`` (with ``offset``), fetched in log order, as the next ones."""
        if not records or topic not in self.topics:
            return
        key = (topic, partition)
        prev = self._last.get(key)
        first, last = records[0].offset, records[-1].offset
        self._last[key] = last
        if (prev is None or first == prev + 1) and last - first + 1 == len(records):
            return  # contiguous, as without transactions
        starts = self._starts.setdefault(key, {})
        for rec in records:
            offset = rec.offset
            if prev is not None and offset > prev + 1:
                starts[offset] = prev + 1
            prev = offset

    def take(self, topic: str, partition: int, offset: int) -> int | None:
        """The first empty offset right before ``offset``, if noted (and forget it)."""
        starts = self._starts.get((topic, partition))
        return None if not starts else starts.pop(offset, None)

    def clear(self) -> None:
        self._last.clear()
        self._starts.clear()


@dataclass
class WorkerRuntime:
    """The state shared by the app's agents, timers, web page and config thread."""

    settings: WorkerSettings
    pipeline: ScoringPipeline
    metrics: WorkerMetrics
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    log_gaps: LogGaps = field(init=False)

    def __post_init__(self) -> None:
        self.log_gaps = LogGaps((self.settings.transactions_topic, self.settings.labels_topic))

    def on_config(self, outcome: Outcome) -> None:
        self.metrics.count("qsfraud_config_total", outcome=outcome.status,
                           reason=outcome.reason or "ok")
        self.metrics.gauge("qsfraud_config_version", self.pipeline.config.version)


class BatchPublisher:
    """Writes records to Kafka, all that :meth:`produce` got since the last :meth:`flush` in
    one produce request: one batch a partition, built in C by aiokafka's batch builder.

    librdkafka sends a request per partition, and a broker serves one request at a time per
    connection: a batch's state (two changelogs) and decisions took 12 requests one after
    another. :meth:`flush` returns once the broker acknowledged every record produced so far
    and raises if any failed. Each agent has its own publisher, so a failure is reported to
    the agent whose record it was. Idempotent, so a retried request is written once.
    """

    def __init__(self, bootstrap: str, max_batch_bytes: int = 512 * 1024) -> None:
        self.bootstrap = bootstrap
        self.max_batch_bytes = max_batch_bytes
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()  # the label agent and the timers share a publisher
        self._sent: list[tuple[str, int, asyncio.Future[Any]]] = []

    async def _started(self) -> AIOKafkaProducer:
        if self._producer is None:
            # created on the loop that uses it (aiokafka binds a producer to its loop)
            async with self._starting:
                if self._producer is None:
                    producer = AIOKafkaProducer(
                        bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                        max_batch_size=self.max_batch_bytes, linger_ms=0)
                    await producer.start()
                    self._producer = producer
        return self._producer

    async def produce(self, topic: str, records: Sequence[Write]) -> None:
        """Queue ``records`` for ``topic``; all that is queued goes out in one request once
        the caller next waits (see :meth:`flush`)."""
        if not records:
            return
        producer = await self._started()
        batches: dict[int, Any] = {}
        for partition, key, value in records:
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = producer.create_batch()
            if batch.append(timestamp=None, key=key, value=value) is None:  # full
                await self._send(producer, batch, topic, partition)
                # an empty batch takes any record (one over the broker's limit is refused
                # there, and reported by flush)
                batch = batches[partition] = producer.create_batch()
                batch.append(timestamp=None, key=key, value=value)
        for partition, batch in batches.items():
            await self._send(producer, batch, topic, partition)

    async def _send(self, producer: AIOKafkaProducer, batch: Any, topic: str,
                    partition: int) -> None:
        future = await producer.send_batch(batch, topic, partition=partition)
        # appended after the await: a flush meanwhile (the label agent and the timers share
        # a publisher) swaps in a new list, and this batch belongs to that one
        self._sent.append((topic, partition, future))

    async def flush(self, timeout_s: float = 60.0) -> None:
        """Until everything produced so far is acknowledged; raises if anything failed."""
        sent, self._sent = self._sent, []
        if not sent:
            return
        try:
            results = await asyncio.wait_for(asyncio.gather(
                *(future for _, _, future in sent), return_exceptions=True), timeout_s)
        except TimeoutError:
            results = [TimeoutError(f"not acknowledged in {timeout_s:g} s")] * len(sent)
        failures = [f"{topic}[{partition}]: {result!r}"
                    for (topic, partition, _), result in zip(sent, results, strict=True)
                    if isinstance(result, BaseException)]
        if failures:
            # a refused batch used up its sequence numbers: the idempotent producer's next
            # batch to that partition would be refused as out of order, so start afresh
            await self.stop()
            raise KafkaException(f"{len(failures)} batches not written: "
                                 f"{'; '.join(failures[:3])}")

    async def publish(self, *writes: tuple[str, Sequence[Write]],
                      timeout_s: float = 60.0) -> None:
        """:meth:`produce` each ``(topic, records)``, then :meth:`flush`."""
        if any(records for _, records in writes):
            for topic, records in writes:
                await self.produce(topic, records)
            await self.flush(timeout_s)

    async def stop(self) -> None:
        """Flush what is produced, then close the connection."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()


class GapFiller:
    """Read offsets that faust skipped straight from Kafka, so none goes undecided.

    faust 0.15 drops (and acks!) events it receives while flow control is paused or with
    a stale generation id, e.g. right after a worker joins the group; the offsets after
    them are then committed and those transactions would never be decided. This keeps the
    next expected offset per partition (from the group's committed offset on first sight)
    and, when a batch jumps ahead, fetches the missing records with a plain consumer and
    processes them first, before the batch (and thus their offsets) is acked. Offsets the
    log holds no record at (``log_gaps``, noted as the records were fetched) are not read.
    """

    def __init__(self, bootstrap: str, group: str, topic: str,
                 log_gaps: LogGaps | None = None) -> None:
        self.topic = topic
        self.log_gaps = log_gaps if log_gaps is not None else LogGaps((topic,))
        self.next_offset: dict[int, int] = {}
        self._resets = 0  # a fill that spans a reset must not bring back old positions
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                   "enable.auto.commit": False,
                                   "isolation.level": "read_committed"})

    def reset(self) -> None:
        """Forget positions (after a rebalance, partitions may have moved)."""
        self.next_offset.clear()
        self.log_gaps.clear()
        self._resets += 1

    def _start_of(self, partition: int) -> int:
        tp = TopicPartition(self.topic, partition)
        committed = committed_offset(self._consumer, tp)
        if committed is not None:
            return committed
        low, _high = watermarks(self._consumer, tp)
        return low

    def _read(self, partition: int, start: int, end: int) -> list[InputRecord]:
        self._consumer.assign([TopicPartition(self.topic, partition, start)])
        out: list[InputRecord] = []
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                msg = self._consumer.poll(1.0)
                if msg is None or msg.error() is not None:
                    continue
                offset = msg.offset() or 0
                if offset >= end:
                    break
                stamp = msg.timestamp()[1]
                out.append(InputRecord(msg.value(), msg.key(), partition, offset,
                                       stamp / 1000.0 if stamp > 0 else None, self.topic))
                if offset >= end - 1:
                    break
        finally:
            self._consumer.unassign()
        return out

    async def fill(self, records: list[Record]) -> tuple[list[Record], int, int]:
        """``records`` with any skipped records of their partitions put before them; how
        many records were put there, and how many reads it took.

        The broker is asked in a thread: these calls block, and the event loop also runs
        the group consumer's heartbeats.
        """
        out: list[Record] = []
        filled = reads = 0
        resets = self._resets
        take_gap = self.log_gaps.take
        for rec in records:
            partition = rec.partition
            expected = self.next_offset.get(partition)
            if expected is None:
                expected = await asyncio.to_thread(self._start_of, partition)
            if rec.offset > expected:
                empty_from = take_gap(self.topic, partition, rec.offset)
                if empty_from is None or empty_from > expected:  # not all of it is empty
                    reads += 1
                    missing = await asyncio.to_thread(self._read, partition, expected,
                                                      rec.offset)
                    log.warning("faust skipped %s[%d] offsets %d..%d; read %d of them "
                                "directly", self.topic, partition, expected, rec.offset - 1,
                                len(missing))
                    out.extend(missing)
                    filled += len(missing)
            out.append(rec)
            if self._resets == resets:
                self.next_offset[partition] = rec.offset + 1
        return out, filled, reads

    def close(self) -> None:
        self._consumer.close()


async def message_batches(
    app: faust.App, stream: Any, max_messages: int,
    on_idle: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[list[Any]]:
    """Batches of faust's consumer messages waiting on an agent's channel, at most
    ``max_messages`` each.

    Instead of ``stream.take_events``: faust's stream iterator spends an event-loop turn
    (``sleep(0)``), sensor calls and a context variable on every event, and ``take_events``
    waits for a timer before it hands over a short batch. Here the first message is awaited
    and whatever else is queued is taken at once, so a batch is what arrived while the last
    one was processed: one message at low rates, up to ``max_messages`` under load.

    The queue holds the messages themselves (:class:`RawSchema`), whether the drain loop
    or faust's own handler (around a rebalance) put them there. The caller acks each
    message (``message.ack(app.consumer)``) once its results are written; ``on_idle`` runs
    whenever the queue is empty, before waiting for the next message. Messages faust's
    stream would skip (flow control paused, or fetched in an older consumer generation:
    around a rebalance) are acked unprocessed, as the stream does; :class:`GapFiller` reads
    those offsets again.
    """
    channel = aiter(stream.channel)  # subscribes a queue to the topic, as the stream does
    queue = channel.queue
    consumer = app.consumer
    acking_topics = app.topics.acking_topics
    flow_control = app.flow_control
    while True:
        if on_idle is not None and queue.empty():
            await on_idle()
        try:
            messages = [await queue.get()]
        except StopAsyncIteration:  # faust ends the stream (the worker stops): end the batches
            return
        get_nowait = queue.get_nowait
        while len(messages) < max_messages and not queue.empty():
            messages.append(get_nowait())
        active = flow_control.is_active()
        generation = app.consumer_generation_id
        batch = []
        for message in messages:
            if not active or message.generation_id != generation:
                message.ack(consumer)
                continue
            if message.topic in acking_topics and not message.tracked:
                message.tracked = True
                consumer.track_message(message)
            batch.append(message)
        if batch:
            yield batch


FULL_COLLECTION_INTERVAL_S = 3600.0
"""How often a worker runs a full garbage collection (it collects only the youngest
generation otherwise)."""

FETCH_MAX_WAIT_MS = 50
"""How long a fetch may wait at the broker for new records (faust hard-codes 1,500 ms)."""


class RawSchema(faust.Schema):
    """Keys and values as the bytes on the wire (faust's ``raw`` serializer), decoded without
    faust's serializer registry: two codec look-ups per message there, ~8 % of a busy
    worker. The pipeline parses (and dead-letters) the bytes itself.

    "Decoding" hands over faust's consumer message itself, with no event around it: what
    the drain loop (:meth:`_Consumer._drain_messages`) queues too, so the agents'
    :func:`message_batches` meet one kind of item whichever way it came.
    """

    def __init__(self) -> None:
        super().__init__(key_serializer="raw", value_serializer="raw")

    def compile(self, app: Any, **kwargs: Any) -> Any:
        async def decode(message: Any, *, propagate: bool = False) -> Any:
            return message

        return decode


class _ConsumerThreadOnLoop(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's consumer thread without the thread: aiokafka's consumer runs on the worker's
    own event loop, and what faust would queue for the thread is called directly.

    faust 0.15 runs the consumer in a second thread with its own event loop. Every fetch
    then crossed threads twice (a queued call there, a future resolved back here), and the
    two threads took turns on the GIL: at a steady 1,000 tx/s the thread used 0.25-0.30 of
    a core.
    Measured against one broker (alternating runs, session 9): produce -> decision visible
    p50 17.1-17.7 ms against 23.3-28.4, produced -> received p50 10.1-10.5 against 13.6-16.2.
    Rebalances, commits and seeks go through the same faust code, called in this loop.
    """

    # Service's own start/stop instead of ServiceThread's, which hand over to the thread
    wait_for_shutdown = False

    async def start(self) -> None:
        self._thread_started.set()
        await Service.start(self)

    async def stop(self) -> None:
        if self._started.is_set():
            await Service.stop(self)

    async def on_stop(self) -> None:
        if self._consumer is not None:  # what faust's thread does as it ends
            await self._consumer.stop()

    async def call_thread(self, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await maybe_async(fun(*args, **kwargs))

    async def cast_thread(self, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.add_future(maybe_async(fun(*args, **kwargs)))

    def _stopped_set(self) -> None:
        self._stopped.set()

    def set_shutdown(self) -> None:
        self._shutdown.set()

    async def _stop_children(self) -> None:
        await self._default_stop_children()

    async def _stop_futures(self) -> None:
        await self._default_stop_futures()

    async def _stop_exit_stacks(self) -> None:
        await self._default_stop_exit_stacks()

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Measured: with faust's 1,500 ms, records produced at a steady 1,000/s reached the
        # agent 1-2 s late; with 50 ms, 20-90 ms. (aiokafka reads this when it starts.)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        # faust reads uncommitted records unless it runs exactly-once. The CDC writes in
        # Kafka transactions: a record of an aborted one must not be decided, and one of an
        # open one not before it commits. The worker's own topics are written without
        # transactions, so reading them is the same either way.
        consumer._isolation_level = "read_committed"
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThreadOnLoop:
        return _ConsumerThreadOnLoop(self, loop=self.loop, thread_loop=self.loop,
                                     beacon=self.beacon)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[Any, Any]]:
        """faust 0.15's ``Consumer.getmany`` (the fetched records as messages, round robin
        over the partitions), reading each partition's high watermark once per fetch for
        the lag monitor instead of once per record."""
        records, active = await self._wait_next_records(timeout)
        if records is None or self.should_stop:
            return
        if not self.flow_active:  # faust's way: back to the committed offsets
            try:
                await self.perform_seek()
            except Exception as exc:
                self.log.warning(f"exception performing seek when flow not active {exc}")
            return
        app = self.app
        generation = app.consumer_generation_id
        buffered = self._buffered_partitions
        wanted = [tp for tp in records if active is None or tp in active or tp in buffered]
        track_end_offset = app.monitor.track_tp_end_offset
        for tp in wanted:
            track_end_offset(tp, self.highwater(tp))
        runtime: WorkerRuntime | None = getattr(app, "qsfraud_runtime", None)
        if runtime is not None:
            fetched = runtime.log_gaps.fetched
            for tp, fetched_records in records.items():  # what is dropped below too
                fetched(tp.topic, tp.partition, fetched_records)
        to_message = self._to_message
        for tp, record in self.scheduler.iterate(records):
            if not self.flow_active or app.consumer_generation_id != generation:
                break
            if active is None or tp in active or tp in buffered:
                yield tp, to_message(tp, record)

    def _direct_route(self, tp: Any) -> tuple[Any, Any, Any] | None:
        """``(queue, on_pressure_high, on_pressure_drop)`` of the one channel that reads
        ``tp`` if its schema is :class:`RawSchema`, else None (faust's handler then)."""
        conductor: Any = self.app.topics
        channels = conductor._tp_index.get(tp)
        if not channels or len(channels) != 1:
            return None
        (channel,) = channels
        if not isinstance(getattr(channel, "schema", None), RawSchema):
            return None
        on_topic_buffer_full = self.app.sensors.on_topic_buffer_full
        tp = TP(tp.topic, tp.partition)  # faust's own type (the consumer asserts it)

        def on_pressure_high() -> None:
            on_topic_buffer_full(tp)
            self.on_buffer_full(tp)

        def on_pressure_drop() -> None:
            self.on_buffer_drop(tp)

        return channel.queue, on_pressure_high, on_pressure_drop

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - faust's loop
        """faust 0.15's ``Consumer._drain_messages``, with the per-message work cut down.

        - While the flow runs, a message of a :class:`RawSchema` topic read by one channel
          (the agents' input topics) is put on that channel's queue here, as faust's
          conductor handler would put it there (:class:`RawSchema` "decodes" a message to
          itself), without the handler's per-message lock, flow control and
          producer-buffer waits (each a coroutine; the buffer check reads a setting
          through faust's settings registry): measured ~9 % of a busy worker. The producer
          buffer is checked once per fetch; a full queue, stopped flow control and any
          other topic take faust's handler.
        - Otherwise a message is handed over with ``await callback(message)`` while the
          flow is not suspended, instead of ``wait_first(callback(message),
          suspend_flow.wait())`` for every message (four tasks and an ``asyncio.wait``
          each: ~15 % of a busy worker). While the flow is suspended (a rebalance) faust's
          own way is kept; a callback that blocks on a full channel is released by the
          agent, which keeps taking events (and acks unprocessed the ones that arrive
          while the flow is off).
        """
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        suspended = self.suspend_flow.is_set
        read_offsets = self._read_offset
        commit_every = self._commit_every
        app = self.app
        conductor: Any = app.topics
        acks_enabled_for = conductor.acks_enabled_for
        handlers = conductor._tp_to_callback
        flow_active = app.flow_control.is_active
        wait_until_ebb = app.producer.buffer.wait_until_ebb
        # tp -> (faust's handler for it, direct route or None); looked up again whenever
        # faust rebuilds its handlers (a rebalance or a new subscription)
        routes: dict[Any, tuple[Any, tuple[Any, Any, Any] | None]] = {}
        since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(faust_consumer.CONSUMER_FETCHING)
                ait = getmany(timeout=1.0)
                await asyncio.sleep(0)  # getmany may return at once, again and again
                await wait_until_ebb()
                if not self.should_stop:
                    async for tp, message in ait:
                        since_yield += 1
                        if since_yield > 100:
                            await asyncio.sleep(0)
                            since_yield = 0
                        offset = message.offset
                        r_offset = read_offsets.get(tp)
                        if r_offset is not None and offset < r_offset:
                            continue  # already read (faust logs these at dev level)
                        gap = offset - (r_offset or 0)
                        if gap > 1 and r_offset and acks_enabled_for(message.topic):
                            await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        if suspended():
                            await self.wait_first(callback(message), self.suspend_flow.wait())
                            read_offsets[tp] = offset
                            continue
                        handler = handlers.get(tp)
                        known = routes.get(tp)
                        if known is None or known[0] is not handler:
                            known = routes[tp] = (handler, self._direct_route(tp))
                        route = known[1]
                        if route is not None and flow_active() and not route[0].full():
                            queue, on_high, on_drop = route
                            # incref(1) without its lock: no other thread has seen it yet
                            message.refcount += 1
                            queue.put_nowait_enhanced(
                                message, on_pressure_high=on_high, on_pressure_drop=on_drop)
                        else:
                            await callback(message)
                        read_offsets[tp] = offset
                self.diag.unset_flag(faust_consumer.CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(faust_consumer.CONSUMER_FETCHING)


def create_app(settings: WorkerSettings, runtime: WorkerRuntime) -> faust.App:
    """The faust app of ``settings.retailer``'s workers (consumer group ``settings.app_id``)."""
    n = settings.partitions
    (settings.datadir / settings.app_id).mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap}",
        datadir=str(settings.datadir / settings.app_id),
        store="memory://",
        topic_partitions=n,
        topic_allow_declare=False,
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        processing_guarantee=settings.processing_guarantee,
        stream_buffer_maxsize=4 * settings.batch_size,
        broker_max_poll_records=2 * settings.batch_size,
        producer_max_batch_size=512 * 1024,
        producer_linger=0.002,
        table_standby_replicas=0,
        web_enabled=True,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_host=settings.web_host,
    )
    app.transport.Consumer = _Consumer  # type: ignore[misc]
    pipeline, metrics = runtime.pipeline, runtime.metrics

    def table(name: str, value_type: type | None) -> Any:
        # faust picks the changelog's value serializer from value_type: bytes -> "raw"
        schema: Any = faust.Schema(key_serializer="json",
                                   value_serializer="raw" if value_type is bytes else "json")
        return app.Table(name, partitions=n, schema=schema, value_type=value_type,
                         use_partitioner=False, recovery_buffer_size=10_000)

    # The pipeline writes into the tables' memory stores; the publisher writes the changelog.
    # `scored` values stay the JSON bytes of the changelog (ScoredStore decodes on read).
    features: Any = table(FEATURES_TABLE, None).data
    scored: Any = table(SCORED_TABLE, bytes).data
    pipeline.features = TrackedStore(features.data, features._key_partition)
    pipeline.scored = ScoredStore(scored.data, scored._key_partition)
    features_changelog = settings.changelog_topic(FEATURES_TABLE)
    scored_changelog = settings.changelog_topic(SCORED_TABLE)
    publisher = BatchPublisher(settings.bootstrap)
    transactions = app.topic(settings.transactions_topic, partitions=n, schema=RawSchema())
    labels = app.topic(settings.labels_topic, partitions=n, schema=RawSchema())

    def ack(messages: list[Any]) -> None:
        """Mark ``messages`` done: their offsets may be committed."""
        consumer = app.consumer
        for message in messages:
            message.ack(consumer)

    def records_of(messages: list[Any]) -> list[Record]:
        """``messages`` (faust's messages are Records), their positions noted for the lag."""
        positions = runtime.positions
        for m in messages:
            positions[m.tp] = m.offset + 1  # a TP is the (topic, partition) tuple
        return messages

    def state_writes() -> list[tuple[str, Sequence[Write]]]:
        """The tables' changes since the last drain, as faust's changelog records (JSON key
        and value, as faust's json serializer writes them; None = delete)."""
        return [(features_changelog, pipeline.features.drain_encoded()),
                (scored_changelog, pipeline.scored.drain_encoded())]

    def dlq(records: list[OutputRecord]) -> tuple[str, Sequence[Write]]:
        return settings.dlq_topic, [(0, r.key, r.value) for r in records]

    gaps = {topic: GapFiller(settings.bootstrap, settings.app_id, topic, runtime.log_gaps)
            for topic in (settings.transactions_topic, settings.labels_topic)}

    async def forget_positions(sender: Any, assigned: Any, **kwargs: Any) -> None:
        for filler in gaps.values():
            filler.reset()

    app.on_partitions_assigned.connect(forget_positions)  # type: ignore[arg-type]

    async def stop_publisher(sender: Any, **kwargs: Any) -> None:
        await publisher.stop()

    app.on_before_shutdown.connect(stop_publisher)  # type: ignore[arg-type]

    @app.agent(transactions, name="decide")
    async def decide(stream: Any) -> None:
        out = BatchPublisher(settings.bootstrap)  # this agent's own: its flushes, its failures
        unconfirmed: list[Any] = []  # messages whose decisions are produced, not yet acked

        async def confirm() -> None:
            """Wait until everything produced is acknowledged, then ack those messages."""
            nonlocal unconfirmed
            await out.flush()
            ack(unconfirmed)  # their decisions are written
            unconfirmed = []

        async def on_idle() -> None:
            if unconfirmed:
                await confirm()

        try:
            async for messages in message_batches(app, stream, settings.batch_size, on_idle):
                batch, filled, reads = await gaps[settings.transactions_topic].fill(
                    records_of(messages))
                if reads:
                    metrics.count("qsfraud_gap_reads_total", reads,
                                  topic=settings.transactions_topic)
                if filled:
                    metrics.count("qsfraud_refetched_total", filled)
                result = pipeline.process_batch(batch)
                # State first: once a decision is visible, the `scored` entry that answers a
                # redelivery of its transaction must already be durable, or a crash in between
                # would let the redelivery be decided afresh (and differently). This flush also
                # confirms the previous batch's decisions, which were on their way meanwhile.
                for topic, writes in state_writes():
                    await out.produce(topic, writes)
                await confirm()
                await out.produce(settings.decisions_topic, [
                    (r.partition or 0, r.key, r.value) for r in result.decisions])
                await out.produce(*dlq(result.dead_letters))
                unconfirmed = messages  # acked by the next batch's flush, or when idle
                metrics.count("qsfraud_transactions_total", len(batch))
                metrics.processed(len(batch))
                for action, count in result.actions.items():
                    metrics.count("qsfraud_decisions_total", count, action=action)
                if result.duplicates:
                    metrics.count("qsfraud_decisions_total", result.duplicates, action="duplicate")
                    metrics.count("qsfraud_duplicates_total", result.duplicates)
                if result.dead_letters:
                    metrics.count("qsfraud_dead_letters_total", len(result.dead_letters))
                    log.warning("%d bad transaction records sent to %s", len(result.dead_letters),
                                settings.dlq_topic)
                if result.skipped:
                    metrics.count("qsfraud_skipped_total", result.skipped)
                metrics.observe_latencies(result.latencies)
        finally:
            await out.stop()

    @app.agent(labels, name="learn")
    async def learn(stream: Any) -> None:
        async for messages in message_batches(app, stream, settings.batch_size):
            batch, _filled, reads = await gaps[settings.labels_topic].fill(
                records_of(messages))
            if reads:
                metrics.count("qsfraud_gap_reads_total", reads, topic=settings.labels_topic)
            result = pipeline.learn_batch(batch)
            await publisher.publish(dlq(result.dead_letters), *state_writes())
            ack(messages)
            for outcome in ("learned", "unknown", "duplicate"):
                value = getattr(result, outcome)
                if value:
                    metrics.count("qsfraud_labels_total", value, outcome=outcome)
            if result.dead_letters:
                metrics.count("qsfraud_labels_total", len(result.dead_letters), outcome="bad")
            metrics.gauge("qsfraud_model_info", 1, version=pipeline.model_version)

    @app.timer(interval=settings.checkpoint_interval_s)
    async def checkpoint() -> None:
        value = checkpoint_value(settings.retailer, pipeline.model, pipeline.config.version)
        # the publisher of the label agent's writes: faust's own producer would be another
        # client for one record every few seconds
        await publisher.publish((settings.checkpoints_topic,
                                 [(0, settings.retailer.encode(), value)]))
        metrics.count("qsfraud_checkpoints_total")

    @app.timer(interval=min(60.0, max(1.0, settings.scored_ttl_s / 10)))
    async def expire() -> None:
        gone = pipeline.scored.expire(time.time(), settings.scored_ttl_s,
                                      settings.scored_max_entries)
        if gone:
            await publisher.publish(*state_writes())

    @app.timer(interval=FULL_COLLECTION_INTERVAL_S)
    async def full_collection() -> None:
        # The only collections beyond the youngest generation (run_worker turns the automatic
        # ones off): what cyclic garbage outlived a young collection is freed here.
        started = time.perf_counter()
        found = gc.collect()
        log.info("full garbage collection: %d objects in %.0f ms", found,
                 (time.perf_counter() - started) * 1000)

    def collect(m: WorkerMetrics) -> None:
        m.gauge("qsfraud_model_info", 1, version=pipeline.model_version)
        m.gauge("qsfraud_config_version", pipeline.config.version)
        m.gauge("qsfraud_scored_entries", len(pipeline.scored))
        try:
            consumer = app.consumer
            for tp in consumer.assignment():
                if tp.topic not in (settings.transactions_topic, settings.labels_topic):
                    continue
                high = consumer.highwater(tp)
                if high is None:
                    continue
                done = runtime.positions.get((tp.topic, tp.partition), 0)
                m.gauge("qsfraud_consumer_lag", max(0, high - done), topic=tp.topic,
                        partition=str(tp.partition))
        except Exception as exc:  # not assigned yet, or rebalancing
            log.debug("no lag yet: %s", exc)

    metrics.collectors.append(collect)

    @app.page("/metrics")
    async def metrics_page(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.text(metrics.render(), content_type="text/plain; version=0.0.4")

    app.qsfraud_runtime = runtime  # type: ignore[attr-defined]
    return app


def restore_model(settings: WorkerSettings) -> RiskModel | RiverModel | None:
    """The newest valid model checkpoint of the retailer, or None."""
    return model_from_checkpoints(
        read_topic(settings.bootstrap, settings.checkpoints_topic), settings.retailer
    )


def prepare(settings: WorkerSettings) -> tuple[WorkerRuntime, ConfigFollower]:
    """Topics, checkpoint, config replay: everything before faust starts."""
    ensure_topics(settings.bootstrap, worker_topics(settings))
    model = restore_model(settings)
    if model is not None:
        log.info("model restored from checkpoint: %s+%d", model.version, model.n)
    pipeline = ScoringPipeline(settings.retailer, model=model)
    runtime = WorkerRuntime(settings, pipeline, WorkerMetrics(settings.retailer))
    registry = None
    if settings.trust_registry is not None and settings.trust_registry.exists():
        registry = load_registry(settings.trust_registry)
    else:
        log.warning("no trust registry at %s: every config document will be rejected",
                    settings.trust_registry)
    applier = ConfigApplier(
        settings.retailer, registry, on_apply=pipeline.apply_config,
        window=TimeWindow(max_age_s=settings.config_max_age_s, max_future_s=120.0),
        initial=ConfigDocument.default(),
    )
    follower = ConfigFollower(settings.bootstrap, settings.config_topic,
                              settings.config_rejected_topic, applier, runtime.worker_id,
                              on_outcome=runtime.on_config)
    follower.start()
    if not follower.ready.wait(settings.config_replay_timeout_s):
        log.warning("config replay not finished after %.0f s; starting with v%d",
                    settings.config_replay_timeout_s, pipeline.config.version)
    return runtime, follower


def run_worker(settings: WorkerSettings, loglevel: str = "info") -> int:
    """Run one worker until it is stopped (SIGTERM/SIGINT)."""
    logging.basicConfig(level=loglevel.upper(),
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")
    try:
        import uvloop  # optional: faust's per-event overhead is event-loop bound

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    runtime, follower = prepare(settings)
    app = create_app(settings, runtime)
    collect_youngest_generation_only()  # the rest once an hour: `full_collection`
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    # faust's progress spinner (on at --loglevel warn and above) sets the root logger to
    # DEBUG so it can spin on every record: aiokafka then builds a debug record for every
    # request it sends (~3% of a busy worker's time). No spinner: the root keeps the level.
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    finally:
        follower.stop()
    return 0


__all__ = ["BatchPublisher", "WorkerRuntime", "create_app", "prepare", "run_worker"]
