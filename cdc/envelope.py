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
import time
from typing import Any, Final

ENVELOPE_VERSION: Final = 1
DLQ_VERSION: Final = 1


def dumps(record: dict[str, Any]) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode()


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
