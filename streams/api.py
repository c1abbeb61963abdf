"""The worker's HTTP API, on faust's web server next to ``/metrics``: decision lookup, score
before commit, labels. See docs/api/README.md.

- ``GET /v1/decisions/{tx_id}?customer_id=&wait_ms=``: the decision from the ``scored``
  table of the worker that owns the transaction's partition (``murmur2(customer_id) % N``,
  the partitioner of the CDC and the Java clients); another worker forwards the request to
  it (faust's group protocol tells every worker the others' URLs and partitions), or with
  ``redirect=1`` answers 307 to it.
- ``POST /v1/score``: a canonical transaction, validated as the worker's input is, produced
  to ``<R>.transactions`` keyed by ``customer_id``; the decision the owner makes of it, when
  it has made it (the same path as the CDC's records: no second scoring path).
- ``POST /v1/labels``: labels validated all at once, then published to ``<R>.labels`` keyed
  by the transaction's ``customer_id``.

Every endpoint but ``/health`` (and ``/metrics``) needs a bearer token whose SHA-256 is in the
tokens file (:class:`TokenStore`, re-read when it changes). Errors are
``{"error": {"code", "message", "field"?}}``.

>>> partition_of("c1", 4), partition_of("c2", 4)  # the Java clients' murmur2 partitioner
(3, 1)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlencode

import aiohttp
import faust
import orjson
from aiohttp import web
from aiokafka.partitioner import murmur2

from fraud.schema import Label, SchemaError, Transaction
from streams.faust_compat import aiohttp_router
from streams.scoring import BadRecord, ScoredStore, dumps, parse_transaction
from streams.settings import WorkerSettings

log = logging.getLogger(__name__)

API_VERSION: Final = "1.0.0"
FORWARDED: Final = "X-Qsfraud-Forwarded"
"""Set on a request one worker forwards to another: the owner answers it, never forwards it
again (during a rebalance two workers may each think the other is the owner)."""
TIMINGS: Final = "X-Qsfraud-Timings"
"""A ``POST /v1/score`` answer's header: epoch seconds at which the worker's handler was
entered, the request validated, its record acknowledged by Kafka, the state of the batch
that decided it acknowledged (when this worker decided it) and the answer ready
(``entered=...,validated=...,acked=...,durable=...,answered=...``)."""
MAX_LABELS: Final = 10_000
"""Labels in one ``POST /v1/labels``."""
TOKENS_VERSION: Final = 1
_BAD_CHARS: Final = re.compile("[\x00\ud800-\udfff]")
_HEX64: Final = re.compile("[0-9a-f]{64}")
JSON_TYPE: Final = "application/json"


def partition_of(customer_id: str, partitions: int) -> int:
    """The partition of ``<R>.transactions`` (and ``<R>.labels``) a key goes to: murmur2 as
    the Java clients, aiokafka and qsfraud's CDC hash it."""
    return (murmur2(customer_id.encode()) & 0x7FFFFFFF) % partitions


class ApiError(Exception):
    """An answer other than success: its status and the body's ``error`` object."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def response(self) -> web.Response:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return json_response({"error": error}, self.status, self.headers)


def json_response(value: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type=JSON_TYPE,
                        headers=headers)


@dataclass(frozen=True)
class TokenEntry:
    retailer_id: str
    sha256: bytes
    name: str


class TokenStore:
    """The API tokens, from a JSON file read at start and again whenever it changes (its
    inode, size or modification time): rotation without a restart.

    The file holds SHA-256 digests only, never a token::

        {"v": 1, "tokens": [{"retailer_id": "acme", "sha256": "<hex>", "name": "checkout"}]}

    A file that cannot be read or is not valid keeps the tokens read before (logged).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "tokens.json"
    >>> _ = path.write_text(json.dumps({"v": 1, "tokens": [{"retailer_id": "acme",
    ...     "sha256": hashlib.sha256(b"s3cret").hexdigest()}]}))
    >>> store = TokenStore(path)
    >>> store.retailer_of("s3cret"), store.retailer_of("guess")
    ('acme', None)
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: tuple[TokenEntry, ...] = ()
        self._seen: tuple[int, int, int] | None = None
        self.refresh()

    def refresh(self) -> None:
        """Re-read the file if it changed since the last read."""
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._seen is not None:
                log.error("API tokens file %s: %s; keeping the tokens read before",
                          self.path, exc)
                self._seen = None
            return
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            self._entries = parse_tokens(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            log.error("API tokens file %s not loaded: %s; keeping the %d tokens read before",
                      self.path, exc, len(self._entries))
            return
        log.info("API tokens: %d loaded from %s", len(self._entries), self.path)

    def retailer_of(self, token: str) -> str | None:
        """The retailer whose token ``token`` is, or None. Compares with every entry in
        constant time (no early exit on a match)."""
        self.refresh()
        digest = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.sha256):
                found = entry.retailer_id
        return found

    def __len__(self) -> int:
        return len(self._entries)


