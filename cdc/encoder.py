"""Turn a source transaction into ready-to-produce Kafka records (keys and JSON values).

:class:`ChangeEncoder` maps each change of a :class:`SourceTransaction` to the canonical
transaction, builds its envelope (or dead letter, and the tombstone after a delete) and
encodes it; the result, an :class:`EncodedTransaction`, keeps the source transaction's
position, so the sink still commits at source-transaction boundaries. It runs where the source
is read: in the reader child process by default, so that the parent only produces bytes and
commits. Encoded records are far cheaper to pass between processes than source rows
(``Decimal`` and ``datetime`` values pickle slowly).

>>> from cdc.mapping import RowMapper
>>> mapper = RowMapper.from_config({"static": {"retailer_id": "acme"}, "fields": {
...     "tx_id": "id", "customer_id": "c", "payment_instrument": "p", "amount": "a",
...     "occurred_at": "t"}})
>>> enc = ChangeEncoder(mapper, {"connector": "mysql", "id": "s"}, key_field="customer_id",
...                     tombstones=True)
>>> row = {"id": 1, "c": "c9", "p": "h", "a": 5, "t": 0}
>>> out = enc.encode(SourceTransaction([Change("d", "1", row, None, 2.0),
...                                     Change("c", "2", None, {"id": 2}, 2.0)], {"pos": 4}))
>>> [(TOPICS[t], k, v is None) for t, k, v in out.records]
[('topic', b'c9', False), ('topic', b'c9', True), ('dlq', b'2', False)]
>>> out.dead_letters, out.position, out.committed_ats
(1, {'pos': 4}, [2.0, 2.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final

from cdc.envelope import change_envelope, dead_letter, dumps, dumps_finite
from cdc.mapping import MappingError, RowMapper, json_safe
from cdc.source import Change, Position, SourceTransaction

TOPIC: Final = 0  # <retailer>.transactions
DLQ: Final = 1  # <retailer>.transactions.dlq
TOPICS: Final = ("topic", "dlq")

Record = tuple[int, bytes, bytes | None]  # (TOPIC | DLQ, key, value; None = tombstone)


@dataclass(slots=True)
class EncodedTransaction:
    """The Kafka records of one source transaction (or snapshot chunk) and its position."""

    records: list[Record]
    committed_ats: list[float]  # one per change, for the commit-to-Kafka lag metrics
    position: Position
    snapshot: bool = False
    complete: bool = True  # False: a snapshot chunk; commit only after the last one
    meta: dict[str, Any] = field(default_factory=dict)
    dead_letters: int = 0

    def absorb(self, other: EncodedTransaction) -> bool:
        """Append ``other``, the source transaction right after this one, when both are whole
        streamed transactions (the merged one still ends at a source-transaction boundary:
        ``other``'s); False, changing nothing, otherwise. One object per batch instead of per
        change is cheaper to pickle and to take in the parent.

        >>> a = EncodedTransaction([(TOPIC, b"k", b"1")], [1.0], {"pos": 1})
        >>> a.absorb(EncodedTransaction([(TOPIC, b"k", b"2")], [2.0], {"pos": 2}))
        True
        >>> a.records, a.committed_ats, a.position
        ([(0, b'k', b'1'), (0, b'k', b'2')], [1.0, 2.0], {'pos': 2})
        >>> a.absorb(EncodedTransaction([], [], {"pos": 3}, snapshot=True))
        False
        """
        if not (self._plain and other._plain):
            return False
        self.records.extend(other.records)
        self.committed_ats.extend(other.committed_ats)
        self.position = other.position
        self.dead_letters += other.dead_letters
        return True

    @property
    def _plain(self) -> bool:
        return self.complete and not self.snapshot and not self.meta

    def __reduce__(self) -> tuple[Any, ...]:
        return (EncodedTransaction, (self.records, self.committed_ats, self.position,
                                     self.snapshot, self.complete, self.meta,
                                     self.dead_letters))


class ChangeEncoder:
    """Maps and encodes changes; rows that cannot be mapped become dead letters."""

    def __init__(self, mapper: RowMapper, source: dict[str, Any], *, key_field: str,
                 tombstones: bool) -> None:
        self.mapper = mapper
        self.source = dict(source)  # describe() + "id"
        self.key_field = key_field
        self.tombstones = tombstones

    def encode(self, tx: SourceTransaction) -> EncodedTransaction:
        records: list[Record] = []
        dead = 0
        for change in tx.changes:
            if not self._encode_change(change, tx, records):
                dead += 1
        return EncodedTransaction(records, [c.committed_at for c in tx.changes], tx.position,
                                  tx.snapshot, tx.meta.get("complete", True) is not False,
                                  tx.meta, dead)

    def _encode_change(self, change: Change, tx: SourceTransaction,
                       out: list[Record]) -> bool:
        """Append the change's records to ``out``; False when it went to the DLQ."""
        where = {**self.source, "pk": change.pk, "snapshot": tx.snapshot,
                 "position": tx.position}
        # floats elsewhere are validated canonical values or json_safe output (finite)
        encode = dumps_finite if math.isfinite(change.committed_at) else dumps
        op = change.op
        row = change.before if op == "d" else change.after
        try:
            if change.error is not None:
                raise MappingError("row", change.error)
            canonical = self.mapper.map(row or {}).to_dict()
        except MappingError as exc:
            out.append((DLQ, change.pk.encode(), encode(dead_letter(
                raw=json_safe({"before": change.before, "after": change.after}),
                error=str(exc), field=exc.field, op=op, source=where,
                committed_at=change.committed_at))))
            return False
        before: dict[str, Any] | None = None
        if op == "u" and change.before is not None:
            try:
                before = self.mapper.map(change.before).to_dict()
            except MappingError:
                before = None
        elif op == "d":
            before = canonical
        key = str(canonical.get(self.key_field) or change.pk).encode()
        out.append((TOPIC, key, encode(change_envelope(
            op=op, tx=None if op == "d" else canonical, before=before, source=where,
            committed_at=change.committed_at))))
        if op == "d" and self.tombstones:
            out.append((TOPIC, key, None))
        return True
