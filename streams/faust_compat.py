"""Everything qsfraud replaces in, or reads from, faust-streaming, mode-streaming and aiokafka
private code: the one seam between the worker (:mod:`streams.app`) and those libraries.

The worker's speed comes from cutting faust's per-message machinery (see streams/README.md,
"Throughput and latency"): a drain loop and ``getmany`` without per-message tasks, the
consumer on the worker's loop instead of a second thread, input messages queued without
decoding, batches taken straight off a channel queue, two private consumer settings. Each of
those copies or overrides code written for exactly the versions in :data:`PINNED_VERSIONS`:

- :func:`check_versions` runs when a worker starts and refuses other versions in one line;
- every override is marked :func:`replaces` (or :func:`follows`, for code that reproduces
  what an upstream function does without overriding it) with the SHA-256 of the upstream
  source it was written against; tests/streams/test_faust_compat.py recomputes each one, so
  an upgrade that changes any of them fails there, naming the function to review.

What the app uses: :func:`install` (the consumer classes, and a hook that sees every
fetched batch), :class:`RawSchema` for the input topics, :func:`message_batches` in the
agents, :func:`aiohttp_router` for the HTTP API's routes.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from importlib import metadata
from typing import Any, Final, TypeVar

import faust
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode import Service
from mode.utils.futures import maybe_async

PINNED_VERSIONS: Final = {
    "faust-streaming": "0.15.3",
    "mode-streaming": "0.7.1",
    "aiokafka": "0.14.0",
}
"""The exact versions this module was written and fingerprinted against (pinned in
pyproject.toml too)."""

UPSTREAM: dict[str, str] = {}
"""``"module:Qualified.name"`` of each upstream function this module replaces or follows ->
the SHA-256 of its source (``inspect.getsource``) in the pinned versions."""

_F = TypeVar("_F")


class IncompatibleVersions(RuntimeError):
    """The installed faust/mode/aiokafka are not the versions this module was written for."""


def check_versions(expected: dict[str, str] = PINNED_VERSIONS) -> None:
    """Raise :class:`IncompatibleVersions` (one line: installed vs expected, and the fix)
    unless every package of ``expected`` is installed at exactly that version.

    >>> check_versions()
    >>> check_versions({"faust-streaming": "0.0.1"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    streams.faust_compat.IncompatibleVersions: ... for faust-streaming==0.0.1, installed ...
    """
    wrong = {}
    for name, version in expected.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "(none)"
        if installed != version:
            wrong[name] = installed
    if wrong:
        raise IncompatibleVersions(
            "streams/faust_compat.py was written for "
            + ", ".join(f"{n}=={expected[n]}" for n in wrong)
            + ", installed " + ", ".join(f"{n}=={v}" for n, v in wrong.items())
            + ": install the pinned versions (pip install -e .) or review "
            "streams/faust_compat.py and its fingerprints for the installed ones")


def upstream_object(target: str) -> Any:
    """The object ``"module:Qualified.name"`` names."""
    module, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def fingerprint(target: str) -> str:
    """SHA-256 of the installed source of ``target`` (``"module:Qualified.name"``)."""
    return hashlib.sha256(inspect.getsource(upstream_object(target)).encode()).hexdigest()


def _mark(target: str, sha256: str) -> Callable[[_F], _F]:
    if UPSTREAM.setdefault(target, sha256) != sha256:
        raise ValueError(f"two fingerprints recorded for {target}")

    def mark(obj: _F) -> _F:
        return obj

    return mark


replaces = _mark
"""``@replaces("module:Class.method", sha256)``: this overrides that upstream method,
written against the source with that SHA-256."""

follows = _mark
"""``@follows("module:Class.method", sha256)``: this reproduces what that upstream code does
(its checks, the private structures it fills), written against the source with that SHA-256."""


ON_FETCHED: Final = "qsfraud_on_fetched"
"""The app attribute :meth:`Consumer.getmany` calls with ``(topic, partition, records)`` for
each fetched batch of records, before faust hands any over (and drops any)."""

OnFetched = Callable[[str, int, Sequence[Any]], None]


def install(app: faust.App, on_fetched: OnFetched | None = None) -> None:
    """Use this module's consumer in ``app``; ``on_fetched`` sees every fetched batch."""
    check_versions()
    app.transport.Consumer = Consumer  # type: ignore[misc]
    setattr(app, ON_FETCHED, on_fetched)


@follows("faust.streams:Stream._py_aiter",
         "3a48ee257a65435b482d51edb74f2993a67867949b1ef89b49fea893769e0614")
@follows("faust.channels:Channel.__aiter__",
         "f0fdf0d7125731341039a6de582139901d8fa30d430d558bbd0cb24d1cb1365a")
async def message_batches(
    app: faust.App, stream: Any, max_messages: int,
    on_idle: Callable[[], Awaitable[bool | None]] | None = None, idle_interval: float = 1.0,
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
    whenever the queue is empty, before waiting for the next message, and again every
    ``idle_interval`` seconds while none comes; when it returns True an empty batch is
    yielded (the caller has records of its own to process: :class:`GapFiller`'s). Messages faust's
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
        try:
            if on_idle is not None and queue.empty():
                if await on_idle():
                    yield []  # the caller has something of its own to process
                    continue
                try:
                    messages = [await asyncio.wait_for(queue.get(), idle_interval)]
                except TimeoutError:
                    continue  # still idle: on_idle again
            else:
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


@follows("faust.stores.memory:Store.__post_init__",
         "e59c82f3785458b2c6bb8179a01b57270be3edf167615a3f6508f102b173baa2")
@follows("faust.stores.memory:Store.apply_changelog_batch",
         "71863e3cd727aac2001c4f19a393c637275eab36056c9a2d395ed1c7528e7647")
@follows("faust.stores.memory:Store._create_batch_iterator",
         "b082c8bcc040382347025bd5b08d31700b2e6b1d2c0232f1de551f1b5495d1ed")
@follows("faust.stores.memory:Store.on_recovery_completed",
         "a00bef343e139602606996e88809e62731a9113691ae678095266a52e0e0b013")
def memory_store_maps(table: Any) -> tuple[dict[Any, Any], dict[Any, int]]:
    """A faust table's memory store as its two dicts: key -> value, and key -> partition
    (private: which partition's changelog a key belongs to; faust fills it on recovery and
    drops the keys of partitions it no longer holds). The worker writes both directly and
    writes the changelog itself (faust's per-key ``send_soon`` was the bottleneck)."""
    store = table.data
    return store.data, store._key_partition


@follows("faust.web.drivers.aiohttp:Web.__init__",
         "52b00c1bd653c82d64519cfc55285b6ca5973a929129d1809c4aff79e262fc2f")
def aiohttp_router(app: faust.App) -> Any:
    """The router of the aiohttp application behind faust's web server (``Web.web_app``):
    routes added there are served without faust's view dispatch and sensor calls."""
    from faust.web.drivers.aiohttp import Web

    server = app.web
    if not isinstance(server, Web):
        raise TypeError(f"faust's web driver must be aiohttp, not {type(server).__name__}")
    return server.web_app.router


FETCH_MAX_WAIT_MS = 50
"""How long a fetch may wait at the broker for new records (faust hard-codes 1,500 ms)."""


class RawSchema(faust.Schema):
    """Keys and values as the bytes on the wire (faust's ``raw`` serializer), decoded without
    faust's serializer registry: two codec look-ups per message there, ~8 % of a busy
    worker. The pipeline parses (and dead-letters) the bytes itself.

    "Decoding" hands over faust's consumer message itself, with no event around it: what
    the drain loop (:meth:`Consumer._drain_messages`) queues too, so the agents'
    :func:`message_batches` meet one kind of item whichever way it came.
    """

    def __init__(self) -> None:
        super().__init__(key_serializer="raw", value_serializer="raw")

    @replaces("faust.serializers.schemas:Schema.compile",
              "d46eec5ce3195b2c6752cb860a10946cee66ddf6a955f2ea44ac1568c0ecb9ad")
    def compile(self, app: Any, **kwargs: Any) -> Any:
        async def decode(message: Any, *, propagate: bool = False) -> Any:
            return message

        return decode


class ConsumerThreadOnLoop(faust_aiokafka.AIOKafkaConsumerThread):
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

    @replaces("mode.threads:ServiceThread.start",
              "f11841038a033a05f2523901082d51dec9b4ef42b226ab2dd4b6223078a10680")
    async def start(self) -> None:
        self._thread_started.set()
        await Service.start(self)

    @replaces("mode.threads:ServiceThread.stop",
              "32d026539c3665b2ceaa8dcdc0c3f49195ceb5b6059947e7104a4b258d1d4efd")
    async def stop(self) -> None:
        if self._started.is_set():
            await Service.stop(self)

    @follows("faust.transport.drivers.aiokafka:AIOKafkaConsumerThread.on_thread_stop",
             "8dfc004e258b6c25edd2b0986531aea0fc75dd5cef0d0718c87848af33c6f757")
    async def on_stop(self) -> None:
        if self._consumer is not None:  # what faust's thread does as it ends
            await self._consumer.stop()

    @replaces("mode.threads:QueueServiceThread.call_thread",
              "479edda75b54734b48dabbb33071259949ded0a6f9fa6f82e81afdc42aff6e55")
    async def call_thread(self, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await maybe_async(fun(*args, **kwargs))

    @replaces("mode.threads:QueueServiceThread.cast_thread",
              "32489f1ee4f80e6724e33509ebffcb62c4658a7d854eb26bdd96e44533d480a1")
    async def cast_thread(self, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.add_future(maybe_async(fun(*args, **kwargs)))

    @replaces("mode.threads:ServiceThread._stopped_set",
              "af9b1ff7781223c29f6e95d47466ee241fa6fedcf31abb786200b2013f19bba0")
    def _stopped_set(self) -> None:
        self._stopped.set()

    @replaces("mode.threads:ServiceThread.set_shutdown",
              "ada84bf0cade97be57b5c70dd5d953ba339c3b84a76e424c8855d9cfd9a17938")
    def set_shutdown(self) -> None:
        self._shutdown.set()

    @replaces("mode.threads:ServiceThread._stop_children",
              "1477900e8ea2bc23cc39cb7b1fb6eab0d49987a423edc43dff418c7ba0c495fe")
    async def _stop_children(self) -> None:
        await self._default_stop_children()

    @replaces("mode.threads:ServiceThread._stop_futures",
              "a9356c5dd8513aae2257795deaef8939e824820c404af1c20c16270640e51c9a")
    async def _stop_futures(self) -> None:
        await self._default_stop_futures()

    @replaces("mode.threads:ServiceThread._stop_exit_stacks",
              "566cabf54f47645cc2ce3e3fbfa6ff05f78233a09247e674af406731907b01fd")
    async def _stop_exit_stacks(self) -> None:
        await self._default_stop_exit_stacks()

    @follows("aiokafka.consumer.consumer:AIOKafkaConsumer.__init__",
             "01506f316191f7c99c785bec915756d1560029a6fad75cba6f4da71e343a8163")
    @follows("aiokafka.consumer.consumer:AIOKafkaConsumer.start",
             "2f1ba70443327538800d348e61042cdedd5a5e6306f40ebe1a06dddba7494c45")
    @replaces("faust.transport.drivers.aiokafka:AIOKafkaConsumerThread._create_worker_consumer",
              "c2701bfc3e6f6cad95c2be36d6a255a86e2c57d18d36cc1082b5fb5c482d99d7")
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


class Consumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer with :class:`ConsumerThreadOnLoop`, a leaner ``getmany``
    (which also calls the app's :data:`ON_FETCHED` hook) and a leaner drain loop."""

    @replaces("faust.transport.drivers.aiokafka:Consumer._new_consumer_thread",
              "0870ec53dea75083995e3565c0f0a25a1c63ecceaeb238e92e2585e3623af5a9")
    def _new_consumer_thread(self) -> ConsumerThreadOnLoop:
        return ConsumerThreadOnLoop(self, loop=self.loop, thread_loop=self.loop,
                                    beacon=self.beacon)

    @replaces("faust.transport.consumer:Consumer.getmany",
              "4b168d84882a70d6e3e2f9804430a63b92f8fd117d3187cbb4aeb54305bda34e")
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
        fetched: OnFetched | None = getattr(app, ON_FETCHED, None)
        if fetched is not None:
            for tp, fetched_records in records.items():  # what is dropped below too
                fetched(tp.topic, tp.partition, fetched_records)
        to_message = self._to_message
        for tp, record in self.scheduler.iterate(records):
            if not self.flow_active or app.consumer_generation_id != generation:
                break
            if active is None or tp in active or tp in buffered:
                yield tp, to_message(tp, record)

    @follows("faust.transport.conductor:ConductorCompiler.build",
              "837cf521368c1ee4b22c235a2b137f665eca03d0e3e01b5ddedb65232ee73bf2")
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

    @replaces("faust.transport.consumer:Consumer._drain_messages",
              "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417")
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