def parse_tokens(data: bytes) -> tuple[TokenEntry, ...]:
    """The entries of a tokens file; ValueError naming what is wrong.

    >>> parse_tokens(b'{"v": 1, "tokens": [{"retailer_id": "acme", "sha256": "ab"}]}')
    Traceback (most recent call last):
    ...
    ValueError: tokens[0].sha256: expected 64 lowercase hex digits (the SHA-256 of the token)
    """
    try:
        doc = json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(doc, dict) or doc.get("v") != TOKENS_VERSION:
        raise ValueError(f"expected an object with \"v\": {TOKENS_VERSION}")
    items = doc.get("tokens")
    if not isinstance(items, list):
        raise ValueError("tokens: expected a list")
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"tokens[{i}]: expected an object")
        retailer, digest = item.get("retailer_id"), item.get("sha256")
        if not isinstance(retailer, str) or not retailer:
            raise ValueError(f"tokens[{i}].retailer_id: expected a retailer id")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ValueError(f"tokens[{i}].sha256: expected 64 lowercase hex digits (the "
                             "SHA-256 of the token)")
        entries.append(TokenEntry(retailer, bytes.fromhex(digest), str(item.get("name", ""))))
    return tuple(entries)


class DecisionFeed:
    """Waits for a transaction's decision in this worker's ``scored`` table, answering only
    with a decision whose ``scored`` entry is durable (the worker's rule: a decision is never
    visible before the entry that answers a redelivery of its transaction is acknowledged).

    The decide agent calls :meth:`batch_decided` after a batch is decided (its entries are
    in the table, not yet written) and :meth:`batch_durable` once they are acknowledged;
    both run on the worker's loop, as the waiters do, so an entry seen while no batch is in
    between was written by an acknowledged batch. :meth:`batch_durable` looks up each
    waited-for ``tx_id`` (a dict look-up each) and wakes only the waiters of those found.
    """

    RECHECK_S: Final = 1.0
    """Waiters look again this often anyway (a restore from the changelog wakes none)."""

    def __init__(self, scored: ScoredStore) -> None:
        self.scored = scored
        self._in_flight = False
        self._waiting: dict[str, list[asyncio.Future[float]]] = {}

    def batch_decided(self) -> None:
        self._in_flight = True

    def batch_durable(self) -> None:
        self._in_flight = False
        if not self._waiting:
            return
        data = self.scored.data
        now = time.time()
        for tx_id in [t for t in self._waiting if t in data]:
            for waiter in self._waiting.pop(tx_id):
                _wake(waiter, now)

    def decision(self, tx_id: str) -> bytes | None:
        """The decision record of ``tx_id`` if its entry is durable: the bytes the worker
        wrote to ``<R>.decisions`` (and writes again for a redelivery)."""
        return None if self._in_flight else self._recorded(tx_id)

    def _recorded(self, tx_id: str) -> bytes | None:
        raw = self.scored.data.get(tx_id)
        return None if raw is None else dumps(orjson.loads(raw)["d"])

    async def wait(self, tx_id: str, timeout_s: float,
                   stamps: dict[str, float] | None = None) -> bytes | None:
        """The decision of ``tx_id`` as soon as there is one, or None after ``timeout_s``;
        ``stamps["durable"]``: when the batch that woke this waiter was acknowledged.

        A future woken by :meth:`batch_durable` or by a timer (``call_at``, not
        ``asyncio.wait_for``: that one costs a task and a timeout context on every request,
        5 % of a worker serving 200 requests a second)."""
        found = self.decision(tx_id)
        if found is not None or timeout_s <= 0:
            return found
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            waiter: asyncio.Future[float] = loop.create_future()
            waiters = self._waiting.setdefault(tx_id, [])
            waiters.append(waiter)
            timer = loop.call_at(min(deadline, loop.time() + self.RECHECK_S), _wake, waiter,
                                 0.0)
            try:
                durable = await waiter
            finally:
                timer.cancel()
                if waiter in waiters:  # not woken by batch_durable, which pops the list
                    waiters.remove(waiter)
                    if not waiters and self._waiting.get(tx_id) is waiters:
                        del self._waiting[tx_id]
            # Woken by batch_durable: the entry was durable then, whatever batch is in
            # flight by now (a later batch never changes a transaction's decision). Asking
            # `decision` instead starved waiters while batches came back to back: each
            # woken waiter found the next batch in flight and waited again (measured: 45
            # requests of a 200/s burst answered together, up to 190 ms late).
            found = self._recorded(tx_id) if durable else self.decision(tx_id)
            if found is not None and durable and stamps is not None:
                stamps["durable"] = durable
            if found is not None or loop.time() >= deadline:
                return found


