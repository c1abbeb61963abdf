"""The faust app of one retailer: score, decide and learn on every transaction.

``create_app(settings, runtime)`` builds the app: two agents (``<R>.transactions`` ->
decisions, ``<R>.labels`` -> learning) that take batches with :func:`message_batches`, two
changelog-backed tables on the memory store (``features``: entity state; ``scored``: the
dedup and label-feature store), a checkpoint timer, an expiry timer, and ``/metrics`` on
faust's web server. :func:`run_worker` checks the faust/mode/aiokafka versions, settles the
partition count and creates the topics, restores the model checkpoint, replays the signed
config topic, then runs the faust worker. Accepted configs reach the agents between batches
(:class:`BetweenBatches`).

Entity state: each entity's state is owned by the worker holding its home partition; a
worker asks the owners of the entities it does not hold for their features of a transaction
(:class:`EntityExchange`, streams/README.md "Entity state").

Everything that reaches into faust's, mode's or aiokafka's private code (the consumer, the
drain loop, :func:`message_batches`, :class:`RawSchema`, the memory store's maps) is in
:mod:`streams.faust_compat`; this module is the app's own wiring.

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
import contextlib
import gc
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import faust
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import TopicPartition as TopicPartition_
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from cdc.debezium import DebeziumDecoder
from fraud.models import RiskModel, RiverModel
from pqc.freshness import TimeWindow
from pqc.keys import load_registry
from streams.api import register_api, web_settings
from streams.checkpoints import checkpoint_value, model_from_checkpoints
from streams.config_stream import ConfigApplier, ConfigDocument, ConfigFollower, Outcome
from streams.faust_compat import (
    RawSchema,
    check_versions,
    memory_store_maps,
    message_batches,
)
from streams.faust_compat import install as install_compat
from streams.fl_sync import FlClient, GlobalFollower, start_client
from streams.garbage import collect_youngest_generation_only
from streams.metrics import WorkerMetrics
from streams.scoring import (
    EntityStore,
    InputRecord,
    LabelRequest,
    OutputRecord,
    PendingBatch,
    Record,
    ScoredStore,
    ScoringPipeline,
    dumps,
)
from streams.settings import FEATURES_TABLE, SCORED_TABLE, WorkerSettings
from streams.topics import (
    committed_offset,
    ensure_topics,
    read_topic,
    settle_partitions,
    watermarks,
    worker_topics,
)

log = logging.getLogger(__name__)

LABEL_ACK = "label:"
"""Prefix of the kind in the waiter key of a routed label's acknowledgement (a fragment's
is the bare kind)."""

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


class BetweenBatches:
    """Changes from other threads (an accepted config from the config follower) applied on
    the worker's event loop, between batches, so a batch is scored and learned under one
    configuration and one model.

    A batch runs synchronously on the loop (``process_batch``, ``learn_batch``), so a loop
    callback can never run inside one: :meth:`submit` puts the change in its slot (the
    newest per slot wins) and asks the loop to apply it; the agents also apply what is
    pending before each batch. Until :meth:`attach` (no batch runs yet: the config replay
    before faust starts) a change is applied at once, in the caller's thread.

    >>> applied = []
    >>> hand = BetweenBatches()
    >>> hand.submit("config", lambda: applied.append(1))  # not attached: at once
    >>> loop = asyncio.new_event_loop()
    >>> hand.attach(loop)
    >>> hand.submit("config", lambda: applied.append(2))
    >>> hand.submit("config", lambda: applied.append(3))  # replaces 2, still pending
    >>> list(applied), hand.apply_pending(), applied
    ([1], 1, [1, 3])
    >>> loop.run_until_complete(asyncio.sleep(0)); loop.close(); applied  # nothing left
    [1, 3]
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, Callable[[], None]] = {}

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on, changes wait for ``loop`` (the one that runs the batches)."""
        with self._lock:  # not while a change is applied at once in another thread
            self._loop = loop

    def submit(self, slot: str, change: Callable[[], None]) -> None:
        """From any thread: run ``change`` on the loop between batches."""
        with self._lock:
            loop = self._loop
            if loop is None:
                change()
                return
            self._pending[slot] = change
        try:
            loop.call_soon_threadsafe(self.apply_pending)
        except RuntimeError:  # the loop is closed: the worker is stopping
            log.info("worker stopping: change %r not applied", slot)

    def apply_pending(self) -> int:
        """On the loop, between batches: apply what is pending; how many changes."""
        if not self._pending:
            return 0
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for change in pending:
            change()
        return len(pending)


@dataclass
class WorkerRuntime:
    """The state shared by the app's agents, timers, web page and config thread."""

    settings: WorkerSettings
    pipeline: ScoringPipeline
    metrics: WorkerMetrics
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    log_gaps: LogGaps = field(init=False)
    between_batches: BetweenBatches = field(default_factory=BetweenBatches)
    fl: FlClient | None = None
    """The federated-learning client (streams.fl_sync), if FL is on."""
    fl_follower: GlobalFollower | None = None

    def __post_init__(self) -> None:
        self.log_gaps = LogGaps((self.settings.transactions_topic, self.settings.labels_topic))

    def apply_config_between_batches(self, config: ConfigDocument) -> None:
        """The config follower's ``on_apply``: the swap happens on the loop, between batches
        (the pipeline swaps the policy and the model's hyper-parameters in one step)."""
        self.between_batches.submit("config", partial(self.pipeline.apply_config, config))

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


