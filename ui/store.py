"""The UI's in-memory view of Kafka: size-capped, thread-safe, shared by every session.

One background reader (:mod:`ui.kafka_reader`) writes; page reruns only read snapshots, so a
rerun never waits on Kafka. Every collection has a cap and drops its oldest entries first, so
memory stays bounded however long the app runs.

>>> from fraud.schema import Decision
>>> s = Store(max_decisions=2)
>>> for i in range(3):
...     s.add_decision(Decision(f"t{i}", "acme", 0.9, "hold", timings={"decided": i}), "c")
>>> [r.decision.tx_id for r in s.feed()]
['t2', 't1']
>>> s.claim_verdict("t2", True), s.claim_verdict("t2", False)
(True, False)
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from fraud.schema import Decision, Label

REVIEW_ACTIONS: Final = ("hold", "verify")

K = TypeVar("K")
V = TypeVar("V")


class CappedDict(Generic[K, V]):
    """An insertion-ordered dict that forgets its oldest entries beyond ``cap``.

    >>> d: CappedDict[str, int] = CappedDict(2)
    >>> d["a"], d["b"], d["c"] = 1, 2, 3
    >>> list(d.items()), len(d), "a" in d
    ([('b', 2), ('c', 3)], 2, False)
    """

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError("cap must be >= 1")
        self.cap = cap
        self._items: OrderedDict[K, V] = OrderedDict()

    def __setitem__(self, key: K, value: V) -> None:
        self._items[key] = value
        while len(self._items) > self.cap:
            self._items.popitem(last=False)

    def __getitem__(self, key: K) -> V:
        return self._items[key]

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K, default: V | None = None) -> V | None:
        return self._items.get(key, default)

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def items(self) -> list[tuple[K, V]]:
        return list(self._items.items())

    def values(self) -> list[V]:
        return list(self._items.values())


@dataclass(frozen=True)
class DecisionRow:
    """A decision as read from ``<R>.decisions``, with its Kafka key (the customer id)."""

    decision: Decision
    key: str | None
    seen_at: float

    @property
    def decided_at(self) -> float:
        return self.decision.timings.get("decided", self.seen_at)

    @property
    def latency_s(self) -> float | None:
        """Commit (or, without CDC, produce/receive) to decision, in seconds."""
        t = self.decision.timings
        start = t.get("committed", t.get("produced", t.get("received")))
        if start is None or "decided" not in t:
            return None
        return max(0.0, t["decided"] - start)


@dataclass(frozen=True)
class Verdict:
    """An analyst's verdict: ``sending`` until Kafka acknowledged it, then ``sent``."""

    tx_id: str
    is_fraud: bool
    state: str
    at: float
    error: str = ""


@dataclass(frozen=True)
class KafkaStatus:
    reachable: bool | None = None  # None: not tried yet
    error: str = ""
    since: float = field(default_factory=time.time)
    retailers: tuple[str, ...] = ()
    labels_loaded: bool = False
    """Every retailer's past labels are read: verdicts can be checked against them."""


@dataclass(frozen=True)
class TopicRecord:
    """A record of a shared topic (config, rejections, federated rounds), kept as read."""

    topic: str
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float