def _wake(waiter: asyncio.Future[float], durable: float) -> None:
    """``durable``: when the batch was acknowledged (0.0 from a timer)."""
    if not waiter.done():
        waiter.set_result(durable)


Write = tuple[int, bytes | None, bytes | None]
"""A record to write: partition, key, value."""
Publish = Callable[..., Awaitable[None]]
"""``publish(*(topic, records))``: writes every record and returns once all are
acknowledged (:meth:`streams.app.BatchPublisher.publish`)."""


class GroupPublisher:
    """Requests' records written together: whatever requests queued while the previous
    write was in flight goes out in the next one (a group commit), so 200 requests a second
    make a few produce requests, not 200 batches queued one behind another per partition.

    ``write`` returns once the record is acknowledged, or raises what the write raised.
    """

    def __init__(self, publish: Publish) -> None:
        self.publish = publish
        self._queued: list[tuple[str, Write, asyncio.Future[None]]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def write(self, topic: str, records: Sequence[Write]) -> None:
        if not records:
            return
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run())
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        futures = []
        for record in records:
            future: asyncio.Future[None] = loop.create_future()
            self._queued.append((topic, record, future))
            futures.append(future)
        self._wake.set()
        await asyncio.gather(*futures)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            queued, self._queued = self._queued, []
            if not queued:
                continue
            by_topic: dict[str, list[Write]] = {}
            for topic, record, _ in queued:
                by_topic.setdefault(topic, []).append(record)
            try:
                await self.publish(*by_topic.items())
            except Exception as exc:  # each request answers with it (503)
                for _, _, future in queued:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, _, future in queued:
                    if not future.done():
                        future.set_result(None)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class Api:
    """The request handlers of one worker (retailer ``settings.retailer``)."""

    def __init__(self, app: faust.App, settings: WorkerSettings, feed: DecisionFeed,
                 publish: Publish) -> None:
        self.app = app
        self.settings = settings
        self.feed = feed
        self.publisher = GroupPublisher(publish)
        self.tokens = TokenStore(settings.api_tokens)
        self.self_url = str(app.conf.canonical_url)
        self._client: aiohttp.ClientSession | None = None

    # -- the checks every request goes through

    def authorize(self, request: web.Request) -> None:
        """401 without a known token, 403 for another retailer's token."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="qsfraud"'}
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "a bearer token is required "
                           "(Authorization: Bearer <token>)", headers=challenge)
        retailer = self.tokens.retailer_of(token.strip())
        if retailer is None:
            raise ApiError(401, "unauthorized", "unknown token", headers=challenge)
        if retailer != self.settings.retailer:
            raise ApiError(403, "forbidden", f"this token is not {self.settings.retailer!r}'s")

    def check_retailer(self, retailer: str | None, field: str) -> None:
        if retailer is not None and retailer != self.settings.retailer:
            raise ApiError(404, "unknown_retailer",
                           f"no retailer {retailer!r} here (this worker serves "
                           f"{self.settings.retailer!r})", field)

    def wait_ms(self, request: web.Request, default: int) -> int:
        text = request.query.get("wait_ms")
        if text is None:
            return default
        limit = self.settings.api_max_wait_ms
        if not (text.isascii() and text.isdigit()) or int(text) > limit:
            raise ApiError(422, "invalid", f"wait_ms: an integer from 0 to {limit}",
                           "wait_ms")
        return int(text)

    async def body(self, request: web.Request) -> bytes:
        limit = self.settings.api_max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, "too_large", f"the body is larger than {limit} bytes")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, "too_large", f"the body is larger than {limit} bytes") from None

    # -- routing to the owner of a partition

    def owner_of(self, partition: int) -> str | None:
        """The URL of the worker whose partition ``partition`` of ``<R>.transactions`` is,
        from the assignment faust's group protocol gave every member; None if unknown."""
        topic = self.settings.transactions_topic
        for url, topics in self.app.router.external_topics_metadata().items():
            if partition in topics.get(topic, ()):
                return str(url)
        return None

    async def lookup(self, request: web.Request, tx_id: str, customer_id: str,
                     wait_ms: int, stamps: dict[str, float] | None = None) -> bytes | None:
        """The decision of ``tx_id`` from the worker that owns it (this one or another),
        waiting up to ``wait_ms``; None if there is none by then."""
        owner = self.owner_of(partition_of(customer_id, self.settings.partitions))
        if owner == self.self_url:
            return await self.feed.wait(tx_id, wait_ms / 1000, stamps)
        if owner is None or request.headers.get(FORWARDED):
            raise ApiError(503, "unavailable", "the partitions are being reassigned; retry",
                           headers={"Retry-After": "1"})
        return await self.forward(request, owner, tx_id, customer_id, wait_ms)

    async def forward(self, request: web.Request, owner: str, tx_id: str, customer_id: str,
                      wait_ms: int) -> bytes | None:
        if self._client is None:
            self._client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                ssl=client_ssl_context(self.settings) or True))  # True: the system's CAs
        url = f"{owner.rstrip('/')}/v1/decisions/{quote(tx_id, safe='')}"
        headers = {"Authorization": request.headers.get("Authorization", ""), FORWARDED: "1"}
        params = {"customer_id": customer_id, "wait_ms": str(wait_ms)}
        timeout = aiohttp.ClientTimeout(total=wait_ms / 1000 + 5)
        try:
            async with self._client.get(url, params=params, headers=headers,
                                        timeout=timeout) as response:
                body = await response.read()
                if response.status == 200:
                    return body
                if response.status == 404 and b'"not_found"' in body:
                    return None
                raise ApiError(response.status, *_error_of(body))
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("forwarding %s to %s failed: %r", tx_id, owner, exc)
            raise ApiError(503, "unavailable", "the worker that owns this transaction did "
                           "not answer; retry", headers={"Retry-After": "1"}) from None

    # -- the endpoints

    async def get_decision(self, request: web.Request, tx_id: str) -> web.Response:
        self.authorize(request)
        self.check_retailer(request.query.get("retailer_id"), "retailer_id")
        customer_id = request.query.get("customer_id", "")
        if not customer_id:
            raise ApiError(422, "invalid", "customer_id is required: it says which worker "
                           "holds the decision", "customer_id")
        wait_ms = self.wait_ms(request, 0)
        if request.query.get("redirect") == "1" and not request.headers.get(FORWARDED):
            owner = self.owner_of(partition_of(customer_id, self.settings.partitions))
            if owner is not None and owner != self.self_url:
                # the owner serves the same request without redirect=1 (during a rebalance
                # it forwards rather than sending the caller round in circles)
                query = urlencode([(k, v) for k, v in request.query.items() if k != "redirect"])
                location = f"{owner.rstrip('/')}{request.rel_url.raw_path}?{query}"
                return web.Response(status=307, headers={"Location": location})
        decision = await self.lookup(request, tx_id, customer_id, wait_ms)
        if decision is None:
            raise ApiError(404, "not_found", f"no decision for {tx_id!r} (yet: waited "
                           f"{wait_ms} ms)")
        return web.Response(body=decision, content_type=JSON_TYPE)

    async def score(self, request: web.Request) -> web.Response:
        entered = time.time()
        self.authorize(request)
        wait_ms = self.wait_ms(request, self.settings.api_default_wait_ms)
        raw = await self.body(request)
        tx = self.parse_transaction(raw)
        self.check_retailer(tx.retailer_id, "retailer_id")
        partition = partition_of(tx.customer_id, self.settings.partitions)
        validated = time.time()
        await self.write(self.settings.transactions_topic,
                         [(partition, tx.customer_id.encode(), transaction_record(tx))])
        acked = time.time()
        stamps = {"entered": entered, "validated": validated, "acked": acked}
        decision = await self.lookup(request, tx.tx_id, tx.customer_id, wait_ms, stamps)
        stamps["answered"] = time.time()
        # where a request's time goes (bench/api.py reads it); the decision's own timings
        # (produced, received, decided) are in its body
        timings = {TIMINGS: ",".join(f"{k}={v:.6f}" for k, v in stamps.items())}
        if decision is None:
            location = (f"/v1/decisions/{quote(tx.tx_id, safe='')}?"
                        f"{urlencode({'customer_id': tx.customer_id})}")
            return json_response({"status": "pending", "tx_id": tx.tx_id, "lookup": location},
                                 202, {"Location": location, **timings})
        return web.Response(body=decision, content_type=JSON_TYPE, headers=timings)

    def parse_transaction(self, raw: bytes) -> Any:
        """The transaction in ``raw``, checked as the worker checks its input."""
        if b'"tx"' in raw:
            doc = _json_or_400(raw)
            if isinstance(doc, dict) and "tx" in doc and "tx_id" not in doc:
                raise ApiError(422, "invalid", "send a canonical transaction, not a CDC "
                               "envelope", "tx")
        try:
            return parse_transaction(raw, self.settings.input_bounds, time.time()).tx
        except BadRecord as exc:
            if exc.reason == "not-json":
                raise ApiError(400, "bad_json", exc.message) from None
            if exc.reason == "too-large":
                raise ApiError(413, "too_large", exc.message) from None
            # parse_transaction raises `from None`: the SchemaError is still the context
            cause = exc.__context__
            field = cause.field if isinstance(cause, SchemaError) else None
            message = cause.message if isinstance(cause, SchemaError) else exc.message
            raise ApiError(422, exc.reason, message, field) from None

    async def labels(self, request: web.Request) -> web.Response:
        self.authorize(request)
        doc = _json_or_400(await self.body(request))
        items, prefix = ((doc["labels"], "labels") if isinstance(doc, dict) and "labels" in doc
                         else (doc, "") if isinstance(doc, list) else ([doc], None))
        if not isinstance(items, list) or not items:
            raise ApiError(422, "invalid", "expected a label, a list of labels or "
                           "{\"labels\": [...]}", prefix or None)
        if len(items) > MAX_LABELS:
            raise ApiError(413, "too_large", f"more than {MAX_LABELS} labels")
        now = time.time()
        records = []
        for i, item in enumerate(items):
            at = f"{prefix}[{i}]." if prefix is not None else ""
            label, customer_id = self.parse_label(item, at, now)
            records.append((partition_of(customer_id, self.settings.partitions),
                            customer_id.encode(), label.to_json()))
        # every label is valid: only now is anything published
        await self.write(self.settings.labels_topic, records)
        return json_response({"accepted": len(records)}, 202)

    def parse_label(self, item: Any, at: str, now: float) -> tuple[Label, str]:
        bounds = self.settings.input_bounds
        if not isinstance(item, dict):
            raise ApiError(422, "invalid", "expected an object", at.rstrip(".") or None)
        customer_id = item.get("customer_id")
        if not isinstance(customer_id, str) or not customer_id:
            raise ApiError(422, "invalid", "is required: the transaction's customer_id "
                           "(the key of its partition)", f"{at}customer_id")
        for name in ("customer_id", "tx_id"):
            value = item.get(name)
            if isinstance(value, str) and _BAD_CHARS.search(value):
                raise ApiError(422, "bad-string", "holds NUL or a lone surrogate",
                               f"{at}{name}")
        if len(customer_id) > bounds.max_id_chars:
            raise ApiError(422, "too-long", f"longer than {bounds.max_id_chars} characters",
                           f"{at}customer_id")
        try:
            label = Label.from_dict({k: v for k, v in item.items() if k != "customer_id"},
                                    bounds, now)
        except SchemaError as exc:
            raise ApiError(422, exc.reason, exc.message, f"{at}{exc.field}") from None
        self.check_retailer(label.retailer_id, f"{at}retailer_id")
        if label.retailer_id is None:
            label = Label(label.tx_id, label.is_fraud, label.source, label.labelled_at,
                          self.settings.retailer)
        return label, customer_id

    async def write(self, topic: str, records: Sequence[Write]) -> None:
        try:
            await self.publisher.write(topic, records)
        except Exception as exc:
            log.warning("API records for %s not written: %r", topic, exc)
            raise ApiError(503, "unavailable", "Kafka did not acknowledge the records; "
                           "retry", headers={"Retry-After": "1"}) from None

    async def openapi(self, request: web.Request) -> web.Response:
        self.authorize(request)
        return json_response(openapi_document())

    async def close(self) -> None:
        await self.publisher.stop()
        if self._client is not None:
            await self._client.close()
            self._client = None