class EntityExchange:
    """Features of entities homed on partitions another worker holds (owner routing).

    Each entity's state lives on its home partition (:func:`streams.scoring.home_partition`)
    and only the worker holding that partition of ``R.transactions`` reads or writes it. A
    worker deciding a transaction asks the owners of its other entities: one record a home
    partition a batch on ``R.entity-requests``, carrying that batch's requests in input
    order; the owner applies them (:meth:`ScoringPipeline.apply_requests`: a transaction it
    applied already gets the same fragment), writes the changed state, then answers on
    ``R.entity-fragments`` on the transaction's partition, which the asker holds.

    Both topics are read by a plain consumer outside the group, assigned the partitions
    this worker holds, from their end: nothing there needs an offset. A request or an
    answer lost (a worker restarting, a rebalance) is asked again after ``retry_s``.
    """

    def __init__(self, settings: WorkerSettings, pipeline: ScoringPipeline,
                 retry_s: float = 2.0) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.retry_s = retry_s
        self.requests_topic = settings.topics.entity_requests
        self.fragments_topic = settings.topics.entity_fragments
        self.changelog = settings.changelog_topic(FEATURES_TABLE)
        self.owned: frozenset[int] = frozenset()
        self.waiters: dict[tuple[str, str], asyncio.Future[list[float]]] = {}
        self.out = BatchPublisher(settings.bootstrap)
        self.asked = 0
        self.answered = 0
        self.labels_routed = 0
        self.labels_applied = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._assigned: frozenset[int] | None = None
        self._task: asyncio.Task[None] | None = None

    def holds(self, owned: frozenset[int]) -> None:
        """The partitions of the transactions this worker holds now (their entities)."""
        self.owned = owned
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def everything(self) -> bool:
        """Whether this worker holds every partition: no entity is asked of another."""
        return len(self.owned) >= self.settings.partitions

    async def fetch(self, pending: PendingBatch) -> dict[tuple[str, str], list[float]]:
        """Ask the owners for every fragment ``pending`` requested; wait for all of them."""
        loop = asyncio.get_running_loop()
        futures: dict[tuple[str, str], asyncio.Future[list[float]]] = {}
        for requests in pending.requests.values():
            for request in requests:
                key = (request[3], request[1])
                futures[key] = self.waiters[key] = loop.create_future()
        attempt = 0
        try:
            while True:
                missing = {home: [r for r in requests if not futures[(r[3], r[1])].done()]
                           for home, requests in pending.requests.items()}
                writes: list[Write] = [
                    (home, None, dumps({"v": 1, "kind": "entity-requests", "r": requests}))
                    for home, requests in missing.items() if requests]
                if not writes:
                    break
                if attempt:
                    log.warning("entity fragments not answered in %.0f s: %d asked again",
                                self.retry_s, sum(map(len, missing.values())))
                attempt += 1
                await self.out.publish((self.requests_topic, writes))
                self.asked += len(writes)
                await asyncio.wait([f for f in futures.values() if not f.done()],
                                   timeout=self.retry_s)
        finally:
            for key in futures:
                self.waiters.pop(key, None)
        return {key: future.result() for key, future in futures.items()}

    async def route_labels(self, routed: dict[int, list[LabelRequest]]) -> None:
        """Send the label history of entities homed elsewhere to their owners (one record a
        home partition, ``kind: label-requests``); wait until each is acknowledged, asking
        again after ``retry_s`` (the owner counts a transaction's label once)."""
        loop = asyncio.get_running_loop()
        futures: dict[tuple[str, str], asyncio.Future[list[float]]] = {}
        for requests in routed.values():
            for request in requests:
                key = (request[3], LABEL_ACK + request[1])
                futures[key] = self.waiters[key] = loop.create_future()
        try:
            while True:
                writes: list[Write] = []
                for home, requests in routed.items():
                    missing = [r for r in requests
                               if not futures[(r[3], LABEL_ACK + r[1])].done()]
                    if missing:
                        writes.append((home, None, dumps(
                            {"v": 1, "kind": "label-requests", "r": missing})))
                        self.labels_routed += len(missing)
                if not writes:
                    break
                await self.out.publish((self.requests_topic, writes))
                await asyncio.wait([f for f in futures.values() if not f.done()],
                                   timeout=self.retry_s)
        finally:
            for key in futures:
                self.waiters.pop(key, None)

    async def _assign(self) -> AIOKafkaConsumer:
        consumer = self._consumer
        if consumer is None:
            consumer = self._consumer = AIOKafkaConsumer(
                bootstrap_servers=self.settings.bootstrap, enable_auto_commit=False,
                group_id=None, fetch_max_wait_ms=20)
            await consumer.start()
        # A worker that holds every partition is asked nothing (the others hold none) and
        # asks nothing: it reads no partition. Its polls (50 fetches a second) cost 1.5 %
        # of its loop and as many requests at the broker, per idle worker.
        owned = frozenset() if self.everything else self.owned
        if owned != self._assigned:
            tps = [TopicPartition_(topic, p) for topic in (self.requests_topic,
                                                          self.fragments_topic)
                   for p in sorted(owned)]
            consumer.assign(tps)
            if tps:
                await consumer.seek_to_end(*tps)
            self._assigned = owned
        return consumer

    async def _run(self) -> None:
        while True:
            try:
                consumer = await self._assign()
                if not self._assigned:
                    await asyncio.sleep(0.2)
                    continue
                batches = await consumer.getmany(timeout_ms=200, max_records=2000)
                requests: list[Any] = []
                labels: list[Any] = []
                for tp, records in batches.items():
                    for record in records:
                        doc = orjson.loads(record.value)
                        if tp.topic == self.requests_topic:
                            (labels if doc.get("kind") == "label-requests"
                             else requests).extend(doc["r"])
                            continue
                        answers: list[Any]
                        if doc.get("kind") == "label-acks":
                            answers = [(tx_id, LABEL_ACK + kind, []) for tx_id, kind in doc["a"]]
                        else:
                            answers = doc["f"]
                        for tx_id, kind, values in answers:
                            waiter = self.waiters.get((tx_id, kind))
                            if waiter is not None and not waiter.done():
                                waiter.set_result(values)
                if requests:
                    await self._answer(requests)
                if labels:
                    await self._apply_labels(labels)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving: a lost answer is asked again
                log.error("entity exchange: %r", exc, exc_info=exc)
                await asyncio.sleep(1.0)

    async def _answer(self, requests: list[Any]) -> None:
        """Apply the requests, write the state they changed, then answer."""
        replies = self.pipeline.apply_requests(requests)
        self.answered += len(requests)
        await self._reply("entity-fragments", "f", replies)

    async def _apply_labels(self, requests: list[Any]) -> None:
        """Apply routed labels, write the state they changed, then acknowledge them."""
        acks = self.pipeline.apply_label_requests(requests)
        self.labels_applied += len(requests)
        await self._reply("label-acks", "a", acks)

    async def _reply(self, kind: str, name: str, by_partition: Mapping[int, Any]) -> None:
        """Write the state the requests changed, then the replies to each asking partition:
        the asker must never read a reply whose state is not durable yet."""
        await self.out.publish((self.changelog, self.pipeline.features.drain_encoded()))
        await self.out.publish((self.fragments_topic, [
            (partition, None, dumps({"v": 1, "kind": kind, name: answers}))
            for partition, answers in by_partition.items()]))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()
        await self.out.stop()


