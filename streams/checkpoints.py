"""Model checkpoints: the model's plain-data state (JSON, never pickle) on a compacted topic.

``<retailer>.checkpoints`` holds, under key ``<retailer>``::

    {"v": 1, "kind": "model-checkpoint", "retailer_id": "acme", "written_at": 1767225600.0,
     "config_version": 3, "model": {...RiskModel.export_state()...}}

Workers write one every ``checkpoint_interval_s`` and restore the newest valid one on start.
Several workers of one retailer each write their own model; the last one written wins on
restore (their models are merged by federated learning, not here).

>>> from fraud.models import RiskModel
>>> m = RiskModel()
>>> m.learn_one({"x": 1.0}, True)
>>> value = checkpoint_value("acme", m, config_version=2, now=5.0)
>>> restored = model_from_checkpoints([(0, b"acme", b"{broken"), (1, b"acme", value)], "acme")
>>> restored is not None and restored.n == 1
True
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from fraud.models import RiskModel
from fraud.schema import SchemaError

log = logging.getLogger(__name__)


def checkpoint_value(
    retailer: str, model: RiskModel, config_version: int, now: float | None = None
) -> bytes:
    doc: dict[str, Any] = {
        "v": 1,
        "kind": "model-checkpoint",
        "retailer_id": retailer,
        "written_at": time.time() if now is None else now,
        "config_version": config_version,
        "model": model.export_state(),
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def model_from_checkpoints(
    records: Iterable[tuple[int, bytes | None, bytes | None]], retailer: str
) -> RiskModel | None:
    """The model of the newest valid checkpoint of ``retailer`` among ``(offset, key,
    value)`` records in topic order, or None; invalid ones are logged and skipped."""
    newest: RiskModel | None = None
    for offset, key, value in records:
        if key != retailer.encode() or value is None:
            continue
        try:
            doc = json.loads(value)
            if doc.get("kind") != "model-checkpoint" or doc.get("v") != 1:
                raise SchemaError("kind", "not a v1 model-checkpoint")
            newest = RiskModel.from_state(doc["model"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("skipping checkpoint at offset %d: %s", offset, exc)
    return newest
