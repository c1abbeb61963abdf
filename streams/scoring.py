"""The per-batch pipeline: parse -> dedup -> features -> score -> decide; and label learning.

Pure computation on key-value stores, no Kafka: the faust worker (:mod:`streams.app`) and the
bench's plain confluent-kafka loop run this same code. State lives in two
:class:`TrackedStore` s, which remember what changed on which partition so the caller can
write those keys to the changelog after the batch, and hold their values as JSON bytes
(:class:`EncodedStore`):

* ``features``: the :class:`fraud.features.FeatureExtractor` entity state;
* ``scored`` (a :class:`ScoredStore`): ``tx_id -> {"o": occurred_at, "d": decision,
  "x": feature vector, "l": learned, "p": partition}``, the dedup table and the feature
  store for labels.

Both are bounded in event time: :meth:`ScoringPipeline.expire` deletes (and tombstones)
what is older than a horizon behind the clock, the newest ``occurred_at`` seen.

A transaction already in ``scored`` (a redelivery after a rebalance or restart) yields the
identical decision record and touches neither the feature state nor the model.

>>> pipe = ScoringPipeline("acme")
>>> tx = {"tx_id": "t1", "retailer_id": "acme", "amount": 30, "customer_id": "c1",
...       "payment_instrument": "p1", "occurred_at": time.time() - 60}
>>> first = pipe.process_batch([InputRecord(json.dumps(tx).encode(), b"c1", 0, 0, 1.0)])
>>> again = pipe.process_batch([InputRecord(json.dumps(tx).encode(), b"c1", 0, 7, 2.0)])
>>> first.decisions[0].value == again.decisions[0].value, again.duplicates
(True, 1)
>>> label = {"tx_id": "t1", "is_fraud": True, "source": "analyst", "labelled_at": time.time()}
>>> pipe.learn_batch([InputRecord(json.dumps(label).encode(), b"c1", 0, 0, 5.0)]).learned
1
>>> pipe.model_version
'local+1'
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import struct
import time
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from math import fsum, isfinite
from typing import Any, Final, Protocol

import numpy as np
import orjson

from cdc.debezium import DebeziumDecoder, DebeziumError
from fraud.decisions import Decision, PolicyConfig, decide
from fraud.features import FEATURE_NAMES, FeatureExtractor, assemble, local_features
from fraud.models import RiskModel, RiverModel, model_from_config
from fraud.schema import (
    DEFAULT_BOUNDS,
    InputBounds,
    Label,
    SchemaError,
    Transaction,
    check_window,
)
from streams.config_stream import ConfigDocument

log = logging.getLogger(__name__)

SCORE_OPS: Final = frozenset(("c", "r", "u"))
CLOCK_MAX_AHEAD_S: Final = 86400.0
"""How far the event-time clock may run ahead of the wall clock: one transaction dated in
the far future must not expire every entity."""
"""CDC ops that carry a transaction to decide (``d``, a deleted row, is skipped)."""
CDC_OPS: Final = SCORE_OPS | {"d"}
"""Every op a CDC envelope may carry; any other is dead-lettered (``bad-op``)."""
DEAD_LETTER_HEAD: Final = 4096
"""Bytes of the input a dead letter carries (with the SHA-256 and length of all of it)."""
DEAD_LETTER_ERROR: Final = 1000
"""Characters of the error a dead letter carries."""
DEAD_LETTER_KEY: Final = 256
"""Bytes of the input's key a dead letter keeps; a longer key is replaced by its SHA-256."""

_std_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_orjson_dumps = orjson.dumps
_orjson_loads = orjson.loads
_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= c <= 0x39 else 0x20 for c in range(256))
"""A ``bytes.translate`` table: every ASCII digit becomes ``0``, every other byte a space."""
_LONG_RUN = b"0" * 19
"""A run of 19 digits, after :data:`_DIGITS_AS_ZERO` (~1 us for a transaction record; the
regex ``[0-9]{19}`` took ~12 us, re-trying at every digit of every shorter run)."""
_json_str: Any = json.encoder.encode_basestring_ascii
"""``json.dumps`` of a ``str`` (what it calls for one, with the default ``ensure_ascii``)."""
_BAD_CHARS: Final = re.compile("[\x00\ud800-\udfff]")
"""NUL and lone surrogates: no id or text of ours holds them, and a lone surrogate cannot
be encoded as UTF-8 (Kafka's and orjson's strings)."""


def dumps(value: Any) -> bytes:
    """Compact JSON bytes, the wire form of every record the worker writes.

    orjson writes the same JSON values as ``json.dumps``, about ten times faster (encoding
    was most of a transaction's cost). It would write NaN/Infinity as null, so values must be
    finite: transactions are validated (:class:`fraud.schema.Transaction`), so are the
    timestamps and amounts in the feature state, and :meth:`ScoringPipeline.process_batch`
    dead-letters a transaction whose features are not.

    >>> dumps({"a": [1, 2.5]})
    b'{"a":[1,2.5]}'
    """
    try:
        return _orjson_dumps(value)
    except TypeError:  # an int beyond 64 bits, a non-str key: the standard library can
        return _std_dumps(value).encode()


def dumps_to_keep(value: Any) -> bytes:
    """:func:`dumps` in a bytes object of its own size, for values kept in memory: orjson's
    bytes keep the 4 KiB buffer it wrote into (measured with orjson 3.13: 4,098 bytes
    allocated for a 65-byte result), 60x the memory of an entity's state.

    >>> dumps_to_keep({"a": 1})
    b'{"a":1}'
    """
    return bytes(memoryview(dumps(value)))


class BadRecord(ValueError):
    """An input record that cannot be processed; ``reason`` is a short machine word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class Record(Protocol):
    """A consumed Kafka record as the pipeline reads it: an :class:`InputRecord`, or faust's
    own consumer message (the worker passes those as they are: no copy per record)."""

    @property
    def value(self) -> bytes | None: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def timestamp(self) -> float | None:
        """Epoch seconds."""

    @property
    def topic(self) -> str: ...


@dataclass(slots=True)
class InputRecord:
    """One consumed Kafka record: value, key, partition, offset, timestamp (epoch s)."""

    value: bytes | None
    key: bytes | None
    partition: int
    offset: int
    timestamp: float | None
    topic: str = ""


@dataclass(slots=True)
class OutputRecord:
    """One record to produce; ``partition`` None lets the producer's partitioner choose."""

    key: bytes | None
    value: bytes | None
    partition: int | None


@dataclass(slots=True)
class ParsedTransaction:
    tx: Transaction
    op: str
    committed_at: float | None