class GapFiller:
    """Read offsets that faust skipped straight from Kafka, so none goes undecided.

    faust 0.15 drops (and acks!) events it receives while flow control is paused or with
    a stale generation id, e.g. right after a worker joins the group; the offsets after
    them are then committed and those transactions would never be decided. This keeps the
    next expected offset per partition (from the group's committed offset on first sight)
    and, when a batch jumps ahead, fetches the missing records with a plain consumer and
    processes them first, before the batch (and thus their offsets) is acked. Offsets the
    log holds no record at (``log_gaps``, noted as the records were fetched) are not read.

    A partition's *last* records can be lost the same way (faust's fetch loop stops
    handing over a fetched batch when the flow stops, and resumes without seeking back
    when it restarts at once): no later record then shows the jump. :meth:`check_tail`,
    called while the agent is idle, reads what lies between the next expected offset and
    the high watermark of a partition that has been quiet for ``quiet_s``; :meth:`fill`
    hands those records over first and skips the offsets it already handed over if faust
    delivers them after all.
    """

    def __init__(self, bootstrap: str, group: str, topic: str,
                 log_gaps: LogGaps | None = None, quiet_s: float = 2.0) -> None:
        self.topic = topic
        self.log_gaps = log_gaps if log_gaps is not None else LogGaps((topic,))
        self.next_offset: dict[int, int] = {}
        self.quiet_s = quiet_s
        self.pending: list[InputRecord] = []  # read by check_tail, handed over by fill
        self._quiet_since: dict[int, float] = {}
        self._resets = 0  # a fill that spans a reset must not bring back old positions
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                   "enable.auto.commit": False,
                                   "enable.partition.eof": True,
                                   "isolation.level": "read_committed"})

    def reset(self) -> None:
        """Forget positions (after a rebalance, partitions may have moved)."""
        self.next_offset.clear()
        self.log_gaps.clear()
        self.pending.clear()
        self._quiet_since.clear()
        self._resets += 1

    def _start_of(self, partition: int) -> int:
        tp = TopicPartition(self.topic, partition)
        committed = committed_offset(self._consumer, tp)
        if committed is not None:
            return committed
        low, _high = watermarks(self._consumer, tp)
        return low

    def _read(self, partition: int, start: int, end: int, timeout: float = 30.0
              ) -> tuple[list[InputRecord], int]:
        """The records of ``partition`` in ``[start, end)``, and the offset up to which the
        log was read: ``end``, less at the end of what is readable (``read_committed``: an
        open transaction's records are not yet), or where ``timeout`` cut the read short."""
        self._consumer.assign([TopicPartition(self.topic, partition, start)])
        out: list[InputRecord] = []
        upto = start
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                msg = self._consumer.poll(1.0)
                if msg is None:
                    continue
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        # every offset before the end of the readable log was read
                        upto = min(end, max(upto, msg.offset() or 0))
                        break
                    continue
                offset = msg.offset() or 0
                if offset >= end:
                    upto = end
                    break
                stamp = msg.timestamp()[1]
                out.append(InputRecord(msg.value(), msg.key(), partition, offset,
                                       stamp / 1000.0 if stamp > 0 else None, self.topic))
                upto = offset + 1
                if offset >= end - 1:
                    break
        finally:
            self._consumer.unassign()
        return out, upto

    def _read_all(self, partition: int, start: int, end: int) -> list[InputRecord]:
        """The records of ``partition`` in ``[start, end)``, all of them however long the
        broker takes (faust handed over ``end``: everything before it is readable)."""
        out: list[InputRecord] = []
        while start < end:
            records, upto = self._read(partition, start, end)
            out.extend(records)
            if upto < end:
                log.warning("reading %s[%d] offsets %d..%d directly stopped at %d; reading "
                            "on", self.topic, partition, start, end - 1, upto)
                if upto == start:  # the broker is away: do not spin
                    time.sleep(0.5)
            start = upto
        return out

    async def check_tail(self, highwaters: Mapping[int, int], now: float | None = None
                         ) -> bool:
        """Read the records between the next expected offset and the high watermark of
        each partition in ``highwaters`` (partition -> high watermark: the ones this worker
        holds) that has handed over nothing for ``quiet_s``; True if any are now pending.

        A quiet partition is read at most once per ``quiet_s``; one whose tail holds only
        transaction markers is then known to end there and is not read again.
        """
        now = time.monotonic() if now is None else now
        resets = self._resets
        for partition, high in highwaters.items():
            since = self._quiet_since.setdefault(partition, now)
            if now - since < self.quiet_s:
                continue
            self._quiet_since[partition] = now
            expected = self.next_offset.get(partition)
            if expected is None:
                expected = await asyncio.to_thread(self._start_of, partition)
                if self._resets != resets:
                    return False
                self.next_offset[partition] = expected
            if high <= expected:
                continue
            missing, upto = await asyncio.to_thread(self._read, partition, expected, high,
                                                    self.quiet_s)
            if self._resets != resets:
                return False
            if missing:
                log.warning("faust never handed over %s[%d] offsets %d..%d; read %d of them "
                            "directly", self.topic, partition, expected, high - 1,
                            len(missing))
                self.pending.extend(missing)
            else:
                # only markers up to ``upto``; an open transaction's records lie beyond it
                # (below the high watermark: faust hands them over once it commits), and so
                # does what a read cut short by a slow broker did not reach
                self.next_offset[partition] = max(expected, upto)
        return bool(self.pending)

    async def fill(self, records: list[Record]) -> tuple[list[Record], int, int]:
        """``records`` with any skipped records of their partitions put before them (and
        the records :meth:`check_tail` read first); how many records were put there, and
        how many reads it took.

        The broker is asked in a thread: these calls block, and the event loop also runs
        the group consumer's heartbeats.
        """
        out: list[Record] = []
        filled = reads = 0
        resets = self._resets
        take_gap = self.log_gaps.take
        next_offset = self.next_offset
        quiet_since = self._quiet_since
        if self.pending:
            pending, self.pending = self.pending, []
            for tail in pending:
                out.append(tail)
                next_offset[tail.partition] = tail.offset + 1
            filled += len(pending)
        now = time.monotonic()
        for rec in records:
            partition = rec.partition
            quiet_since[partition] = now
            expected = next_offset.get(partition)
            if expected is None:
                expected = await asyncio.to_thread(self._start_of, partition)
            if rec.offset < expected and self._resets == resets:
                continue  # handed over already, read directly by check_tail
            if rec.offset > expected:
                empty_from = take_gap(self.topic, partition, rec.offset)
                if empty_from is None or empty_from > expected:  # not all of it is empty
                    reads += 1
                    missing = await asyncio.to_thread(self._read_all, partition, expected,
                                                      rec.offset)
                    log.warning("faust skipped %s[%d] offsets %d..%d; read %d of them "
                                "directly", self.topic, partition, expected, rec.offset - 1,
                                len(missing))
                    out.extend(missing)
                    filled += len(missing)
            out.append(rec)
            if self._resets == resets:
                next_offset[partition] = rec.offset + 1
        return out, filled, reads

    def close(self) -> None:
        self._consumer.close()