def transaction_record(tx: Transaction) -> bytes:
    """``tx`` as the record the worker reads: what ``Transaction.to_json`` writes, but by
    orjson (stdlib json was 5 % of a worker serving 200 requests a second; non-ASCII
    characters come out as UTF-8 instead of escapes, the same JSON).

    >>> tx = Transaction("t1", "acme", 1.5e9, 9.99, "c1", "pi1", extras={"n": "ü"})
    >>> orjson.loads(transaction_record(tx)) == orjson.loads(tx.to_json())
    True
    """
    try:
        return orjson.dumps(tx.to_dict())
    except orjson.JSONEncodeError:  # an extra integer beyond 64 bits
        return tx.to_json()


def _json_or_400(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "bad_json", f"not valid JSON: {str(exc)[:200]}") from None


def _error_of(body: bytes) -> tuple[str, str, str | None]:
    """``code, message, field`` of another worker's error body."""
    try:
        error = json.loads(body)["error"]
        return str(error["code"]), str(error["message"]), error.get("field")
    except (ValueError, KeyError, TypeError):
        return "internal", "the owning worker's answer was not understood", None


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error of the API as JSON: aiohttp's own (an unknown path, a wrong method) and a
    bug's (logged, answered without its traceback)."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return ApiError(exc.status, "not_found" if exc.status == 404 else "http_error",
                        exc.reason).response()
    except Exception:
        log.exception("API request %s %s failed", request.method, request.path)
        return ApiError(500, "internal", "internal error (logged by the worker)").response()