class Store:
    """Decisions, transactions, labels, verdicts and shared-topic records, each capped."""

    def __init__(self, max_decisions: int = 20_000, max_transactions: int = 20_000,
                 max_labels: int = 100_000, max_records: int = 1_000) -> None:
        self._lock = threading.Lock()
        self._decisions: CappedDict[str, DecisionRow] = CappedDict(max_decisions)
        self._transactions: CappedDict[str, dict[str, Any]] = CappedDict(max_transactions)
        self._labels: CappedDict[str, Label] = CappedDict(max_labels)
        self._verdicts: CappedDict[str, Verdict] = CappedDict(max_labels)
        self._records: dict[str, deque[TopicRecord]] = {}
        self._max_records = max_records
        self.status = KafkaStatus()

    # writers (the reader thread, and the verdict publisher)

    def add_decision(self, decision: Decision, key: str | None,
                     seen_at: float | None = None) -> None:
        """Keep the first copy of a decision: a redelivered one is the same decision."""
        with self._lock:
            if decision.tx_id not in self._decisions:
                self._decisions[decision.tx_id] = DecisionRow(
                    decision, key, time.time() if seen_at is None else seen_at)

    def add_transaction(self, tx_id: str, fields: dict[str, Any]) -> None:
        with self._lock:
            self._transactions[tx_id] = fields

    def add_label(self, label: Label) -> None:
        with self._lock:
            self._labels[label.tx_id] = label
            if label.source == "analyst":
                self._verdicts[label.tx_id] = Verdict(label.tx_id, label.is_fraud, "sent",
                                                      label.labelled_at)

    def add_record(self, record: TopicRecord) -> None:
        with self._lock:
            kept = self._records.setdefault(record.topic, deque(maxlen=self._max_records))
            kept.append(record)

    def set_status(self, status: KafkaStatus) -> None:
        self.status = status  # one reference swap: readers see the old or the new one

    def claim_verdict(self, tx_id: str, is_fraud: bool) -> bool:
        """Reserve the one verdict of ``tx_id``; False if it has one (or a label) already."""
        with self._lock:
            held = self._verdicts.get(tx_id)
            if (held is not None and held.state != "failed") or tx_id in self._labels:
                return False
            self._verdicts[tx_id] = Verdict(tx_id, is_fraud, "sending", time.time())
            return True

    def settle_verdict(self, tx_id: str, error: str | None) -> None:
        """Kafka's answer for a claimed verdict: ``sent``, or ``failed`` (claimable again)."""
        with self._lock:
            held = self._verdicts.get(tx_id)
            if held is None or held.state == "sent":
                return
            state = "failed" if error else "sent"
            self._verdicts[tx_id] = Verdict(tx_id, held.is_fraud, state, held.at, error or "")

    # readers (page reruns): copies, never live views

    def feed(self, retailers: Collection[str] | None = None,
             actions: Collection[str] | None = None, min_score: float = 0.0,
             max_score: float = 1.0, limit: int | None = None) -> list[DecisionRow]:
        """Decisions newest first, filtered."""
        with self._lock:
            rows = self._decisions.values()
        rows.sort(key=lambda r: r.decided_at, reverse=True)
        out = [r for r in rows
               if (not retailers or r.decision.retailer_id in retailers)
               and (not actions or r.decision.action in actions)
               and min_score <= r.decision.score <= max_score]
        return out[:limit] if limit is not None else out

    def review_queue(self, retailers: Collection[str] | None = None) -> list[DecisionRow]:
        """Hold and verify decisions without a verdict or label, oldest first."""
        with self._lock:
            rows = [r for r in self._decisions.values()
                    if r.decision.action in REVIEW_ACTIONS
                    and (not retailers or r.decision.retailer_id in retailers)
                    and r.decision.tx_id not in self._labels
                    and self._verdict_open(r.decision.tx_id)]
        rows.sort(key=lambda r: r.decided_at)
        return rows

    def _verdict_open(self, tx_id: str) -> bool:
        held = self._verdicts.get(tx_id)
        return held is None or held.state == "failed"

    def decision(self, tx_id: str) -> DecisionRow | None:
        with self._lock:
            return self._decisions.get(tx_id)

    def transaction(self, tx_id: str) -> dict[str, Any] | None:
        with self._lock:
            fields = self._transactions.get(tx_id)
            return dict(fields) if fields is not None else None

    def amounts(self, tx_ids: Iterable[str]) -> dict[str, tuple[float, str]]:
        with self._lock:
            out = {}
            for tx_id in tx_ids:
                fields = self._transactions.get(tx_id)
                if fields is not None:
                    out[tx_id] = (float(fields.get("amount", 0.0)), str(fields.get("currency")))
            return out

    def labels(self) -> list[Label]:
        with self._lock:
            return self._labels.values()

    def verdict(self, tx_id: str) -> Verdict | None:
        with self._lock:
            return self._verdicts.get(tx_id)

    def records(self, topic: str) -> list[TopicRecord]:
        with self._lock:
            return list(self._records.get(topic, ()))

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {"decisions": len(self._decisions), "transactions": len(self._transactions),
                    "labels": len(self._labels), "verdicts": len(self._verdicts),
                    **{t: len(r) for t, r in self._records.items()}}
