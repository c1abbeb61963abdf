"""The per-batch pipeline: parse -> dedup -> features -> score -> decide; and label learning.

Pure computation on key-value stores, no Kafka: the faust worker (:mod:`streams.app`) and the
bench's plain confluent-kafka loop run this same code. State lives in two
:class:`TrackedStore` s, which remember what changed on which partition so the caller can
write those keys to the changelog after the batch:

* ``features``: the :class:`fraud.features.FeatureExtractor` entity state;
* ``scored`` (a :class:`ScoredStore`, entries held as JSON bytes): ``tx_id -> {"d": decision,
  "x": feature vector, "at": received, "l": learned, "p": partition}``, the dedup table and
  the feature store for labels (bounded by TTL and size, see :meth:`ScoredStore.expire`).

A transaction already in ``scored`` (a redelivery after a rebalance or restart) yields the
identical decision record and touches neither the feature state nor the model.

>>> pipe = ScoringPipeline("acme")
>>> tx = {"tx_id": "t1", "retailer_id": "acme", "amount": 30, "customer_id": "c1",
...       "payment_instrument": "p1", "occurred_at": 1000.0}
>>> first = pipe.process_batch([InputRecord(json.dumps(tx).encode(), b"c1", 0, 0, 1.0)])
>>> again = pipe.process_batch([InputRecord(json.dumps(tx).encode(), b"c1", 0, 7, 2.0)])
>>> first.decisions[0].value == again.decisions[0].value, again.duplicates
(True, 1)
>>> pipe.learn_batch([InputRecord(b'{"tx_id": "t1", "is_fraud": true, "source": "analyst",'
...                               b' "labelled_at": 5}', b"c1", 0, 0, 5.0)]).learned
1
>>> pipe.model_version
'local+1'
"""

from __future__ import annotations

import base64
import gc
import json
import logging
import time
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from math import fsum, isfinite
from typing import Any, Final, Protocol

import numpy as np
import orjson

from fraud.decisions import PolicyConfig, decide
from fraud.features import FEATURE_NAMES, FeatureExtractor
from fraud.models import RiskModel, RiverModel, model_from_config
from fraud.schema import Label, SchemaError, Transaction
from streams.config_stream import ConfigDocument

log = logging.getLogger(__name__)

SCORE_OPS: Final = frozenset(("c", "r", "u"))
"""CDC ops that carry a transaction to decide (``d``, a deleted row, is skipped)."""

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


def collect_youngest_generation_only() -> tuple[int, int, int]:
    """Have the garbage collector collect only its youngest generation automatically, as a
    process that runs the pipeline should; returns the thresholds before.

    A full collection walks the tables' entity state (many small dicts and lists, freed by
    reference counting, not cycles) and finds ~nothing: measured on a backlog, 6-7 of them
    in 5 s, 390-420 ms in all (freezing the state every 5 s was too slow to keep up at
    thousands of tx/s). The middle generation's collections walked each new entity a
    second time, cold: 60-75 % of the pipeline's collection time (10.4 us a transaction,
    2.4-4.5 without them). Cycles that outlive one young collection wait for the caller's
    own full collections: in a worker, ~100 objects in 50 s at 1,000 tx/s (30-57 when the
    middle generation was collected too).
    """
    before = gc.get_threshold()
    gc.set_threshold(before[0], 2**31 - 1, 2**31 - 1)
    return before


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


def parse_transaction(value: bytes | None) -> ParsedTransaction:
    """A CDC envelope ``{"v": 1, "op", "tx", "committed_at", ...}`` or a bare transaction.

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
    """
    if value is None:
        raise BadRecord("empty", "no value (tombstone)")
    doc = _loads(value)
    if not isinstance(doc, dict):
        raise BadRecord("invalid", f"expected a JSON object, got {type(doc).__name__}")
    committed: Any = None
    op = "c"
    if "tx" in doc and "tx_id" not in doc:  # a CDC change envelope
        if doc.get("v", 1) != 1:
            raise BadRecord("invalid", f"unsupported envelope version {doc.get('v')!r}")
        op = str(doc.get("op") or "c")
        committed = doc.get("committed_at")
        body = doc["tx"]
        if op == "d":
            return ParsedTransaction(_deleted(doc), op, _time(committed))
    else:
        committed = doc.pop("committed_at", None)
        body = doc
    try:
        tx = Transaction.from_dict(body)
    except SchemaError as exc:
        raise BadRecord("invalid", str(exc)) from None
    return ParsedTransaction(tx, op, _time(committed))


