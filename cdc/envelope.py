"""The JSON records CDC writes to Kafka: change envelopes, dead letters and checkpoints.

A change on ``<retailer>.transactions`` (key: the canonical ``customer_id``, UTF-8)::

    {"v": 1, "op": "c", "tx": {...Transaction.to_dict()...}, "before": null,
     "source": {"connector": "mysql", "id": "acme-orders", "db": "shop", "table": "orders",
                "pk": "42", "snapshot": false, "position": {"file": "mysql-bin.000003",
                "pos": 1234}},
     "committed_at": 1767225600.0, "produced_at": 1767225600.08}

``op`` is one letter, as in Debezium: ``r`` a snapshot read, ``c`` create, ``u`` update,
``d`` delete. ``tx`` is the row after the change (null for ``d``); ``before`` is the canonical
row before it when the source has it (MySQL always; MongoDB with pre-images), else null.
``committed_at``/``produced_at`` are epoch seconds (float).

>>> env = change_envelope(op="d", tx=None, before={"tx_id": "1"}, source={"pk": "1"},
...                       committed_at=2.0, produced_at=2.5)
>>> env["op"], env["tx"], env["before"], env["v"]
('d', None, {'tx_id': '1'}, 1)
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Final

_orjson: Any
try:  # optional: about ten times faster than the standard library for these records
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

ENVELOPE_VERSION: Final = 1
DLQ_VERSION: Final = 1


def _std_dumps(record: Any) -> bytes:
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode()


def dumps(record: dict[str, Any]) -> bytes:
    """Compact JSON bytes; NaN/Infinity anywhere raise ValueError (as the standard library).

    >>> json.loads(dumps({"a": [1, 2.5, None, "é"]}))
    {'a': [1, 2.5, None, 'é']}
    """
    if _orjson is not None and not _has_non_finite(record):
        return dumps_finite(record)
    return _std_dumps(record)


def dumps_finite(record: Any) -> bytes:
    """:func:`dumps` for records whose floats are known to be finite (no walk to check them).

    For change envelopes and dead letters: their floats are validated canonical values
    (:class:`fraud.schema.Transaction` rejects NaN/Infinity), :func:`cdc.mapping.json_safe`
    output (non-finite floats become strings) and timestamps. ``orjson`` (when installed)
    writes the same JSON values as the standard library, about ten times faster; it would
    write NaN as null, hence the contract. Big integers and non-string keys take the
    standard path.
    """
    if _orjson is not None:
        try:
            data: bytes = _orjson.dumps(record)
            return data
        except TypeError:  # orjson.JSONEncodeError: int beyond 64 bits, non-str key, ...
            pass
    return _std_dumps(record)


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite(v) for v in value)
    return False


def change_envelope(*, op: str, tx: dict[str, Any] | None, before: dict[str, Any] | None,
                    source: dict[str, Any], committed_at: float,
                    produced_at: float | None = None) -> dict[str, Any]:
    """The value of one record on ``<retailer>.transactions``."""
    return {
        "v": ENVELOPE_VERSION,
        "op": op,
        "tx": tx,
        "before": before,
        "source": source,
        "committed_at": committed_at,
        "produced_at": time.time() if produced_at is None else produced_at,
    }


def dead_letter(*, raw: Any, error: str, field: str | None, op: str, source: dict[str, Any],
                committed_at: float) -> dict[str, Any]:
    """The value of one record on ``<retailer>.transactions.dlq``; ``raw`` must be JSON-safe.

    >>> dead_letter(raw={"id": 1}, error="amount: is required", field="amount", op="c",
    ...             source={"pk": "1"}, committed_at=1.0)["error"]
    'amount: is required'
    """
    return {
        "v": DLQ_VERSION,
        "error": error,
        "field": field,
        "op": op,
        "raw": raw,
        "source": source,
        "committed_at": committed_at,
        "failed_at": time.time(),
    }


def checkpoint_record(source_id: str, position: dict[str, Any]) -> dict[str, Any]:
    """The value stored under key ``source_id`` on the compacted offsets topic."""
    return {"v": 1, "source_id": source_id, "position": position, "stored_at": time.time()}