def web_settings(settings: WorkerSettings) -> dict[str, Any]:
    """faust.App settings for the web server: body bound and error middleware, TLS when a
    certificate is configured, and the URL the other workers forward requests to."""
    context = server_ssl_context(settings)
    scheme = "https" if context is not None else "http"
    url = settings.api_url or f"{scheme}://{settings.web_host}:{settings.web_port}"
    options: dict[str, Any] = {
        "web_application_options": {"client_max_size": settings.api_max_body_bytes,
                                    "middlewares": [json_errors]},
        "canonical_url": url,
    }
    if context is not None:
        options["web_ssl_context"] = context
    return options


def server_ssl_context(settings: WorkerSettings) -> ssl.SSLContext | None:
    if settings.api_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.api_cert, settings.api_key)
    return context


def client_ssl_context(settings: WorkerSettings) -> ssl.SSLContext | None:
    """How a worker verifies another's certificate when it forwards a request: the system's
    CAs and the configured certificate (workers usually share one)."""
    if settings.api_cert is None:
        return None
    context = ssl.create_default_context()
    context.load_verify_locations(settings.api_cert)
    return context


Handler = Callable[..., Awaitable[web.Response]]


def _with_match_info(handler: Handler) -> Handler:
    """``handler(request, **path parameters)`` as an aiohttp handler."""
    async def handle(request: web.Request) -> web.Response:
        return await handler(request, **request.match_info)
    return handle