def parse_transaction(
    value: bytes | None,
    bounds: InputBounds = DEFAULT_BOUNDS,
    now: float | None = None,
    debezium: DebeziumDecoder | None = None,
) -> ParsedTransaction:
    """A CDC envelope ``{"v": 1, "op", "tx", "committed_at", ...}`` or a bare transaction,
    within ``bounds`` (timestamps within their window of ``now``, if given); with
    ``debezium``, also a Debezium change event, read as the envelope it maps to.

    Raises :class:`BadRecord` and nothing else, whatever the bytes.

    >>> p = parse_transaction(b'{"v": 1, "op": "c", "committed_at": 12.5, "tx": {"tx_id": "t",'
    ...     b' "retailer_id": "r", "amount": 1, "customer_id": "c", "payment_instrument": "p",'
    ...     b' "occurred_at": 3}}')
    >>> p.tx.tx_id, p.op, p.committed_at
    ('t', 'c', 12.5)
    >>> parse_transaction(b"{oops")
    Traceback (most recent call last):
    ...
    streams.scoring.BadRecord: not-json: Expecting property name enclosed in double quotes
    >>> parse_transaction(b'{"tx_id": "t"}')
    Traceback (most recent call last):
    ...
    streams.scoring.BadRecord: invalid: payment_instrument: is required
    >>> parse_transaction(b'{"v": 1, "op": "x", "tx": {}}')
    Traceback (most recent call last):
    ...
    streams.scoring.BadRecord: bad-op: CDC op 'x' is none of c, r, u, d
    """
    if value is None and debezium is not None and debezium.strict:
        return ParsedTransaction(_deleted({}), "d", None)  # Debezium's tombstone after a delete
    if value is None:
        raise BadRecord("empty", "no value (tombstone)")
    doc = _loads(value, bounds)
    if debezium is not None and debezium.claims(doc):
        doc = _from_debezium(debezium, doc)
    if not isinstance(doc, dict):
        raise BadRecord("invalid", f"expected a JSON object, got {type(doc).__name__}")
    committed: Any = None
    op = "c"
    if "tx" in doc and "tx_id" not in doc:  # a CDC change envelope
        if doc.get("v", 1) != 1:
            raise BadRecord("invalid", f"unsupported envelope version {doc.get('v')!r}")
        op = doc.get("op") or "c"
        if type(op) is not str or op not in CDC_OPS:
            raise BadRecord("bad-op", f"CDC op {op!r} is none of c, r, u, d")
        committed = doc.get("committed_at")
        body = doc["tx"]
        if op == "d":
            return ParsedTransaction(_deleted(doc), op, _time(committed, bounds, now))
    else:
        committed = doc.pop("committed_at", None)
        body = doc
    try:
        tx = Transaction.from_dict(body, bounds, now)
    except SchemaError as exc:
        raise BadRecord(exc.reason, str(exc)) from None
    return ParsedTransaction(tx, op, _time(committed, bounds, now))


def _loads(value: bytes, bounds: InputBounds = DEFAULT_BOUNDS) -> Any:
    """``json.loads(value)``, by orjson when it can (~3x faster here), within ``bounds``:
    size, nesting depth, digits of an integer, no NUL or lone surrogate in any string.

    orjson gives the same values for JSON both accept, except integers beyond 64 bits (a
    float there), so a record with a run of 19 digits goes to ``json.loads``; so does what
    orjson refuses (NaN/Infinity literals, lone surrogates, a BOM, malformed text). Results
    and errors are those of the standard library, or :class:`BadRecord` for a bound.

    >>> _loads(b'{"tx_id": 123456789012345678901234567890, "a": 1.5}')
    {'tx_id': 123456789012345678901234567890, 'a': 1.5}
    >>> _loads(b"[" * 10_000 + b"]" * 10_000)
    Traceback (most recent call last):
    ...
    streams.scoring.BadRecord: too-deep: JSON nested deeper than 32
    """
    if len(value) > bounds.max_record_bytes:
        raise BadRecord("too-large", f"{len(value)} bytes, more than {bounds.max_record_bytes}")
    if _LONG_RUN not in value.translate(_DIGITS_AS_ZERO):
        try:
            doc = _orjson_loads(value)
        except orjson.JSONDecodeError:
            doc = _std_loads(value, bounds)
    else:
        doc = _std_loads(value, bounds)
    # Only a record with more brackets than the depth bound can be that deep, and only one
    # with a \u escape or the lead byte of a UTF-8 surrogate can hold NUL or a lone
    # surrogate: ~0.2 us to rule both out for a transaction, no walk.
    if (value.count(b"{") + value.count(b"[") > bounds.max_depth or b"\\u" in value
            or b"\xed" in value):
        _check_tree(doc, bounds.max_depth)
    return doc


def _std_loads(value: bytes, bounds: InputBounds) -> Any:
    """``json.loads``, its integers at most ``bounds.max_int_digits`` long (Python's own
    limit, 4,300 digits, raises a plain ValueError) and its recursion caught."""
    limit = bounds.max_int_digits

    def bounded_int(digits: str) -> int:
        if len(digits.lstrip("-")) > limit:
            raise BadRecord("int-too-large", f"an integer of {len(digits)} digits (at most "
                                             f"{limit})")
        return int(digits)

    try:
        return json.loads(value, parse_int=bounded_int)
    except RecursionError:
        raise BadRecord("too-deep", f"JSON nested deeper than {bounds.max_depth}") from None
    except BadRecord:
        raise
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError among them
        raise BadRecord("not-json", str(exc).split(":")[0][:200]) from None


def _check_tree(doc: Any, max_depth: int) -> None:
    """Raise :class:`BadRecord` if ``doc`` nests containers deeper than ``max_depth`` or a
    string (or key) in it holds NUL or a lone surrogate. Iterative: no recursion to run out."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    search = _BAD_CHARS.search
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > max_depth:
                raise BadRecord("too-deep", f"JSON nested deeper than {max_depth}")
            for key, item in node.items():
                if search(key):
                    raise BadRecord("bad-string", f"NUL or a lone surrogate in key {key!r}")
                stack.append((item, depth + 1))
        elif isinstance(node, list):
            if depth > max_depth:
                raise BadRecord("too-deep", f"JSON nested deeper than {max_depth}")
            stack.extend((item, depth + 1) for item in node)
        elif isinstance(node, str) and search(node):
            raise BadRecord("bad-string", f"NUL or a lone surrogate in {node[:80]!r}")


def _from_debezium(decoder: DebeziumDecoder, doc: Any) -> dict[str, Any]:
    """The qsfraud change envelope of a Debezium event (:mod:`cdc.debezium`)."""
    try:
        return decoder.envelope(doc)
    except DebeziumError as exc:
        raise BadRecord(exc.reason, exc.message) from None


def _deleted(doc: dict[str, Any]) -> Transaction:
    before = doc.get("before")
    tx_id = before.get("tx_id") if isinstance(before, dict) else None
    return Transaction(tx_id=tx_id if type(tx_id) is str else "", retailer_id="",
                       occurred_at=0.0, amount=0.0, customer_id="", payment_instrument="")


def _time(value: Any, bounds: InputBounds, now: float | None) -> float | None:
    """``committed_at``: None, or finite epoch seconds within ``bounds``' window of ``now``."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            ts = float(value)
        except OverflowError:
            ts = float("inf")
        if not isfinite(ts):
            raise BadRecord("invalid", f"committed_at: not finite: {value!r}")
        try:
            return check_window(ts, "committed_at", now, bounds)
        except SchemaError as exc:
            raise BadRecord(exc.reason, str(exc)) from None
    raise BadRecord("invalid", f"committed_at: expected epoch seconds, got {value!r}")


def dead_letter(record: Record, reason: str, error: str, retailer: str) -> OutputRecord:
    """A DLQ record: the reason, where the input came from, and the input's first
    :data:`DEAD_LETTER_HEAD` bytes with the SHA-256 and length of all of it.

    The head is in ``value`` if it is UTF-8 text, else base64 in ``value_b64``; whatever
    the input, the dead letter stays under ~40 KB (the broker refuses records over 1 MB).

    >>> rec = InputRecord(b"\\xff", b"k", 2, 40, 1.0, "acme.transactions")
    >>> doc = json.loads(dead_letter(rec, "not-json", "bad bytes", "acme").value)
    >>> doc["reason"], doc["partition"], doc["offset"], doc["value"], doc["value_b64"]
    ('not-json', 2, 40, None, '/w==')
    >>> doc["value_bytes"], doc["value_truncated"], doc["value_sha256"][:16]
    (1, False, 'a8100ae6aa1940d0')
    >>> big = InputRecord(b"x" * 1_000_000, b"k", 0, 1, None, "acme.transactions")
    >>> len(dead_letter(big, "too-large", "1000000 bytes", "acme").value) < 5000
    True
    """
    value = record.value
    text: str | None = None
    b64: str | None = None
    if value is not None:
        head = value[:DEAD_LETTER_HEAD]
        try:
            text = head.decode()
        except UnicodeDecodeError as exc:
            if len(value) > len(head) and exc.start > len(head) - 4 and exc.reason in (
                    "unexpected end of data",):  # the cut fell inside a character
                text = head[:exc.start].decode()
            else:
                b64 = base64.b64encode(head).decode()
    key = record.key
    doc = {
        "v": 1,
        "kind": "dead-letter",
        "retailer_id": retailer,
        "reason": reason,
        "error": error if len(error) <= DEAD_LETTER_ERROR else error[:DEAD_LETTER_ERROR] + "...",
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": None if key is None else key[:DEAD_LETTER_KEY].decode("utf-8", "replace"),
        "value": text,
        "value_b64": b64,
        "value_bytes": None if value is None else len(value),
        "value_sha256": None if value is None else hashlib.sha256(value).hexdigest(),
        "value_truncated": value is not None and len(value) > DEAD_LETTER_HEAD,
        "failed_at": time.time(),
    }
    if key is not None and len(key) > DEAD_LETTER_KEY:
        key = hashlib.sha256(key).hexdigest().encode()
    return OutputRecord(key, dumps(doc), None)


