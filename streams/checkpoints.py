"""Model checkpoints: the model's plain-data state (JSON, never pickle) on a compacted topic.

``<retailer>.checkpoints`` holds, under key ``<retailer>``::

    {"v": 1, "kind": "model-checkpoint", "retailer_id": "acme", "written_at": 1767225600.0,
     "config_version": 3, "model": {...RiskModel.export_state()...}}

A River model without a plain-data state (``RiverModel.has_plain_state`` false: trees,
forests, HalfSpaceTrees) is checkpointed with River's own serialisation instead, as
``"river_checkpoint": <base64>`` and ``"model": null``: these bytes never leave the worker's
own topic, and are only ever read by a worker of that retailer.

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

import base64
import binascii
import json
import logging
import pickle
import time
from collections.abc import Iterable
from typing import Any

from fraud.models import RiskModel, RiverModel
from fraud.models.river_state import RIVER_LINEAR_KIND
from fraud.schema import SchemaError

log = logging.getLogger(__name__)


def checkpoint_value(
    retailer: str, model: RiskModel | RiverModel, config_version: int, now: float | None = None
) -> bytes:
    doc: dict[str, Any] = {
        "v": 1,
        "kind": "model-checkpoint",
        "retailer_id": retailer,
        "written_at": time.time() if now is None else now,
        "config_version": config_version,
        "model": None,
    }
    if isinstance(model, RiverModel) and not model.has_plain_state:
        doc["river_checkpoint"] = base64.b64encode(model.to_checkpoint()).decode()
    else:
        doc["model"] = model.export_state()
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def model_from_checkpoints(
    records: Iterable[tuple[int, bytes | None, bytes | None]], retailer: str
) -> RiskModel | RiverModel | None:
    """The model of the newest valid checkpoint of ``retailer`` among ``(offset, key,
    value)`` records in topic order, or None; invalid ones are logged and skipped."""
    newest: RiskModel | RiverModel | None = None
    for offset, key, value in records:
        if key != retailer.encode() or value is None:
            continue
        try:
            doc = json.loads(value)
            if doc.get("kind") != "model-checkpoint" or doc.get("v") != 1:
                raise SchemaError("kind", "not a v1 model-checkpoint")
            if doc.get("river_checkpoint") is not None:
                newest = RiverModel.from_checkpoint(base64.b64decode(doc["river_checkpoint"]))
            elif doc["model"].get("kind") == RIVER_LINEAR_KIND:
                newest = RiverModel.from_state(doc["model"])
            else:
                newest = RiskModel.from_state(doc["model"])
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error,
                pickle.UnpicklingError, EOFError) as exc:
            log.warning("skipping checkpoint at offset %d: %s", offset, exc)
    return newest