def register_api(app: faust.App, settings: WorkerSettings, scored: ScoredStore,
                 publish: Publish) -> DecisionFeed:
    """Add ``/health`` and ``/v1/...`` to ``app``'s web server; the feed the decide agent
    tells about its batches."""
    feed = DecisionFeed(scored)
    api = Api(app, settings, feed, publish)

    router = aiohttp_router(app)

    def page(path: str, **methods: Handler) -> None:
        # straight on aiohttp's router, not through faust's views: a faust view adds a
        # wrapper, a dispatch and two sensor calls to every request (4 % of a worker
        # serving 200 requests a second); the json_errors middleware answers the errors
        for method, handler in methods.items():
            router.add_route(method.upper(), path, _with_match_info(handler))

    async def health(request: web.Request) -> web.Response:
        topic = settings.transactions_topic
        owned = sorted(tp.partition for tp in app.assignor.assigned_actives()
                       if tp.topic == topic)
        return json_response({"status": "ok", "retailer_id": settings.retailer,
                              "partitions": owned})

    page("/health", get=health)
    page("/v1/openapi.json", get=api.openapi)
    page("/v1/decisions/{tx_id}", get=api.get_decision)
    page("/v1/score", post=api.score)
    page("/v1/labels", post=api.labels)

    async def close(sender: Any, **kwargs: Any) -> None:
        await api.close()

    app.on_before_shutdown.connect(close)  # type: ignore[arg-type]
    return feed


