"""CDC from a MongoDB collection's change stream, with an initial snapshot and no gap/overlap.

Snapshot: the server's ``operationTime`` *t0* is read first, then the whole collection, then
*t1*. Reads are not isolated (SecantusDB, like a mongod collection scan outside a snapshot
transaction, ignores ``atClusterTime``), so a document changed between *t0* and *t1* may or may
not show that change. Changes are resolved the DBLog way: a change stream from *t0* is scanned
up to *t1*; documents it touches are dropped from the snapshot, since streaming from *t0* emits
their changes anyway. Every other document is emitted as a read (``op = "r"``). Streaming then
starts at *t0* with ``start_at_operation_time``; after that the position is the resume token
of the last event written.

Updates: with pre-images enabled on the collection (``changeStreamPreAndPostImages``), the
post-image is the pre-image with the ``updateDescription`` applied: exactly the document as
that update left it. Without them it is ``full_document="updateLookup"``: the document as it is
when the event is read, which can already include later changes (MongoDB's own semantics).
Deletes carry the pre-image when there is one, else only the ``_id``.
Positions: ``{"start_at": [seconds, increment]}`` or ``{"resume_token": {...}}``.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pymongo
import pymongo.errors
from bson.timestamp import Timestamp

from cdc.source import Change, HistoryLost, Position, Source, SourceError, SourceTransaction

HISTORY_LOST_CODES = frozenset({286, 280})  # ChangeStreamHistoryLost, ChangeStreamFatalError
END_OF_STREAM = frozenset({"drop", "rename", "dropDatabase", "invalidate"})
ROW_OPS = frozenset({"insert", "update", "replace", "delete"})


def apply_update(document: dict[str, Any], description: dict[str, Any]) -> dict[str, Any]:
    """The document after an update event's ``updateDescription`` (dotted paths supported).

    >>> apply_update({"_id": 1, "a": {"b": 1}, "l": [1, 2, 3], "x": 0},
    ...     {"updatedFields": {"a.b": 2, "l.0": 9}, "removedFields": ["x"],
    ...      "truncatedArrays": [{"field": "l", "newSize": 2}]})
    {'_id': 1, 'a': {'b': 2}, 'l': [9, 2]}
    """
    doc = copy.deepcopy(document)
    for path, value in (description.get("updatedFields") or {}).items():
        _set_path(doc, path.split("."), value)
    for path in description.get("removedFields") or []:
        _del_path(doc, path.split("."))
    for trunc in description.get("truncatedArrays") or []:
        parent, last = _parent(doc, str(trunc["field"]).split("."))
        target = parent.get(last) if isinstance(parent, dict) else None
        if isinstance(target, list):
            del target[int(trunc["newSize"]):]
    return doc


def _parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    current = doc
    for part in parts[:-1]:
        if isinstance(current, list) and part.isdigit():
            current = current[int(part)]
        else:
            current = current.setdefault(part, {})
    return current, parts[-1]


def _set_path(doc: dict[str, Any], parts: list[str], value: Any) -> None:
    parent, last = _parent(doc, parts)
    if isinstance(parent, list) and last.isdigit():
        index = int(last)
        while len(parent) <= index:
            parent.append(None)
        parent[index] = value
    else:
        parent[last] = value


def _del_path(doc: dict[str, Any], parts: list[str]) -> None:
    try:
        parent, last = _parent(doc, parts)
    except (KeyError, IndexError, AttributeError):
        return
    if isinstance(parent, dict):
        parent.pop(last, None)


def _ts(value: Timestamp) -> list[int]:
    return [int(value.time), int(value.inc)]


class MongoChangeStreamSource(Source):
    """One collection of a MongoDB replica set (or SecantusDB), snapshot then change stream."""

    kind = "mongo"

    def __init__(self, source_id: str, *, uri: str, database: str, collection: str,
                 snapshot_mode: str = "initial", on_history_lost: str = "fail",
                 pre_images: bool = True, max_await_ms: int = 100) -> None:
        super().__init__(source_id, snapshot_mode, on_history_lost)
        self.uri, self.database, self.collection = uri, database, collection
        self.pre_images = pre_images
        self.max_await_ms = max_await_ms
        self._feed: _ChangeFeed | None = None
        self.client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            uri, serverSelectionTimeoutMS=10_000, tz_aware=True)

    def describe(self) -> dict[str, Any]:
        return {"connector": self.kind, "db": self.database, "table": self.collection}

    @property
    def _coll(self) -> Any:
        return self.client[self.database][self.collection]

    def _operation_time(self) -> Timestamp:
        try:
            reply = self.client[self.database].command("ping")
        except pymongo.errors.PyMongoError as exc:
            raise SourceError(f"cannot reach MongoDB at {self.uri}: {exc}") from None
        op_time = reply.get("operationTime") or (reply.get("$clusterTime") or {}).get(
            "clusterTime")
        if not isinstance(op_time, Timestamp):
            raise SourceError("the server gives no operationTime: change streams need a "
                              "replica set (a standalone mongod cannot be watched)")
        return op_time

    def current_position(self) -> Position:
        return {"start_at": _ts(self._operation_time())}

    def _watch(self, position: Position, full_document: bool = True) -> Any:
        kwargs: dict[str, Any] = {"max_await_time_ms": self.max_await_ms,
                                  "batch_size": 1000}
        if full_document:
            kwargs["full_document"] = "updateLookup"
            if self.pre_images:
                kwargs["full_document_before_change"] = "whenAvailable"
        if "resume_token" in position:
            kwargs["resume_after"] = position["resume_token"]
        else:
            kwargs["start_at_operation_time"] = Timestamp(*position["start_at"])
        # No server-side $match on operationType: without showExpandedEvents a collection's
        # stream carries only row events and end-of-stream events anyway, and filtering
        # costs SecantusDB ~20 % of its CPU per event (~22 us). Other kinds are skipped here.
        try:
            return self._coll.watch(None, **kwargs)
        except pymongo.errors.OperationFailure as exc:
            raise self._translate(exc) from None

    @staticmethod
    def _translate(exc: pymongo.errors.OperationFailure) -> SourceError:
        if exc.code in HISTORY_LOST_CODES or "ChangeStreamHistoryLost" in str(exc):
            return HistoryLost(f"the change stream position is no longer in the oplog "
                               f"(code {exc.code})")
        if exc.code == 40573:
            return SourceError("change streams need a replica set; this server is standalone")
        return SourceError(f"change stream failed: {exc}")

    # --- snapshot -----------------------------------------------------------------------------
    def snapshot(self) -> Iterator[SourceTransaction]:
        t0 = self._operation_time()
        started = datetime.now(UTC).timestamp()
        try:
            docs = list(self._coll.find({}, batch_size=5000))
        except pymongo.errors.PyMongoError as exc:
            raise SourceError(f"snapshot read of {self.collection} failed: {exc}") from None
        t1 = self._operation_time()
        touched: set[str] = set()
        with self._watch({"start_at": _ts(t0)}, full_document=False) as window:
            while True:
                try:
                    event = window.try_next()
                except pymongo.errors.OperationFailure as exc:
                    raise self._translate(exc) from None
                if event is None or event["clusterTime"] > t1:
                    break
                if "documentKey" in event:
                    touched.add(repr(event["documentKey"].get("_id")))
        changes = [Change(op="r", pk=str(doc.get("_id")), before=None, after=doc,
                          committed_at=started)
                   for doc in docs if repr(doc.get("_id")) not in touched]
        yield SourceTransaction(changes=changes, position={"start_at": _ts(t0)}, snapshot=True,
                                meta={"window_dropped": len(docs) - len(changes)})

    # --- stream -------------------------------------------------------------------------------
    def _change(self, event: dict[str, Any]) -> Change | None:
        """The change an event describes; None for kinds that change no row (e.g. DDL
        events of a newer server), whose position is still passed."""
        kind = event["operationType"]
        if kind in END_OF_STREAM:
            raise SourceError(f"{self.database}.{self.collection}: {kind} event; the change "
                              "stream ended (collection dropped or renamed)")
        if kind not in ROW_OPS:
            return None
        wall = event.get("wallTime")
        committed_at = (wall.timestamp() if isinstance(wall, datetime)
                        else float(event["clusterTime"].time))
        key = event.get("documentKey") or {}
        pk = str(key.get("_id"))
        before = event.get("fullDocumentBeforeChange")
        if kind == "insert":
            return Change("c", pk, None, event.get("fullDocument"), committed_at)
        if kind == "delete":
            return Change("d", pk, before or dict(key), None, committed_at)
        after: dict[str, Any] | None
        if kind == "update" and before is not None and "updateDescription" in event:
            after = apply_update(before, event["updateDescription"])
        else:
            after = event.get("fullDocument")
        if after is None:
            return Change("u", pk, before, dict(key), committed_at,
                          error="post-image unavailable: the document was deleted before the "
                                "update was read and the collection has no pre-images")
        return Change("u", pk, before, after, committed_at)

    def stream(self, position: Position) -> Iterator[SourceTransaction]:
        pending: list[Change] = []
        pending_txn: tuple[str, int] | None = None
        pending_token: Any = None
        last_idle_token: Any = None
        with self._watch(position) as changes:
            feed = self._feed = _ChangeFeed(changes, self.stopping)
            try:
                for event, idle_token in feed:
                    if event is None:
                        if pending:
                            yield SourceTransaction(pending, {"resume_token": pending_token})
                            pending, pending_txn = [], None
                        token = idle_token
                        if (token is not None and token != pending_token
                                and token != last_idle_token):
                            last_idle_token = token
                            yield SourceTransaction([], {"resume_token": token})
                        continue
                    txn = ((str(event["lsid"].get("id")), int(event["txnNumber"]))
                           if "lsid" in event and "txnNumber" in event else None)
                    if pending and (txn is None or txn != pending_txn):
                        yield SourceTransaction(pending, {"resume_token": pending_token})
                        pending = []
                    change = self._change(event)
                    pending_token = event["_id"]
                    if change is None:
                        if not pending:  # nothing to carry it: the position moves on alone
                            yield SourceTransaction([], {"resume_token": pending_token})
                        continue
                    if txn is None:
                        yield SourceTransaction([change], {"resume_token": pending_token})
                    else:
                        pending.append(change)
                        pending_txn = txn
            except pymongo.errors.OperationFailure as exc:
                raise self._translate(exc) from None
            except pymongo.errors.PyMongoError as exc:
                if self.stopping.is_set():
                    return
                raise SourceError(f"change stream failed: {exc}") from None
            finally:
                self._feed = None
                feed.close()  # before the change stream closes: it is the feed thread's

    def ready(self) -> bool:
        feed = self._feed
        return feed is not None and feed.ready()

    def close(self) -> None:
        self.stop()
        self.client.close()


class _ChangeFeed:
    """Reads a change stream in a thread, so the next batch is on its way while this one is
    mapped and encoded.

    Reading one event at a time, the reader waited for each ``getMore`` (SecantusDB answers
    with ~200 events after ~25 ms) and then spent about as long on the batch: read and
    processing took turns. Iterating yields ``(event, None)`` per change and ``(None,
    resume_token)`` when a ``getMore`` found nothing (the token may have moved on); errors of
    the stream are raised where the iteration is.
    """

    AHEAD = 10_000  # events read but not yet taken: beyond this the thread waits

    def __init__(self, changes: Any, stopping: threading.Event) -> None:
        self._changes = changes
        self._stopping = stopping
        self._closed = threading.Event()
        self._items: queue.SimpleQueue[tuple[Any, Any, BaseException | None]] = \
            queue.SimpleQueue()
        self._events_in = 0  # counted by the feed thread only
        self._events_out = 0  # counted by the iterating thread only
        self._thread = threading.Thread(target=self._run, daemon=True, name="cdc-mongo-feed")
        self._thread.start()

    def _run(self) -> None:
        put, items = self._items.put, self._items
        try:
            while not (self._closed.is_set() or self._stopping.is_set()):
                event = self._changes.try_next()
                if event is None:
                    put((None, self._changes.resume_token, None))
                    continue
                self._events_in += 1
                put((event, None, None))
                while items.qsize() > self.AHEAD and not self._closed.is_set():
                    time.sleep(0.002)
        except BaseException as exc:  # handed to the iterating thread
            put((None, None, exc))
            return
        put((None, None, StopIteration()))

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        get = self._items.get
        while True:
            try:
                event, token, error = get(timeout=0.2)
            except queue.Empty:
                if not self._thread.is_alive() and self._items.empty():
                    return
                continue
            if error is not None:
                if isinstance(error, StopIteration):
                    return
                raise error
            if event is not None:
                self._events_out += 1
            yield event, token

    def ready(self) -> bool:
        """A change event is read and waiting (not only an empty ``getMore``)."""
        return self._events_in > self._events_out

    def close(self) -> None:
        """Stop the thread (it notices within ``max_await_ms``) and wait for it."""
        self._closed.set()
        self._thread.join(10)
