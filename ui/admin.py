"""The admin page's logic: form values to a config change, validated and signed exactly as a
worker will check it (``ConfigDocument`` then :func:`~streams.config_stream.check_config`).

>>> from streams.config_stream import ConfigDocument
>>> form = ConfigForm.of(ConfigDocument.default())
>>> form.verify, form.model, form.block["devices"]
(0.5, 'default', '')
>>> form = form.with_(verify=0.9)
>>> try:
...     build(ConfigDocument.default(), form, version=1, scope="*", issued_by="a")
... except SchemaError as exc:
...     field_of(exc), str(exc)
('thresholds', 'thresholds: need verify <= hold <= block')
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Final

from fraud.decisions import LIST_KINDS
from fraud.models.river_spec import LINEAR_SPEC
from fraud.schema import SchemaError
from pqc import TimeWindow
from streams.config_stream import ConfigDocument, Outcome, check_config, sign_config

MODEL_PRESETS: Final[dict[str, tuple[str, list[dict[str, Any]] | None]]] = {
    "default": ("qsfraud risk model (default)", None),
    "river-logistic": ("River: StandardScaler + LogisticRegression",
                       [dict(step) for step in LINEAR_SPEC]),
    "river-hoeffding": ("River: StandardScaler + Hoeffding adaptive tree",
                        [{"class": "preprocessing.StandardScaler", "params": {}},
                         {"class": "tree.HoeffdingAdaptiveTreeClassifier",
                          "params": {"seed": 42}}]),
    "river-arf": ("River: adaptive random forest",
                  [{"class": "forest.ARFClassifier", "params": {"n_models": 10, "seed": 42}}]),
    "custom": ("River: custom spec (JSON)", None),
}
FIELDS: Final = ("thresholds", "block", "allow", "model", "top_reasons", "fl", "rules")


@dataclass(frozen=True)
class ConfigForm:
    """What the admin form holds: lists as one entry per line, the model as a preset."""

    verify: float
    hold: float
    block_at: float
    block: dict[str, str]
    allow: dict[str, str]
    model: str
    custom_spec: str
    top_reasons: int
    fl_sync_interval_s: float

    @classmethod
    def of(cls, doc: ConfigDocument) -> ConfigForm:
        p = doc.policy
        spec = [dict(s) for s in p.river_model] if p.river_model is not None else None
        model = "default" if spec is None else next(
            (k for k, (_, s) in MODEL_PRESETS.items() if s == spec), "custom")
        return cls(
            verify=p.thresholds.verify, hold=p.thresholds.hold, block_at=p.thresholds.block,
            block={k: "\n".join(sorted(p.block.get(k, ()))) for k in LIST_KINDS},
            allow={k: "\n".join(sorted(p.allow.get(k, ()))) for k in LIST_KINDS},
            model=model,
            custom_spec=json.dumps(spec if spec is not None else list(LINEAR_SPEC), indent=1),
            top_reasons=p.top_reasons, fl_sync_interval_s=doc.fl_sync_interval_s)

    def with_(self, **changes: Any) -> ConfigForm:
        return replace(self, **changes)


def _lines(text: str) -> list[str]:
    return sorted({line.strip() for line in text.splitlines() if line.strip()})


def changes_of(form: ConfigForm) -> dict[str, Any]:
    """Dotted-path changes for :meth:`ConfigDocument.updated`; a bad custom spec raises."""
    if form.model == "custom":
        try:
            spec: Any = json.loads(form.custom_spec)
        except json.JSONDecodeError as exc:
            raise SchemaError("river_model", f"not JSON: {exc.msg} (line {exc.lineno})") from None
    else:
        spec = MODEL_PRESETS[form.model][1]
    return {
        "policy.thresholds": {"verify": form.verify, "hold": form.hold, "block": form.block_at},
        "policy.block": {k: _lines(v) for k, v in form.block.items() if _lines(v)},
        "policy.allow": {k: _lines(v) for k, v in form.allow.items() if _lines(v)},
        "policy.river_model": spec,
        "policy.top_reasons": form.top_reasons,
        "fl.sync_interval_s": form.fl_sync_interval_s,
    }


def build(current: ConfigDocument, form: ConfigForm, *, version: int, scope: str,
          issued_by: str) -> ConfigDocument:
    """The next document: validated by ``ConfigDocument`` as workers do, or ``SchemaError``."""
    return current.updated(changes_of(form), version=version, scope=scope, issued_by=issued_by)


def sign_and_check(doc: ConfigDocument, admin: Any, registry: Any) -> tuple[bytes, Outcome]:
    """Sign, then run the worker's own check on the blob (signature, role, time, schema)."""
    blob = sign_config(doc, admin.identity)
    return blob, check_config(blob, registry, window=TimeWindow(max_age_s=600, max_future_s=120))


def field_of(exc: SchemaError) -> str:
    """Which form field a validation error belongs to (``general`` when none fits)."""
    head = exc.field.split(".")[0].split("[")[0]
    if head in ("river_model", "model", "params") or head.startswith("river_"):
        return "model"
    if head == "policy" and "." in exc.field:
        head = exc.field.split(".")[1]
    return head if head in FIELDS else "general"