def _loads(value: bytes) -> Any:
    """``json.loads(value)``, by orjson when it can (~3x faster here).

    orjson gives the same values for JSON both accept, except integers beyond 64 bits (a
    float there), so a record with a run of 19 digits goes to ``json.loads``; so does what
    orjson refuses (NaN/Infinity literals, lone surrogates, a BOM, malformed text). Results
    and errors are those of the standard library.

    >>> _loads(b'{"tx_id": 123456789012345678901234567890, "a": 1.5}')
    {'tx_id': 123456789012345678901234567890, 'a': 1.5}
    """
    if _LONG_RUN not in value.translate(_DIGITS_AS_ZERO):
        try:
            return _orjson_loads(value)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRecord("not-json", str(exc).split(":")[0]) from None


def _deleted(doc: dict[str, Any]) -> Transaction:
    before = doc.get("before") or {}
    return Transaction(tx_id=str(before.get("tx_id", "")), retailer_id="", occurred_at=0.0,
                       amount=0.0, customer_id="", payment_instrument="")


def _time(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise BadRecord("invalid", f"committed_at: expected epoch seconds, got {value!r}")


def dead_letter(record: Record, reason: str, error: str, retailer: str) -> OutputRecord:
    """A DLQ record: the reason, where the input came from, and the input itself.

    >>> rec = InputRecord(b"\\xff", b"k", 2, 40, 1.0, "acme.transactions")
    >>> doc = json.loads(dead_letter(rec, "not-json", "bad bytes", "acme").value)
    >>> doc["reason"], doc["partition"], doc["offset"], doc["value"], doc["value_b64"]
    ('not-json', 2, 40, None, '/w==')
    """
    value = record.value
    text: str | None
    try:
        text = value.decode() if value is not None else None
    except UnicodeDecodeError:
        text = None
    doc = {
        "v": 1,
        "kind": "dead-letter",
        "retailer_id": retailer,
        "reason": reason,
        "error": error,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": record.key.decode("utf-8", "replace") if record.key is not None else None,
        "value": text,
        "value_b64": None if value is None else base64.b64encode(value).decode(),
        "failed_at": time.time(),
    }
    return OutputRecord(record.key, dumps(doc), None)


class TrackedStore:
    """A key-value store that remembers which keys changed, and on which partition.

    ``data`` may be a faust memory store's dict (``key_partition`` its key -> partition
    map): writes go straight into it, and :meth:`drain` hands the changed keys to the caller,
    which writes them to the changelog. ``partition`` is the partition of the event being
    processed; it is where a written key's changelog record goes.

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
    ) -> None:
        self.data: MutableMapping[str, Any] = {} if data is None else data
        self.key_partition: MutableMapping[str, int] = (
            {} if key_partition is None else key_partition
        )
        self.partition = 0
        self.dirty: dict[str, int] = {}

    def get(self, key: str, default: Any = None, /) -> Any:
        return self.data.get(key, default)

    def __setitem__(self, key: str, value: Any, /) -> None:
        # set_on's body, not a call to it: the feature extractor writes ~4 keys a transaction
        self.data[key] = value
        self.dirty[key] = self.key_partition[key] = self.partition

    def __len__(self) -> int:
        return len(self.data)

    def set_on(self, partition: int, key: str, value: Any) -> None:
        """Write ``key`` whose changelog partition is ``partition``."""
        self.data[key] = value
        self.dirty[key] = self.key_partition[key] = partition

    def delete(self, key: str) -> None:
        """Remove ``key``; its changelog gets a tombstone."""
        if key in self.data:
            del self.data[key]
            self.dirty[key] = self.key_partition.pop(key, self.partition)

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


class ScoredStore(TrackedStore):
    """The ``scored`` table: each value is held as its JSON bytes (what its changelog record
    carries, so faust's table uses the raw serializer) and decoded when read.

    An entry is written once per transaction and read again only for a redelivery or a
    label, and a worker keeps up to millions of them: as bytes they take about half the
    memory and nothing for the garbage collector to walk (as dicts, ~5 tracked containers
    each, every full collection would pause the worker for seconds).

    >>> s = ScoredStore()
    >>> s.set_on(2, "t1", {"at": 5.0, "l": 0})
    >>> s.data["t1"], s.get("t1")["at"], s.drain_encoded()
    (b'{"at":5.0,"l":0}', 5.0, [(2, b'"t1"', b'{"at":5.0,"l":0}')])
    """

    def get(self, key: str, default: Any = None, /) -> Any:
        raw = self.data.get(key)
        return default if raw is None else _orjson_loads(raw)

    def __setitem__(self, key: str, value: Any, /) -> None:
        self.set_on(self.partition, key, value)

    def set_on(self, partition: int, key: str, value: Any) -> None:
        self.set_encoded(partition, key, dumps(value))

    def set_encoded(self, partition: int, key: str, raw: bytes) -> None:
        """Write ``key`` as ``raw``, which must be :func:`dumps` of its value (for a writer
        that has the encoding at hand already)."""
        self.data[key] = raw
        self.dirty[key] = self.key_partition[key] = partition

    def drain_encoded(self) -> list[tuple[int, bytes, bytes | None]]:
        if not self.dirty:
            return []
        get = self.data.get  # the values are their encoding already
        out = [(p, _json_str(k).encode(), get(k)) for k, p in self.dirty.items()]
        self.dirty = {}
        return out

    def expire(self, now: float, ttl_s: float, max_entries: int) -> int:
        """Drop entries older than ``ttl_s`` or beyond ``max_entries`` (oldest first, in
        insertion order); returns how many went.

        >>> s = ScoredStore()
        >>> for i in range(5):
        ...     s[f"t{i}"] = {"at": float(i)}
        >>> s.expire(now=10.0, ttl_s=8.0, max_entries=2), sorted(s.data)
        (3, ['t3', 't4'])
        """
        cutoff = now - ttl_s
        excess = len(self.data) - max_entries
        doomed = []
        for key, raw in self.data.items():
            value = _orjson_loads(raw)
            if excess > 0 or (isinstance(value, dict) and value.get("at", now) < cutoff):
                doomed.append(key)
                excess -= 1
            else:
                break
        for key in doomed:
            self.delete(key)
        return len(doomed)


@dataclass
class BatchResult:
    """What one batch of transactions produced."""

    decisions: list[OutputRecord] = field(default_factory=list)
    dead_letters: list[OutputRecord] = field(default_factory=list)
    actions: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    duplicates: int = 0
    skipped: int = 0


@dataclass
class LabelResult:
    """What one batch of labels did."""

    learned: int = 0
    unknown: int = 0
    duplicate: int = 0
    dead_letters: list[OutputRecord] = field(default_factory=list)
    unknown_ids: list[str] = field(default_factory=list)


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
    ) -> None:
        self.retailer = retailer
        self.config = config or ConfigDocument.default()
        policy = self.config.policy
        # a restored model stays until a config asks for another kind (apply_config)
        self.model = model if model is not None else model_from_config(policy.model,
                                                                       policy.river_model)
        self.features = features if features is not None else TrackedStore()
        self.scored = scored if scored is not None else ScoredStore()
        self.extractor = FeatureExtractor()
        self.names: tuple[str, ...] = FEATURE_NAMES

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
        """Decide every transaction in ``records``; bad ones become dead letters.

        Three passes: parse, dedup and extract each record's features in order; score all
        new transactions with one compiled call (:meth:`RiskModel.score_and_explain_many`,
        the same scores as one by one); decide and encode each. Decisions come out in input
        order.
        """
        received = time.time() if now is None else now
        policy = self.config.policy  # once: a config swap applies between batches
        extract = self.extractor.extract_values
        features = self.features
        scored = self.scored
        scored_get = scored.get
        retailer = self.retailer
        out = BatchResult()
        decisions = out.decisions
        slots: list[OutputRecord | None] = []  # decisions in input order, new ones filled last
        fresh: list[tuple[Record, ParsedTransaction, int]] = []  # (record, tx, slot)
        vectors: list[list[float]] = []
        first_slot: dict[str, int] = {}  # tx_id -> slot of its first delivery in this batch
        repeats: list[tuple[Record, int, int]] = []  # (record, its slot, first slot)
        for rec in records:
            try:
                parsed = parse_transaction(rec.value)
            except BadRecord as exc:
                out.dead_letters.append(dead_letter(rec, exc.reason, exc.message, retailer))
                continue
            tx = parsed.tx
            if parsed.op not in SCORE_OPS:
                out.skipped += 1
                continue
            if tx.retailer_id != retailer:
                out.dead_letters.append(dead_letter(
                    rec, "wrong-retailer", f"retailer_id {tx.retailer_id!r} on the topic of "
                    f"{retailer!r}", retailer))
                continue
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
            features.partition = rec.partition
            values = extract(tx, features)
            if not isfinite(fsum(values)):  # cannot happen with validated input; guards dumps
                out.dead_letters.append(dead_letter(
                    rec, "non-finite-features", f"features {values!r}", retailer))
                continue
            first_slot[tx_id] = len(slots)
            fresh.append((rec, parsed, len(slots)))
            vectors.append(values)
            slots.append(None)
        if fresh:
            self._decide_fresh(fresh, vectors, slots, out, received, policy)
        for rec, slot, first in repeats:
            original = slots[first]
            assert original is not None
            slots[slot] = OutputRecord(rec.key, original.value, rec.partition)
        decisions.extend(r for r in slots if r is not None)
        return out

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
        # fromiter over the flattened rows: half the time of np.array on a list of lists
        matrix = np.fromiter(chain.from_iterable(vectors), dtype=np.float64,
                             count=len(vectors) * len(names)).reshape(len(vectors), len(names))
        # observe: the anomaly statistics learn every scored event (labelled or not)
        scores, explained = self.model.score_and_explain_many(names, matrix, policy.top_reasons,
                                                              observe=True)
        set_scored = self.scored.set_encoded
        actions = out.actions
        latencies = out.latencies
        with_features = bool(policy.rules)  # rules may read features; nothing else does
        # the tail of every `scored` changelog value this batch: `..."at":<received>,"l":0,`
        at_tail = b',"at":' + dumps(received) + b',"l":0,"p":'
        for (rec, parsed, slot), values, score, contributions in zip(
                fresh, vectors, scores, explained, strict=True):
            tx = parsed.tx
            partition = rec.partition
            timings = {"received": received}
            if parsed.committed_at is not None:
                timings["committed"] = parsed.committed_at
            stamp = rec.timestamp
            if stamp is not None:
                timings["produced"] = stamp
            x = dict(zip(names, values, strict=True)) if with_features else None
            decision = decide(tx, score, policy, contributions, x, version, timings).to_dict()
            encoded = dumps(decision)
            # dumps({"d": decision, "x": values, "at": received, "l": 0, "p": partition}),
            # reusing the decision's encoding
            set_scored(partition, tx.tx_id, b'{"d":' + encoded + b',"x":' + dumps(values)
                       + at_tail + str(partition).encode() + b"}")
            slots[slot] = OutputRecord(rec.key, encoded, partition)
            action = decision["action"]
            actions[action] = actions.get(action, 0) + 1
            if stamp is not None:
                latencies.append(decision["timings"]["decided"] - stamp)

    def learn_batch(self, records: Iterable[Record]) -> LabelResult:
        """Learn from each label whose transaction is still in ``scored``, at most once."""
        out = LabelResult()
        scored = self.scored
        model = self.model
        names = self.names
        for rec in records:
            try:
                if rec.value is None:
                    raise BadRecord("empty", "no value (tombstone)")
                try:
                    label = Label.from_json(rec.value)
                except SchemaError as exc:
                    raise BadRecord("invalid", str(exc)) from None
            except BadRecord as exc:
                out.dead_letters.append(dead_letter(rec, exc.reason, exc.message, self.retailer))
                continue
            if label.retailer_id not in (None, self.retailer):
                out.dead_letters.append(dead_letter(
                    rec, "wrong-retailer", f"label for retailer {label.retailer_id!r}",
                    self.retailer))
                continue
            entry = scored.get(label.tx_id)
            if entry is None:
                out.unknown += 1
                out.unknown_ids.append(label.tx_id)
                continue
            if entry["l"]:
                out.duplicate += 1
                continue
            model.learn_one(dict(zip(names, entry["x"], strict=True)), label.is_fraud)
            scored.set_on(entry["p"], label.tx_id, {**entry, "l": 1})
            out.learned += 1
        if out.unknown_ids:
            log.info("labels for %d unknown or expired transactions, e.g. %s",
                     out.unknown, out.unknown_ids[:3])
        return out