def _error_schema() -> dict[str, Any]:
    return {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string", "example": "invalid"},
            "message": {"type": "string"},
            "field": {"type": "string", "description": "the offending field, when one is"}}}}}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the API (served at ``/v1/openapi.json``, checked in as
    docs/api/openapi.json)."""
    def error(description: str) -> dict[str, Any]:
        return {"description": description, "content": {JSON_TYPE: {
            "schema": {"$ref": "#/components/schemas/Error"}}}}

    decision = {"description": "the decision", "content": {JSON_TYPE: {
        "schema": {"$ref": "#/components/schemas/Decision"}}}}
    auth_errors = {"401": error("no token, or an unknown one"),
                   "403": error("the token is another retailer's"),
                   "503": error("partitions are being reassigned, or the owning worker did "
                                "not answer: retry (Retry-After)")}
    wait = {"name": "wait_ms", "in": "query", "required": False,
            "schema": {"type": "integer", "minimum": 0, "maximum": 5000},
            "description": "how long to wait for the decision (bounded by the worker's "
                           "--api-max-wait-ms, default 5000)"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "qsfraud worker API", "version": API_VERSION,
                 "description": "Served by every qsfraud worker of a retailer; any worker "
                                "answers (requests are forwarded to the one that owns the "
                                "transaction's partition). Errors: "
                                "{\"error\": {\"code\", \"message\", \"field\"?}}."},
        "security": [{"bearer": []}],
        "paths": {
            "/health": {"get": {"summary": "liveness (no token), and the partitions of "
                                           "<R>.transactions this worker holds",
                                "security": [],
                                "responses": {"200": {"description": "serving"}}}},
            "/v1/decisions/{tx_id}": {"get": {
                "summary": "the decision of a transaction, waiting up to wait_ms for it",
                "parameters": [
                    {"name": "tx_id", "in": "path", "required": True,
                     "schema": {"type": "string"}},
                    {"name": "customer_id", "in": "query", "required": True,
                     "schema": {"type": "string"},
                     "description": "the transaction's customer (the key of its partition)"},
                    wait,
                    {"name": "retailer_id", "in": "query", "required": False,
                     "schema": {"type": "string"}},
                    {"name": "redirect", "in": "query", "required": False,
                     "schema": {"enum": ["1"]},
                     "description": "1: a worker that does not own the transaction answers "
                                    "307 to the one that does, instead of forwarding"}],
                "responses": {"200": decision,
                              "307": {"description": "redirect=1 and another worker owns "
                                                     "the transaction: its URL in Location"},
                              "404": error("no decision (yet), or an unknown retailer"),
                              "422": error("a bad parameter"), **auth_errors}}},
            "/v1/score": {"post": {
                "summary": "score before commit: the transaction goes to <R>.transactions "
                           "and its decision comes back when the worker has made it",
                "parameters": [{**wait, "description": "how long to wait for the decision "
                                "(default 2000, at most --api-max-wait-ms)"}],
                "requestBody": {"required": True, "content": {JSON_TYPE: {
                    "schema": {"$ref": "#/components/schemas/Transaction"}}}},
                "responses": {
                    "200": decision,
                    "202": {"description": "accepted, no decision within wait_ms: look it "
                                           "up at `lookup` (also the Location header)",
                            "content": {JSON_TYPE: {"schema": {"type": "object", "properties": {
                                "status": {"const": "pending"}, "tx_id": {"type": "string"},
                                "lookup": {"type": "string"}}}}}},
                    "400": error("not JSON"),
                    "404": error("an unknown retailer_id"),
                    "413": error("body larger than the bound (64 KiB for a transaction)"),
                    "422": error("an invalid transaction (field and reason)"),
                    **auth_errors}}},
            "/v1/labels": {"post": {
                "summary": "publish labels (one, a list, or {\"labels\": [...]}); all are "
                           "validated before any is published",
                "requestBody": {"required": True, "content": {JSON_TYPE: {"schema": {"oneOf": [
                    {"$ref": "#/components/schemas/Label"},
                    {"type": "array", "items": {"$ref": "#/components/schemas/Label"}},
                    {"type": "object", "required": ["labels"], "properties": {"labels": {
                        "type": "array", "items": {"$ref": "#/components/schemas/Label"}}}}]}}}},
                "responses": {
                    "202": {"description": "published", "content": {JSON_TYPE: {"schema": {
                        "type": "object", "properties": {"accepted": {"type": "integer"}}}}}},
                    "400": error("not JSON"), "404": error("an unknown retailer_id"),
                    "413": error("body larger than 1 MiB, or more than 10,000 labels"),
                    "422": error("an invalid label: nothing of the batch is published"),
                    **auth_errors}}},
            "/v1/openapi.json": {"get": {"summary": "this document",
                                         "responses": {"200": {"description": "OpenAPI"},
                                                       **auth_errors}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "a per-retailer API token"}},
            "schemas": {
                "Error": _error_schema(),
                "Transaction": {"type": "object", "required": [
                    "tx_id", "retailer_id", "occurred_at", "amount", "customer_id",
                    "payment_instrument"], "properties": {
                    "tx_id": {"type": "string", "maxLength": 256},
                    "retailer_id": {"type": "string"},
                    "occurred_at": {"type": ["string", "number"],
                                    "description": "ISO 8601 or epoch seconds"},
                    "amount": {"type": "number", "minimum": 0, "maximum": 1e9},
                    "currency": {"type": "string", "default": "EUR"},
                    "customer_id": {"type": "string", "maxLength": 256},
                    "payment_instrument": {"type": "string", "description": "a hash, never "
                                           "a card number"},
                    "device_id": {"type": "string"}, "ip": {"type": "string"},
                    "channel": {"enum": ["web", "app", "pos"], "default": "web"},
                    "store_id": {"type": "string"}, "terminal_id": {"type": "string"},
                    "coupon_code": {"type": "string"},
                    "item_count": {"type": "integer", "minimum": 0, "maximum": 100000},
                    "address_mismatch": {"type": "boolean"}},
                    "additionalProperties": {"type": ["string", "number", "boolean", "null"]}},
                "Label": {"type": "object", "required": [
                    "tx_id", "customer_id", "is_fraud", "source", "labelled_at"], "properties": {
                    "tx_id": {"type": "string"},
                    "customer_id": {"type": "string",
                                    "description": "the transaction's customer_id"},
                    "is_fraud": {"type": "boolean"},
                    "source": {"enum": ["chargeback", "analyst"]},
                    "labelled_at": {"type": ["string", "number"]},
                    "retailer_id": {"type": "string"}}},
                "Decision": {"type": "object", "properties": {
                    "v": {"const": 1}, "kind": {"const": "decision"},
                    "tx_id": {"type": "string"}, "retailer_id": {"type": "string"},
                    "score": {"type": "number", "minimum": 0, "maximum": 1},
                    "action": {"enum": ["allow", "verify", "hold", "block"]},
                    "reasons": {"type": "array", "items": {"type": "string"}},
                    "model_version": {"type": "string"}, "config_version": {"type": "integer"},
                    "timings": {"type": "object", "additionalProperties": {"type": "number"},
                                "description": "epoch seconds: committed (CDC only), "
                                               "produced, received, decided"}}},
            },
        },
    }


def render_openapi() -> str:
    """The checked-in form of :func:`openapi_document` (docs/api/openapi.json)."""
    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # python -m streams.api > docs/api/openapi.json
    sys.stdout.write(render_openapi())