EXPIRY_INTERVAL_S = 0.25
"""How often a worker looks for expired state (a dict look-up when nothing is due)."""

EXPIRY_LIMIT = 10_000
"""Index entries (~keys) one expiry looks at per table: a pause of ~10-20 ms, and up to
40,000 keys a second per table (5,000 tx/s of all-new entities write 20,000 entity keys)."""

EXPIRY_BUCKETS = 32
"""Event-time buckets per horizon in the stores' expiry index."""

FL_TICK_S = 1.0
"""How often a worker looks whether a federated update is due."""

FULL_COLLECTION_INTERVAL_S = 3600.0
"""How often a worker runs a full garbage collection (it collects only the youngest
generation otherwise)."""


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
        # the only guarantee: decisions and changelogs are written by BatchPublisher, outside
        # any faust transaction (streams/README.md, "Processing guarantee")
        processing_guarantee="at_least_once",
        stream_buffer_maxsize=4 * settings.batch_size,
        broker_max_poll_records=2 * settings.batch_size,
        producer_max_batch_size=512 * 1024,
        producer_linger=0.002,
        table_standby_replicas=0,
        web_enabled=True,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        **web_settings(settings),  # the HTTP API's: body bound, TLS, the URL peers forward to
    )
    install_compat(app, on_fetched=runtime.log_gaps.fetched)
    pipeline, metrics = runtime.pipeline, runtime.metrics

    def table(name: str, value_type: type | None) -> Any:
        # faust picks the changelog's value serializer from value_type: bytes -> "raw"
        schema: Any = faust.Schema(key_serializer="json",
                                   value_serializer="raw" if value_type is bytes else "json")
        return app.Table(name, partitions=n, schema=schema, value_type=value_type,
                         use_partitioner=False, recovery_buffer_size=10_000)

    # The pipeline writes into the tables' memory stores; the publisher writes the changelog.
    # Values stay the JSON bytes of the changelog (EncodedStore decodes on read).
    # event-time buckets of 1/32 horizon: a key goes at most that long after its horizon
    bucket_s = settings.state_horizon_s / EXPIRY_BUCKETS
    # each entity's state on its home partition's changelog (EntityStore), whatever the
    # partition of the transaction that wrote it
    pipeline.features = EntityStore(*memory_store_maps(table(FEATURES_TABLE, bytes)),
                                    bucket_s, partitions=n)
    pipeline.scored = ScoredStore(*memory_store_maps(table(SCORED_TABLE, bytes)), bucket_s)
    features_changelog = settings.changelog_topic(FEATURES_TABLE)
    scored_changelog = settings.changelog_topic(SCORED_TABLE)
    publisher = BatchPublisher(settings.bootstrap)
    transactions = app.topic(settings.transactions_topic, partitions=n, schema=RawSchema())
    api_publisher = BatchPublisher(settings.bootstrap)  # the API's: its requests' records
    decided = register_api(app, settings, pipeline.scored, api_publisher.publish)
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

    exchange = EntityExchange(settings, pipeline)
    gaps = {topic: GapFiller(settings.bootstrap, settings.app_id, topic, runtime.log_gaps)
            for topic in (settings.transactions_topic, settings.labels_topic)}

    async def check_tail(topic: str) -> bool:
        """While an agent is idle: read the records faust fetched at the end of a quiet
        partition of ``topic`` and never handed over (:meth:`GapFiller.check_tail`)."""
        if app.in_recovery or app.rebalancing:  # the tables are being restored
            return False
        highwaters: dict[int, int] = {}
        try:
            consumer = app.consumer
            for tp in consumer.assignment():
                if tp.topic == topic and (high := consumer.highwater(tp)) is not None:
                    highwaters[tp.partition] = high
        except Exception as exc:  # not assigned yet, or rebalancing
            log.debug("no high watermarks yet: %s", exc)
            return False
        return await gaps[topic].check_tail(highwaters)

    async def forget_positions(sender: Any, assigned: Any, **kwargs: Any) -> None:
        for filler in gaps.values():
            filler.reset()

    app.on_partitions_assigned.connect(forget_positions)  # type: ignore[arg-type]

    async def stop_answering(sender: Any, revoked: Any, **kwargs: Any) -> None:
        # until the new assignment is restored: a partition this worker loses may be
        # restored by another one meanwhile, whose state must not be written from here, and
        # a new one's state is not here yet (requests sent in between are asked again)
        exchange.holds(frozenset())

    app.on_partitions_revoked.connect(stop_answering)  # type: ignore[arg-type]

    async def stop_publisher(sender: Any, **kwargs: Any) -> None:
        await exchange.stop()
        await publisher.stop()
        await api_publisher.stop()

    app.on_before_shutdown.connect(stop_publisher)  # type: ignore[arg-type]

    def hold_assigned() -> None:
        """The entities this worker owns: those homed on its partitions of transactions
        (all of them: None, no hop), as assigned now (before each batch)."""
        exchange.holds(frozenset(tp.partition for tp in app.consumer.assignment()
                                 if tp.topic == settings.transactions_topic))
        pipeline.owned = None if exchange.everything else exchange.owned

    async def reindex_restored(sender: Any, **kwargs: Any) -> None:
        # the tables were restored from their changelogs (whose order is not event time):
        # the next batch or expiry rebuilds the event-time index from the values
        pipeline.reindex_pending = True
        # the entities this worker owns now, restored: answer the requests for them
        hold_assigned()

    app.on_rebalance_complete.connect(reindex_restored)  # type: ignore[arg-type]

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

        async def on_idle() -> bool:
            if unconfirmed:
                await confirm()
            return await check_tail(settings.transactions_topic)

        try:
            runtime.between_batches.attach(asyncio.get_running_loop())
            async for messages in message_batches(app, stream, settings.batch_size, on_idle):
                runtime.between_batches.apply_pending()
                batch, filled, reads = await gaps[settings.transactions_topic].fill(
                    records_of(messages))
                if reads:
                    metrics.count("qsfraud_gap_reads_total", reads,
                                  topic=settings.transactions_topic)
                if filled:
                    metrics.count("qsfraud_refetched_total", filled)
                hold_assigned()
                if exchange.everything:  # one worker: every entity is here, no hop
                    result = pipeline.process_batch(batch)
                else:
                    pending = pipeline.begin_batch(batch)
                    fragments = await exchange.fetch(pending) if pending.requests else {}
                    result = pipeline.finish_batch(pending, fragments)
                decided.batch_decided()  # the API answers from `scored` once it is durable
                # State first: once a decision is visible, the `scored` entry that answers a
                # redelivery of its transaction must already be durable, or a crash in between
                # would let the redelivery be decided afresh (and differently). This flush also
                # confirms the previous batch's decisions, which were on their way meanwhile.
                for topic, writes in state_writes():
                    await out.produce(topic, writes)
                await confirm()
                decided.batch_durable()
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
        runtime.between_batches.attach(asyncio.get_running_loop())

        async def on_idle() -> bool:
            return await check_tail(settings.labels_topic)

        async for messages in message_batches(app, stream, settings.batch_size, on_idle):
            runtime.between_batches.apply_pending()
            batch, filled, reads = await gaps[settings.labels_topic].fill(
                records_of(messages))
            if filled:
                metrics.count("qsfraud_refetched_total", filled)
            if reads:
                metrics.count("qsfraud_gap_reads_total", reads, topic=settings.labels_topic)
            hold_assigned()  # the owners as of now: a label written for a revoked
            # partition's entity would be lost to its new owner, which restored it already
            result = pipeline.learn_batch(batch)
            if result.routed:  # before this batch's offsets and `scored` flags are written
                await exchange.route_labels(result.routed)
            if runtime.fl is not None:
                runtime.fl.learned(result.examples)
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

    fl = runtime.fl
    if fl is not None:
        @app.timer(interval=FL_TICK_S)
        async def fl_sync() -> None:
            # sealed here, on the loop: between batches, so no batch changes the model meanwhile
            due = fl.next_update(pipeline.model, pipeline.config.fl_sync_interval_s)
            if due is None:
                return
            try:
                await publisher.publish((settings.fl_updates_topic, [(0, None, due[1])]))
            except (KafkaException, TimeoutError) as exc:  # sealed afresh at the next tick
                log.warning("FL update for round %d not sent: %s", due[0], exc)
                return
            fl.sent(due[0])

    @app.timer(interval=EXPIRY_INTERVAL_S)
    async def expire() -> None:
        if app.in_recovery or app.rebalancing:  # the tables are being restored
            return
        started = time.perf_counter()
        features_gone, scored_gone = pipeline.expire(
            settings.state_horizon_s, settings.scored_max_entries, EXPIRY_LIMIT)
        if features_gone or scored_gone:
            await publisher.publish(*state_writes())  # tombstones: compaction drops the keys
            metrics.count("qsfraud_expired_total", features_gone, table=FEATURES_TABLE)
            metrics.count("qsfraud_expired_total", scored_gone, table=SCORED_TABLE)
            log.info("expired %d entities and %d scored transactions older than %.0f s of "
                     "event time in %.0f ms", features_gone, scored_gone,
                     settings.state_horizon_s, (time.perf_counter() - started) * 1000)

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
        m.gauge("qsfraud_feature_entities", len(pipeline.features))
        m.gauge("qsfraud_entity_requests_sent", exchange.asked)
        m.gauge("qsfraud_entity_requests_answered", exchange.answered)
        m.gauge("qsfraud_label_requests_sent", exchange.labels_routed)
        m.gauge("qsfraud_label_requests_applied", exchange.labels_applied)
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

    return app