class TrackedStore:
    """A key-value store that remembers which keys changed, and on which partition, and
    indexes its keys by event time so that old ones can expire.

    ``data`` may be a faust memory store's dict (``key_partition`` its key -> partition
    map): writes go straight into it, and :meth:`drain` hands the changed keys to the caller,
    which writes them to the changelog. ``partition`` is the partition of the event being
    processed; it is where a written key's changelog record goes.

    Expiry: :meth:`at` sets the event time of what is being written; each write appends its
    key to the list of that time's bucket (``bucket_s`` wide), a few ns and a pointer. The
    index may hold a key several times and keys since rewritten or deleted: :meth:`expire`
    takes the age of a key from its stored value (:meth:`event_time_of`), never from where
    the index has it, so it is right whatever the order of writes; :meth:`reindex` rebuilds
    the index from the values (after a restore from the changelog).

    >>> s = TrackedStore()
    >>> s.partition = 3
    >>> s["a"] = 1
    >>> s.get("a"), s.drain(), s.drain()
    (1, [(3, 'a', 1)], [])
    """

    def __init__(
        self,
        data: MutableMapping[str, Any] | None = None,
        key_partition: MutableMapping[str, int] | None = None,
        bucket_s: float = 3600.0,
    ) -> None:
        self.data: MutableMapping[str, Any] = {} if data is None else data
        self.key_partition: MutableMapping[str, int] = (
            {} if key_partition is None else key_partition
        )
        self.partition = 0
        self.dirty: dict[str, int] = {}
        if not bucket_s > 0:
            raise ValueError("bucket_s must be > 0")
        self.bucket_s = bucket_s
        self.buckets: dict[int, list[str]] = {}
        """Event-time bucket -> keys written with an event time in it."""
        self._undated: list[str] = []  # written before any `at`, or of unknown age
        self._bucket: int | None = None
        self._written = self._undated  # the list of the current event time's bucket

    def at(self, event_time: float) -> None:
        """The event time of the writes that follow (until the next call)."""
        bucket = int(event_time // self.bucket_s)
        if bucket != self._bucket:
            self._bucket = bucket
            keys = self.buckets.get(bucket)
            if keys is None:
                keys = self.buckets[bucket] = []
            self._written = keys

    def get(self, key: str, default: Any = None, /) -> Any:
        return self.data.get(key, default)

    def __setitem__(self, key: str, value: Any, /) -> None:
        # set_on's body, not a call to it: the feature extractor writes ~4 keys a transaction
        self.data[key] = value
        self.dirty[key] = self.key_partition[key] = self.partition
        self._written.append(key)

    def __len__(self) -> int:
        return len(self.data)

    def set_on(self, partition: int, key: str, value: Any) -> None:
        """Write ``key`` whose changelog partition is ``partition``."""
        self.data[key] = value
        self.dirty[key] = self.key_partition[key] = partition
        self._written.append(key)

    def delete(self, key: str) -> None:
        """Remove ``key``; its changelog gets a tombstone."""
        if key in self.data:
            del self.data[key]
            self.dirty[key] = self.key_partition.pop(key, self.partition)

    def event_time_of(self, value: Any) -> float | None:
        """The event time of a stored value: the feature state's ``last`` (the entity's
        latest event) or, for an entity only a label has written since it expired, its
        newest labelled transaction's time (``lt``); None if it has neither.

        >>> TrackedStore().event_time_of({"last": None, "lt": [3.0, 7.0]})
        7.0
        """
        if isinstance(value, dict):
            last = value.get("last")
            if isinstance(last, int | float):
                return float(last)
            labelled = value.get("lt")
            if labelled:
                return float(labelled[-1])
        return None

    def reindex(self) -> float | None:
        """Rebuild the event-time index from the stored values (after a restore: a
        changelog's order is not the order of event times); the newest event time, if any."""
        self.buckets = {}
        self._undated = []
        self._bucket = None
        self._written = self._undated
        newest: float | None = None
        age = self.event_time_of
        bucket_s = self.bucket_s
        buckets = self.buckets
        undated = self._undated
        for key, value in self.data.items():
            t = age(value)
            if t is None:
                undated.append(key)
                continue
            if newest is None or t > newest:
                newest = t
            bucket = int(t // bucket_s)
            keys = buckets.get(bucket)
            if keys is None:
                keys = buckets[bucket] = []
            keys.append(key)
        return newest

    def expire(self, cutoff: float, now: float, max_entries: int | None = None,
               limit: int | None = None) -> int:
        """Delete (tombstone) every key whose event time is ``cutoff`` or older, to within
        one bucket; then, beyond ``max_entries``, the oldest by event time. ``now`` is the
        event-time clock: keys of unknown age are dated to it (they go one horizon later).
        ``limit`` bounds the index entries looked at in one call (the rest wait for the
        next: a bucket may hold hours of keys, and this runs on the event loop).
        Returns how many keys went.

        >>> s = TrackedStore(bucket_s=10.0)
        >>> s.at(5.0)
        >>> s["old"] = {"last": 5.0}
        >>> s["new"] = {"last": 35.0}  # indexed at 5, but its age is its value's
        >>> s.expire(cutoff=29.0, now=40.0), sorted(s.data), s.drain()
        (1, ['new'], [(0, 'old', None), (0, 'new', {'last': 35.0})])
        """
        if self._undated:
            self.at(now)
            self._written.extend(self._undated)
            self._undated.clear()
        self._bucket = None  # the current bucket's list may be dropped below
        self._written = self._undated
        data = self.data
        age = self.event_time_of
        bucket_s = self.bucket_s
        buckets = self.buckets
        budget = len(data) + sum(map(len, buckets.values())) if limit is None else limit
        gone = 0
        last_full = int(cutoff // bucket_s) - 1  # buckets wholly at or before the cutoff
        for bucket in sorted(b for b in buckets if b <= last_full):
            keys = buckets.pop(bucket)
            if len(keys) > budget:
                buckets[bucket] = keys[budget:]
                keys = keys[:budget]
            budget -= len(keys)
            for key in keys:
                value = data.get(key)
                if value is None:
                    continue
                t = age(value)
                if t is None or t <= cutoff:  # undated: dated to a clock a horizon ago
                    self.delete(key)
                    gone += 1
            if budget <= 0:
                return gone
        if max_entries is not None and len(data) > max_entries:
            for bucket in sorted(buckets):
                keys = buckets.pop(bucket)
                for n, key in enumerate(keys):
                    if len(data) <= max_entries or n >= budget:
                        buckets[bucket] = keys[n:]
                        return gone
                    value = data.get(key)
                    if value is None:
                        continue
                    t = age(value)
                    if t is None or int(t // bucket_s) <= bucket:  # not rewritten since
                        self.delete(key)
                        gone += 1
                budget -= len(keys)
        return gone

    def drain(self) -> list[tuple[int, str, Any]]:
        """``(partition, key, value or None)`` for every key changed since the last drain."""
        if not self.dirty:
            return []
        get = self.get
        out = [(p, k, get(k)) for k, p in self.dirty.items()]
        self.dirty = {}
        return out

    def drain_encoded(self) -> list[tuple[int, bytes, bytes | None]]:
        """:meth:`drain` in faust's changelog wire form: ``(partition, JSON key, JSON value
        or None)``, byte for byte ``json.dumps(key)`` and :func:`dumps` of the value.

        >>> s = TrackedStore()
        >>> s.set_on(1, "a", {"x": 1})
        >>> s["b"] = [2.5]
        >>> s.drain_encoded()
        [(1, b'"a"', b'{"x":1}'), (0, b'"b"', b'[2.5]')]
        """
        if not self.dirty:
            return []
        get = self.data.get
        out = [(p, _json_str(k).encode(), None if (v := get(k)) is None else dumps(v))
               for k, p in self.dirty.items()]
        self.dirty = {}
        return out


class EncodedStore(TrackedStore):
    """A :class:`TrackedStore` whose values are held as their JSON bytes (what their
    changelog records carry, so faust's table uses the raw serializer), decoded when read
    and encoded when written.

    A worker keeps millions of values: as bytes, an entity's state takes a quarter of the
    memory of its dict of lists and floats (~90 B against ~380 for an entity seen once), and
    nothing for the garbage collector to walk; each read costs a decode (~0.5 us for an
    entity), each write the encoding its changelog record needs anyway.

    >>> s = EncodedStore()
    >>> s.set_on(2, "c:1", {"t": [5.0], "last": 5.0})
    >>> s.data["c:1"], s.get("c:1")["last"], s.drain_encoded()
    (b'{"t":[5.0],"last":5.0}', 5.0, [(2, b'"c:1"', b'{"t":[5.0],"last":5.0}')])
    """

    def get(self, key: str, default: Any = None, /) -> Any:
        raw = self.data.get(key)
        return default if raw is None else _orjson_loads(raw)

    def __setitem__(self, key: str, value: Any, /) -> None:
        # set_encoded's body: the feature extractor writes ~4 keys a transaction
        self.data[key] = bytes(memoryview(dumps(value)))  # dumps_to_keep, inlined
        self.dirty[key] = self.key_partition[key] = self.partition
        self._written.append(key)

    def set_on(self, partition: int, key: str, value: Any) -> None:
        self.set_encoded(partition, key, dumps_to_keep(value))

    def set_encoded(self, partition: int, key: str, raw: bytes) -> None:
        """Write ``key`` as ``raw``, which must be :func:`dumps` of its value (for a writer
        that has the encoding at hand already; not orjson's own bytes: see
        :func:`dumps_to_keep`)."""
        self.data[key] = raw
        self.dirty[key] = self.key_partition[key] = partition
        self._written.append(key)

    def drain_encoded(self) -> list[tuple[int, bytes, bytes | None]]:
        if not self.dirty:
            return []
        get = self.data.get  # the values are their encoding already
        out = [(p, _json_str(k).encode(), get(k)) for k, p in self.dirty.items()]
        self.dirty = {}
        return out

    def event_time_of(self, value: Any) -> float | None:
        """The feature state's ``last``, decoded (at a restore, and for the keys expiry
        looks at)."""
        try:
            return super().event_time_of(_orjson_loads(value))
        except orjson.JSONDecodeError:
            return None


_M: Final = 0x5BD1E995
_U32: Final = 0xFFFFFFFF
_WORDS: Final = [struct.Struct(f"<{n}I") for n in range(64)]


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (the Java clients', aiokafka's and librdkafka's
    ``murmur2_random`` partitioner: partition = ``(murmur2(key) & 0x7FFFFFFF) % N``), a few
    times faster than aiokafka's pure-Python one (the same values: tested).

    >>> murmur2(b"21"), murmur2(b"foobar"), murmur2(b"")
    (3321034988, 3504634814, 275646681)
    """
    length = len(data)
    h = 0x9747B28C ^ length
    n4 = length >> 2
    words = _WORDS[n4].unpack_from(data) if n4 < 64 else struct.unpack_from(f"<{n4}I", data)
    for k in words:
        k = (k * _M) & _U32
        k = ((k ^ (k >> 24)) * _M) & _U32
        h = ((h * _M) & _U32) ^ k
    tail = length & 3
    if tail:
        base = length & ~3
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h = ((h ^ data[base]) * _M) & _U32
    h = ((h ^ (h >> 13)) * _M) & _U32
    return h ^ (h >> 15)


_M32: Final = np.uint32(_M)
_SEED_XOR: Final = 0x9747B28C
_VECTOR_MIN: Final = 8
"""Keys of one length below which :func:`murmur2_many` hashes them one by one (numpy's
per-call overhead exceeds the loop's)."""


def murmur2_many(keys: Sequence[bytes]) -> list[int]:
    """:func:`murmur2` of each key, computed with numpy over the keys of each length (the
    word loop runs once a length, not once a key): ~0.2 us a key for a batch's entity ids
    against ~1.5 us one by one.

    >>> murmur2_many([b"21", b"foobar", b""] + [b"c42"] * 8) == [
    ...     murmur2(k) for k in [b"21", b"foobar", b""] + [b"c42"] * 8]
    True
    """
    out = [0] * len(keys)
    by_length: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        by_length.setdefault(len(key), []).append(i)
    for length, where in by_length.items():
        if len(where) < _VECTOR_MIN:
            for i in where:
                out[i] = murmur2(keys[i])
            continue
        rows = np.frombuffer(b"".join([keys[i] for i in where]), dtype=np.uint8)
        rows = rows.reshape(len(where), length)
        h = np.full(len(where), (_SEED_XOR ^ length) & _U32, dtype=np.uint32)
        n4 = length >> 2
        if n4:
            words = np.ascontiguousarray(rows[:, :n4 * 4]).view("<u4")
            for j in range(n4):
                k = words[:, j] * _M32
                k ^= k >> np.uint32(24)
                k *= _M32
                h *= _M32
                h ^= k
        tail = length & 3
        if tail:
            base = length & ~3
            if tail == 3:
                h ^= rows[:, base + 2].astype(np.uint32) << np.uint32(16)
            if tail >= 2:
                h ^= rows[:, base + 1].astype(np.uint32) << np.uint32(8)
            h ^= rows[:, base].astype(np.uint32)
            h *= _M32
        h ^= h >> np.uint32(13)
        h *= _M32
        h ^= h >> np.uint32(15)
        for i, value in zip(where, h.tolist(), strict=True):
            out[i] = value
    return out


def home_partition(entity: str, partitions: int) -> int:
    """The one partition whose changelog holds the state of an entity with this id: where
    a record keyed by the id goes (so a customer's is its transactions' partition).

    >>> home_partition("c42", 4) == (murmur2(b"c42") & 0x7FFFFFFF) % 4
    True
    """
    return _partition(murmur2(entity.encode()), partitions)


def _partition(h: int, partitions: int) -> int:
    """Kafka's partition of a key whose murmur2 hash is ``h``."""
    return (h & 0x7FFFFFFF) % partitions


def _entity_id(key: str) -> str:
    """The entity id of a state key ``"<kind>:<id>"``."""
    return key[key.index(":") + 1:] if ":" in key else key


MAX_HOMES: Final = 1 << 17
"""Entity keys whose home partition :class:`EntityStore` remembers (then it starts over)."""


class EntityStore(EncodedStore):
    """The feature state (:class:`EncodedStore`) whose keys (``"<kind>:<entity id>"``) are
    each written to one changelog partition, the entity's :func:`home_partition`, whatever
    the partition of the transaction that wrote it: restored from that partition alone, a
    key has one latest value. A key found on another partition (a changelog written before
    keys had homes) is moved: written at home, tombstoned where it was.

    >>> s = EntityStore(partitions=4)
    >>> s.partition = 1  # the transaction's partition: not where the state goes
    >>> s["d:dev-7"] = {"last": 5.0}
    >>> s.drain_encoded() == [(home_partition("dev-7", 4), b'"d:dev-7"', b'{"last":5.0}')]
    True
    """

    def __init__(
        self,
        data: MutableMapping[str, Any] | None = None,
        key_partition: MutableMapping[str, int] | None = None,
        bucket_s: float = 3600.0,
        partitions: int = 1,
    ) -> None:
        super().__init__(data, key_partition, bucket_s)
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.partitions = partitions
        self.moved: list[tuple[int, str]] = []
        """(old partition, key) of keys moved home since the last drain: tombstoned there."""
        self._homes: dict[str, int] = {}  # a bounded memo: hashing is ~1.5 us a key

    def home(self, key: str) -> int:
        """The changelog partition of ``key`` (``"<kind>:<entity id>"``)."""
        home = self._homes.get(key)
        if home is None:
            home = home_partition(_entity_id(key), self.partitions)
            if len(self._homes) >= MAX_HOMES:
                self._homes.clear()
            self._homes[key] = home
        return home

    def prime(self, keys: Iterable[str]) -> None:
        """Compute the homes of ``keys`` (those not known yet) in one go
        (:func:`murmur2_many`), before a batch writes them.

        >>> s = EntityStore(partitions=4)
        >>> s.prime(["c:c42", "d:dev-7"])
        >>> s._homes == {"c:c42": home_partition("c42", 4), "d:dev-7": home_partition("dev-7", 4)}
        True
        """
        homes = self._homes
        new = list({key: None for key in keys if key not in homes})
        if not new:
            return
        if len(homes) + len(new) > MAX_HOMES:
            homes.clear()
        partitions = self.partitions
        hashes = murmur2_many([_entity_id(key).encode() for key in new])
        for key, h in zip(new, hashes, strict=True):
            homes[key] = _partition(h, partitions)

    def __setitem__(self, key: str, value: Any, /) -> None:
        home = self._homes.get(key)
        if home is None:
            home = self.home(key)
        self.data[key] = bytes(memoryview(dumps(value)))  # dumps_to_keep, inlined
        was = self.key_partition.get(key)
        if was is not None and was != home:
            self.moved.append((was, key))
        self.dirty[key] = self.key_partition[key] = home
        self._written.append(key)

    def set_on(self, partition: int, key: str, value: Any) -> None:
        self[key] = value

    def drain(self) -> list[tuple[int, str, Any]]:
        moved = [(p, k, None) for p, k in self.moved]
        self.moved = []
        return moved + super().drain()

    def drain_encoded(self) -> list[tuple[int, bytes, bytes | None]]:
        moved = [(p, _json_str(k).encode(), None) for p, k in self.moved]
        self.moved = []
        return moved + super().drain_encoded()


class ScoredStore(EncodedStore):
    """The ``scored`` table: ``tx_id -> {"o": occurred_at, "d": decision, "x": features,
    "l": learned, "p": partition}`` as JSON bytes (:class:`EncodedStore`).

    An entry is written once per transaction and read again only for a redelivery or a
    label; its age is its leading ``"o"``, read without decoding the entry.

    >>> s = ScoredStore()
    >>> s.set_on(2, "t1", {"o": 5.0, "l": 0})
    >>> s.data["t1"], s.get("t1")["o"], s.drain_encoded()
    (b'{"o":5.0,"l":0}', 5.0, [(2, b'"t1"', b'{"o":5.0,"l":0}')])
    """

    def event_time_of(self, value: Any) -> float | None:
        """The transaction's ``occurred_at``: the ``"o"`` that leads each entry's JSON
        (read from the bytes, ~20x faster than decoding the entry); None for an entry
        written before entries had it.

        >>> ScoredStore().event_time_of(b'{"o":1767225600.5,"d":{}}')
        1767225600.5
        """
        if value[:5] == b'{"o":':
            end = value.find(b",", 5)
            try:
                return float(value[5:end if end > 0 else -1])
            except ValueError:
                return None
        return None


@dataclass
class BatchResult:
    """What one batch of transactions produced."""

    decisions: list[OutputRecord] = field(default_factory=list)
    dead_letters: list[OutputRecord] = field(default_factory=list)
    actions: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    duplicates: int = 0
    skipped: int = 0


LabelRequest = list[Any]
"""``[reply partition, kind, entity id, tx_id, occurred_at, is_fraud]``: a label for the
label history of an entity homed on another worker's partition."""


@dataclass
class LabelResult:
    """What one batch of labels did."""

    learned: int = 0
    unknown: int = 0
    duplicate: int = 0
    dead_letters: list[OutputRecord] = field(default_factory=list)
    unknown_ids: list[str] = field(default_factory=list)
    examples: list[tuple[dict[str, float], bool]] = field(default_factory=list)
    """The labelled vectors learned (the FL client picks its mixing weight with them)."""
    routed: dict[int, list[LabelRequest]] = field(default_factory=dict)
    """Home partition -> the label history for entities homed there, held by another
    worker (:meth:`ScoringPipeline.apply_label_requests` applies them)."""


EntityRequest = list[Any]
"""``[reply partition, kind, entity id, tx_id, occurred_at, amount, customer, instrument,
device, ip, coupon]``: what an entity's owner needs to compute its fragment of a transaction
(:meth:`ScoringPipeline.apply_requests`), and where to send it."""


@dataclass
class PendingBatch:
    """A batch between :meth:`ScoringPipeline.begin_batch` and ``finish_batch``."""

    out: BatchResult
    requests: dict[int, list[EntityRequest]] = field(default_factory=dict)
    """Home partition -> the requests for the fragments of entities homed there."""
    partial: list[tuple[int, list[float], dict[str, list[float] | None]]] = field(
        default_factory=list)
    """(index in ``fresh``, local features, kind -> fragment or None: requested)."""
    fresh: list[tuple[Record, ParsedTransaction, int]] = field(default_factory=list)
    vectors: list[list[float]] = field(default_factory=list)
    slots: list[OutputRecord | None] = field(default_factory=list)
    repeats: list[tuple[Record, int, int]] = field(default_factory=list)
    received: float = 0.0
    policy: PolicyConfig | None = None

    def wanted(self) -> set[tuple[str, str]]:
        """The ``(tx_id, kind)`` of every requested fragment."""
        return {(r[3], r[1]) for reqs in self.requests.values() for r in reqs}


def _runs(model: RiskModel | RiverModel, policy: PolicyConfig) -> bool:
    """Whether ``model`` is the kind of model ``policy`` asks for."""
    if isinstance(model, RiverModel):
        return model.runs(policy.river_model)
    return policy.river_model is None


class ScoringPipeline:
    """Score, decide and learn for one retailer; ``config`` may be swapped at any time
    (each batch reads it once, so a change applies atomically between batches)."""

    def __init__(
        self,
        retailer: str,
        model: RiskModel | RiverModel | None = None,
        config: ConfigDocument | None = None,
        features: TrackedStore | None = None,
        scored: ScoredStore | None = None,
        debezium: DebeziumDecoder | None = None,
        bounds: InputBounds = DEFAULT_BOUNDS,
        partitions: int = 1,
    ) -> None:
        self.retailer = retailer
        # reads Debezium change events (auto-detected unless strict) among the input
        self.debezium = debezium if debezium is not None else DebeziumDecoder(retailer)
        self.bounds = bounds
        self.config = config or ConfigDocument.default()
        policy = self.config.policy
        # a restored model stays until a config asks for another kind (apply_config)
        self.model = model if model is not None else model_from_config(policy.model,
                                                                       policy.river_model)
        self.features = (features if features is not None
                         else EntityStore(partitions=partitions))
        self.scored = scored if scored is not None else ScoredStore()
        self.extractor = FeatureExtractor()
        self.names: tuple[str, ...] = FEATURE_NAMES
        self.clock: float | None = None
        """The event-time clock: the newest ``occurred_at`` seen (of all the partitions this
        pipeline serves), never more than :data:`CLOCK_MAX_AHEAD_S` ahead of the wall clock."""
        self.reindex_pending = False
        """Set when the stores were restored: the next batch or expiry calls :meth:`reindex`."""
        self.owned: frozenset[int] | None = None
        """The partitions whose entities' state this pipeline holds (their home partitions,
        :func:`home_partition`); None: all of them (one worker). Another entity's fragment
        is asked of its owner (:meth:`begin_batch`)."""
        self.after_decide: Callable[[Transaction, Decision], Decision] | None = None
        """Applied to each decision before it is recorded and sent: the federated watchlist
        (streams/fl_sync.py) raises decisions and notes what this retailer held."""

    @property
    def model_version(self) -> str:
        """``<base version>+<labels learned>``: changes whenever the model learns a label."""
        return f"{self.model.version}+{self.model.n}"

    def apply_config(self, config: ConfigDocument) -> None:
        """Swap the configuration (and the model's hyper-parameters) in one step; a config
        that names another model swaps in a new one (between batches, like the config)."""
        policy = config.policy
        if not _runs(self.model, policy):
            self.model = model_from_config(policy.model, policy.river_model)
        elif isinstance(self.model, RiskModel):
            self.model.params = policy.model
        self.config = config

    def process_batch(
        self, records: Sequence[Record], now: float | None = None
    ) -> BatchResult:
        """Decide every transaction in ``records``; bad ones become dead letters
        (:meth:`_process_batch`). Should the batch fail as a whole all the same (a bug
        outside any record's own step), each record is processed alone and only one that
        fails alone is dead-lettered (``internal-error``)."""
        try:
            return self._process_batch(records, now)
        except Exception as exc:
            log.error("a batch of %d failed (%r): record by record", len(records), exc)
        out = BatchResult()
        for rec in records:
            try:
                one = self._process_batch([rec], now)
            except Exception as exc:
                out.dead_letters.append(self._internal_error(rec, exc))
                continue
            out.decisions += one.decisions
            out.dead_letters += one.dead_letters
            out.latencies += one.latencies
            out.duplicates += one.duplicates
            out.skipped += one.skipped
            for action, count in one.actions.items():
                out.actions[action] = out.actions.get(action, 0) + count
        return out

    def _process_batch(
        self, records: Sequence[Record], now: float | None = None
    ) -> BatchResult:
        pending = self.begin_batch(records, now)
        if pending.requests:
            raise RuntimeError("entities owned elsewhere: begin_batch, then finish_batch")
        return self.finish_batch(pending)

    def begin_batch(
        self, records: Sequence[Record], now: float | None = None
    ) -> PendingBatch:
        """Decide every transaction in ``records``; bad ones become dead letters.

        Three passes: parse, dedup and extract each record's features in order; score all
        new transactions with one compiled call (:meth:`RiskModel.score_and_explain_many`,
        the same scores as one by one); decide and encode each. Decisions come out in input
        order. Every record ends decided (or skipped: a deleted row) or dead-lettered; an
        unexpected exception (a bug) dead-letters its record as ``internal-error``, never
        the batch. Timestamps must be within the bounds' window of the wall clock; ``now``
        (default: the wall clock) is only the decisions' ``received`` time.

        This is the first pass, up to the features: an entity whose home partition is not
        in :attr:`owned` is asked for its fragment (``requests``: home partition -> the
        requests, in input order); :meth:`finish_batch` goes on with the answers.
        """
        if self.reindex_pending:
            self.reindex()
        wall = time.time()
        received = wall if now is None else now
        clock_limit = wall + CLOCK_MAX_AHEAD_S
        clock = self.clock
        if clock is None:
            clock = float("-inf")
        policy = self.config.policy  # once: a config swap applies between batches
        bounds = self.bounds
        max_amount = bounds.max_amount
        extract = self.extractor.extract_remembered
        features = self.features
        scored = self.scored
        scored_get = scored.get
        retailer = self.retailer
        debezium = self.debezium
        owned = self.owned
        out = BatchResult()
        pending = PendingBatch(out)
        slots: list[OutputRecord | None] = []  # decisions in input order, new ones filled last
        fresh: list[tuple[Record, ParsedTransaction, int]] = []  # (record, tx, slot)
        vectors: list[list[float]] = []
        first_slot: dict[str, int] = {}  # tx_id -> slot of its first delivery in this batch
        repeats: list[tuple[Record, int, int]] = []  # (record, its slot, first slot)
        # parsed first, so that the homes of the batch's entities are hashed in one go
        parses: list[ParsedTransaction | Exception] = []
        for rec in records:
            try:
                parses.append(parse_transaction(rec.value, bounds, wall, debezium))
            except Exception as exc:  # raised again below, in the record's turn
                parses.append(exc)
        if isinstance(features, EntityStore):
            features.prime(self._entity_keys(parses))
        for rec, parsed in zip(records, parses, strict=True):
            try:  # free in CPython 3.11 unless it raises
                if isinstance(parsed, Exception):
                    raise parsed
                tx = parsed.tx
                if parsed.op not in SCORE_OPS:
                    out.skipped += 1
                    continue
                if tx.retailer_id != retailer:
                    raise BadRecord("wrong-retailer", f"retailer_id {tx.retailer_id!r} on the "
                                                      f"topic of {retailer!r}")
                tx_id = tx.tx_id
                prior = scored_get(tx_id)
                if prior is not None:  # redelivered: the same record, no learning, no state
                    out.duplicates += 1
                    slots.append(OutputRecord(rec.key, dumps(prior["d"]), rec.partition))
                    continue
                if tx_id in first_slot:  # twice in this batch: the first one's record, later
                    out.duplicates += 1
                    repeats.append((rec, len(slots), first_slot[tx_id]))
                    slots.append(None)
                    continue
                # The state boundary: whatever path built `tx`, nothing non-finite or out of
                # range enters the entity windows (sums and squares of amounts live there).
                occurred = tx.occurred_at
                if not (0.0 <= tx.amount <= max_amount and isfinite(occurred)
                        and 0 <= tx.item_count <= bounds.max_item_count):
                    raise BadRecord("out-of-range", f"amount {tx.amount!r}, occurred_at "
                                    f"{occurred!r}, item_count {tx.item_count!r}")
                features.partition = rec.partition
                features.at(occurred)
                # an entity that already applied this transaction (state restored ahead of
                # the committed offsets) gives the fragment it gave then, unchanged
                if owned is None:  # every entity's home is here: one worker
                    values = extract(tx, features)
                else:  # [] until its requested fragments are in (finish_batch)
                    values = self._owned_fragments(tx, rec.partition, owned, len(fresh),
                                                   pending) or []
                if not isfinite(fsum(values)):  # cannot happen with bounded input
                    raise BadRecord("non-finite-features", f"features {values!r}")
                if occurred > clock:
                    clock = occurred if occurred < clock_limit else max(clock, clock_limit)
                first_slot[tx_id] = len(slots)
                fresh.append((rec, parsed, len(slots)))
                vectors.append(values)
                slots.append(None)
            except BadRecord as exc:
                out.dead_letters.append(dead_letter(rec, exc.reason, exc.message, retailer))
            except Exception as exc:  # a bug: this record is dead-lettered, the batch goes on
                out.dead_letters.append(self._internal_error(rec, exc))
        if clock != float("-inf"):
            self.clock = clock
        pending.fresh, pending.vectors, pending.slots = fresh, vectors, slots
        pending.repeats, pending.received, pending.policy = repeats, received, policy
        return pending

    def finish_batch(self, pending: PendingBatch,
                     fragments: dict[tuple[str, str], list[float]] | None = None
                     ) -> BatchResult:
        """Score, decide and encode what :meth:`begin_batch` began, with the ``fragments``
        (``(tx_id, kind) -> values``) its requests were answered with."""
        out = pending.out
        slots = pending.slots
        fresh, vectors = pending.fresh, pending.vectors
        if pending.partial:
            fresh, vectors = self._assembled(pending, fragments or {})
        if fresh:
            policy = pending.policy if pending.policy is not None else self.config.policy
            self._decide_fresh(fresh, vectors, slots, out, pending.received, policy)
        retailer = self.retailer
        decisions = out.decisions
        for rec, slot, first in pending.repeats:
            original = slots[first]
            if original is None:  # its first delivery failed in _decide_fresh
                out.duplicates -= 1
                out.dead_letters.append(dead_letter(
                    rec, "internal-error", "its first delivery in this batch failed",
                    retailer))
                continue
            slots[slot] = OutputRecord(rec.key, original.value, rec.partition)
        decisions.extend(r for r in slots if r is not None)
        return out

    def _internal_error(self, rec: Record, exc: BaseException) -> OutputRecord:
        """The dead letter of a record whose processing raised unexpectedly (logged)."""
        log.error("internal error on %s[%s]@%s: %r", rec.topic, rec.partition, rec.offset, exc,
                  exc_info=exc)
        return dead_letter(rec, "internal-error", f"{type(exc).__name__}: {exc}", self.retailer)

    def _decide_fresh(
        self,
        fresh: list[tuple[Record, ParsedTransaction, int]],
        vectors: list[list[float]],
        slots: list[OutputRecord | None],
        out: BatchResult,
        received: float,
        policy: PolicyConfig,
    ) -> None:
        """Score ``vectors`` in one call, then decide, record and encode each transaction
        with ``policy`` (the batch's: read once, as the config thread may swap it)."""
        names = self.names
        version = self.model_version
        try:
            # fromiter over the flattened rows: half the time of np.array on a list of lists
            matrix = np.fromiter(chain.from_iterable(vectors), dtype=np.float64,
                                 count=len(vectors) * len(names)).reshape(len(vectors),
                                                                          len(names))
            # observe: the anomaly statistics learn every scored event (labelled or not)
            scores, explained = self.model.score_and_explain_many(
                names, matrix, policy.top_reasons, observe=True)
        except Exception as exc:  # a bug: score one by one, so only the culprit fails
            log.error("scoring a batch of %d failed (%r): one by one", len(vectors), exc)
            scores, explained = self._score_one_by_one(fresh, vectors, out, policy)
        scored_at = self.scored.at
        set_scored = self.scored.set_encoded
        actions = out.actions
        latencies = out.latencies
        with_features = bool(policy.rules)  # rules may read features; nothing else does
        after_decide = self.after_decide
        for (rec, parsed, slot), values, score, contributions in zip(
                fresh, vectors, scores, explained, strict=True):
            if contributions is None:  # its scoring failed: dead-lettered already
                continue
            try:  # free in CPython 3.11 unless it raises
                tx = parsed.tx
                partition = rec.partition
                timings = {"received": received}
                if parsed.committed_at is not None:
                    timings["committed"] = parsed.committed_at
                stamp = rec.timestamp
                if stamp is not None:
                    timings["produced"] = stamp
                x = dict(zip(names, values, strict=True)) if with_features else None
                decided = decide(tx, score, policy, contributions, x, version, timings)
                if after_decide is not None:
                    decided = after_decide(tx, decided)
                decision = decided.to_dict()
                encoded = dumps(decision)
                # dumps({"o": occurred_at, "d": decision, "x": values, "e": entities, "l": 0,
                #        "p": partition}), reusing the decision's encoding; "o" first:
                # ScoredStore.event_time_of reads it; "e": the entities whose label history
                # a label of this transaction feeds (learn_batch)
                scored_at(tx.occurred_at)
                set_scored(partition, tx.tx_id, b'{"o":' + dumps(tx.occurred_at) + b',"d":'
                           + encoded + b',"x":' + dumps(values) + b',"e":'
                           + dumps([tx.customer_id, tx.payment_instrument, tx.device_id])
                           + b',"l":0,"p":' + str(partition).encode() + b"}")
                slots[slot] = OutputRecord(rec.key, encoded, partition)
                action = decision["action"]
                actions[action] = actions.get(action, 0) + 1
                if stamp is not None:
                    latencies.append(decision["timings"]["decided"] - stamp)
            except Exception as exc:  # a bug: this record only
                out.dead_letters.append(self._internal_error(rec, exc))

    def _score_one_by_one(
        self,
        fresh: list[tuple[Record, ParsedTransaction, int]],
        vectors: list[list[float]],
        out: BatchResult,
        policy: PolicyConfig,
    ) -> tuple[list[float], list[Any]]:
        """Scores and contributions of each vector alone; None contributions for one that
        raised (it is dead-lettered)."""
        names = self.names
        scores: list[float] = []
        explained: list[Any] = []
        for (rec, _parsed, _slot), values in zip(fresh, vectors, strict=True):
            try:
                one, why = self.model.score_and_explain_many(
                    names, np.array([values], dtype=np.float64), policy.top_reasons,
                    observe=True)
                scores.append(float(one[0]))
                explained.append(why[0])
            except Exception as exc:
                out.dead_letters.append(self._internal_error(rec, exc))
                scores.append(0.0)
                explained.append(None)
        return scores, explained

    def _entity_keys(self, parses: Iterable[ParsedTransaction | Exception]) -> list[str]:
        """The state keys of the entities of the parsed transactions."""
        prefix = self.extractor.prefix
        kc, kp, kd, ki, kk = (prefix + kind + ":" for kind in "cpdik")
        keys: list[str] = []
        add = keys.append
        for parsed in parses:
            if isinstance(parsed, Exception):
                continue
            tx = parsed.tx
            if tx.customer_id is not None:
                add(kc + tx.customer_id)
            if tx.payment_instrument is not None:
                add(kp + tx.payment_instrument)
            if tx.device_id is not None:
                add(kd + tx.device_id)
            if tx.ip is not None:
                add(ki + tx.ip)
            if tx.coupon_code:
                add(kk + tx.coupon_code)
        return keys

    def _owned_fragments(self, tx: Transaction, partition: int, owned: frozenset[int],
                         index: int, pending: PendingBatch) -> list[float] | None:
        """The feature vector of ``tx`` if every entity of it is homed in ``owned``; else
        the owned entities' fragments are applied now, the others requested, and None."""
        features = self.features
        fragment = self.extractor.fragment
        home = features.home if isinstance(features, EntityStore) else None
        tx_id, ts, amount = tx.tx_id, tx.occurred_at, tx.amount
        customer, instrument, device, ip = (tx.customer_id, tx.payment_instrument,
                                            tx.device_id, tx.ip)
        coupon = tx.coupon_code or None
        parts: dict[str, list[float] | None] = {}
        for kind, entity in (("c", customer), ("p", instrument), ("d", device), ("i", ip),
                             ("k", coupon)):
            where = None if entity is None or home is None else home(kind + ":" + entity)
            if where is None or where in owned:
                parts[kind] = fragment(features, kind, entity, tx_id, ts, amount, customer,
                                       instrument, device, ip, coupon)
            else:
                parts[kind] = None
                pending.requests.setdefault(where, []).append(
                    [partition, kind, entity, tx_id, ts, amount, customer, instrument, device,
                     ip, coupon])
        local = local_features(ts, amount, tx.channel, coupon, tx.item_count,
                               tx.address_mismatch)
        done = [part for part in parts.values() if part is not None]
        if len(done) == len(parts):
            return assemble(local, *done)
        pending.partial.append((index, local, parts))
        return None

    def _assembled(
        self, pending: PendingBatch, fragments: dict[tuple[str, str], list[float]]
    ) -> tuple[list[tuple[Record, ParsedTransaction, int]], list[list[float]]]:
        """``fresh`` and ``vectors`` with the requested fragments filled in; a transaction
        whose fragment is missing or not finite is dead-lettered."""
        vectors: list[list[float] | None] = list(pending.vectors)
        out = pending.out
        for index, local, parts in pending.partial:
            rec, parsed, _slot = pending.fresh[index]
            tx_id = parsed.tx.tx_id
            try:
                filled = [part if part is not None else fragments[(tx_id, kind)]
                          for kind, part in parts.items()]
                values = assemble(local, *filled)
                if not isfinite(fsum(values)):
                    raise BadRecord("non-finite-features", f"features {values!r}")
                vectors[index] = values
            except BadRecord as exc:
                vectors[index] = None
                out.dead_letters.append(dead_letter(rec, exc.reason, exc.message,
                                                    self.retailer))
            except Exception as exc:  # a bug (a fragment missing): this record only
                vectors[index] = None
                out.dead_letters.append(self._internal_error(rec, exc))
        kept = [(f, v) for f, v in zip(pending.fresh, vectors, strict=True) if v is not None]
        return [f for f, _ in kept], [v for _, v in kept]

    def apply_requests(self, requests: Iterable[EntityRequest]
                       ) -> dict[int, list[tuple[str, str, list[float]]]]:
        """As the owner of the requested entities: each one's fragment of its transaction
        (a transaction it applied already gets the same one: no state change), in request
        order; reply partition -> ``(tx_id, kind, fragment)``."""
        if self.reindex_pending:
            self.reindex()
        features = self.features
        fragment = self.extractor.fragment
        requests = list(requests)
        if isinstance(features, EntityStore):
            prefix = self.extractor.prefix
            features.prime([prefix + r[1] + ":" + r[2] for r in requests])
        replies: dict[int, list[tuple[str, str, list[float]]]] = {}
        clock = self.clock if self.clock is not None else float("-inf")
        limit = time.time() + CLOCK_MAX_AHEAD_S
        for (reply, kind, entity, tx_id, ts, amount, customer, instrument, device, ip,
             coupon) in requests:
            features.at(ts)
            values = fragment(features, kind, entity, tx_id, ts, amount, customer,
                              instrument, device, ip, coupon)
            replies.setdefault(reply, []).append((tx_id, kind, values))
            if ts > clock:
                clock = ts if ts < limit else max(clock, limit)
        if clock != float("-inf"):
            self.clock = clock
        return replies

    def apply_label_requests(self, requests: Iterable[LabelRequest]
                             ) -> dict[int, list[tuple[str, str]]]:
        """As the owner of the entities: fold each routed label into its entity's label
        history (once per transaction: a request sent again is not counted again); reply
        partition -> ``(tx_id, kind)`` of each request, to acknowledge."""
        if self.reindex_pending:
            self.reindex()
        features = self.features
        learn = self.extractor.learn_entity_label
        acks: dict[int, list[tuple[str, str]]] = {}
        for reply, kind, entity, tx_id, ts, is_fraud in requests:
            features.at(ts)
            learn(features, kind, entity, ts, bool(is_fraud), tx_id)
            acks.setdefault(reply, []).append((tx_id, kind))
        return acks

    def reindex(self) -> None:
        """Rebuild both stores' event-time indexes from their values (after a restore),
        and bring the clock up to the newest event time they hold."""
        self.reindex_pending = False
        newest = [t for t in (self.features.reindex(), self.scored.reindex()) if t is not None]
        if newest:
            latest = min(max(newest), time.time() + CLOCK_MAX_AHEAD_S)
            self.clock = latest if self.clock is None else max(self.clock, latest)

    def expire(self, horizon_s: float, max_scored: int | None = None,
               limit: int | None = None) -> tuple[int, int]:
        """Delete the entity state and the ``scored`` entries whose event time is more
        than ``horizon_s`` behind the clock (their changelogs get tombstones at the next
        drain); ``max_scored`` caps ``scored``, oldest first; ``limit`` bounds the work of
        one call in each store (see :meth:`TrackedStore.expire`). How many of each went.

        >>> pipe = ScoringPipeline("acme")
        >>> for i, at in enumerate((1.767e9, 1.767e9 + 9 * 86400)):  # 2025-12-29, +9 days
        ...     tx = {"tx_id": f"t{i}", "retailer_id": "acme", "amount": 30,
        ...           "customer_id": f"c{i}", "payment_instrument": "p1", "occurred_at": at}
        ...     _ = pipe.process_batch([InputRecord(json.dumps(tx).encode(), None, 0, i, None)])
        >>> pipe.expire(8 * 86400.0), sorted(pipe.features.data), list(pipe.scored.data)
        ((1, 1), ['c:c1', 'p:p1'], ['t1'])
        """
        if self.reindex_pending:
            self.reindex()
        clock = self.clock
        if clock is None:
            return 0, 0
        cutoff = clock - horizon_s
        return (self.features.expire(cutoff, clock, limit=limit),
                self.scored.expire(cutoff, clock, max_scored, limit))

    def learn_batch(self, records: Iterable[Record]) -> LabelResult:
        """Learn from each label whose transaction is still in ``scored``, at most once.

        Every label ends learned, counted (unknown or expired transaction, repeated label)
        or dead-lettered with its reason, whatever its bytes; ``labelled_at`` must be within
        the bounds' window of the wall clock. An unexpected exception dead-letters its
        record as ``internal-error``, never the batch.
        """
        if self.reindex_pending:
            self.reindex()
        out = LabelResult()
        scored = self.scored
        model = self.model
        names = self.names
        bounds = self.bounds
        clock = time.time()
        learn_entity_label = self.extractor.learn_entity_label
        for rec in records:
            try:
                value = rec.value
                if value is None:
                    raise BadRecord("empty", "no value (tombstone)")
                try:
                    label = Label.from_dict(_loads(value, bounds), bounds, clock)
                except SchemaError as exc:
                    raise BadRecord(exc.reason, str(exc)) from None
                if label.retailer_id not in (None, self.retailer):
                    raise BadRecord("wrong-retailer", f"label for retailer {label.retailer_id!r}")
                entry = scored.get(label.tx_id)
                if entry is None:
                    out.unknown += 1
                    out.unknown_ids.append(label.tx_id)
                    continue
                if entry["l"]:
                    out.duplicate += 1
                    continue
                x = entry["x"]
                if not isfinite(fsum(x)):  # the model state's boundary: never non-finite
                    raise BadRecord("non-finite-features", f"features {x!r}")
                vector = dict(zip(names, x, strict=True))
                model.learn_one(vector, label.is_fraud)
                out.examples.append((vector, label.is_fraud))
                entities = entry.get("e")
                if entities:  # the label history of the transaction's entities
                    features = self.features
                    features.partition = entry["p"]
                    features.at(entry["o"])
                    owned = self.owned
                    homes = features.home if isinstance(features, EntityStore) else None
                    for kind, entity in zip("cpd", entities, strict=True):
                        if entity is None:
                            continue
                        # only the owner writes an entity's state: the others' are routed
                        home = (homes(kind + ":" + entity)
                                if homes is not None and owned is not None else None)
                        if home is None or owned is None or home in owned:
                            learn_entity_label(features, kind, entity, entry["o"],
                                               label.is_fraud, label.tx_id)
                        else:
                            out.routed.setdefault(home, []).append(
                                [entry["p"], kind, entity, label.tx_id, entry["o"],
                                 label.is_fraud])
                scored.set_on(entry["p"], label.tx_id, {**entry, "l": 1})
                out.learned += 1
            except BadRecord as exc:
                out.dead_letters.append(dead_letter(rec, exc.reason, exc.message, self.retailer))
            except Exception as exc:  # a bug: this record is dead-lettered, the batch goes on
                out.dead_letters.append(self._internal_error(rec, exc))
        if out.unknown_ids:
            log.info("labels for %d unknown or expired transactions, e.g. %s",
                     out.unknown, out.unknown_ids[:3])
        return out