def restore_model(settings: WorkerSettings) -> RiskModel | RiverModel | None:
    """The newest valid model checkpoint of the retailer, or None."""
    return model_from_checkpoints(
        read_topic(settings.bootstrap, settings.checkpoints_topic), settings.retailer
    )


def prepare(settings: WorkerSettings) -> tuple[WorkerRuntime, ConfigFollower]:
    """Topics, checkpoint, config replay, the FL client: everything before faust starts.
    The runtime's settings have the partition count the topics have
    (:func:`settle_partitions`)."""
    settings = settle_partitions(settings)
    ensure_topics(settings.bootstrap, worker_topics(settings))
    RiskModel.warm_up()  # before the worker takes input, not during its first batch
    model = restore_model(settings)
    if model is not None:
        log.info("model restored from checkpoint: %s+%d", model.version, model.n)
    debezium = DebeziumDecoder.load(settings.retailer, settings.mapping,
                                    strict=settings.input_format == "debezium")
    pipeline = ScoringPipeline(settings.retailer, model=model, debezium=debezium,
                               bounds=settings.input_bounds)
    runtime = WorkerRuntime(settings, pipeline, WorkerMetrics(settings.retailer))
    registry = None
    if settings.trust_registry is not None and settings.trust_registry.exists():
        registry = load_registry(settings.trust_registry)
    else:
        log.warning("no trust registry at %s: every config document will be rejected",
                    settings.trust_registry)
    applier = ConfigApplier(
        settings.retailer, registry, on_apply=runtime.apply_config_between_batches,
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
    if settings.fl_enabled:
        runtime.fl, runtime.fl_follower = start_client(settings, pipeline, runtime.metrics,
                                                       runtime.between_batches.submit)
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
    check_versions()  # before anything else: the overrides were written for exact versions
    runtime, follower = prepare(settings)
    app = create_app(runtime.settings, runtime)
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
        if runtime.fl_follower is not None:
            runtime.fl_follower.stop()
    return 0


__all__ = ["BatchPublisher", "BetweenBatches", "WorkerRuntime", "create_app", "prepare",
           "run_worker"]
