"""River's ``StandardScaler | LogisticRegression`` as versioned plain data, and its exact merge.

River has no merge API and keeps no sample counts, so the federation gets them here:

* :func:`export_linear_pipeline` / :func:`load_linear_pipeline`: the pipeline's state as a
  JSON-able dict with an explicit version (scaler ``counts``/``means``/``vars``, logistic
  weights, intercept and hyper-parameters) plus the label counts ``n``/``n_pos``/``n_neg``,
  which the caller tracks (River does not);
* :func:`merge_linear_pipelines`: scaler statistics merged exactly (Chan's formula,
  :func:`~fraud.models.scaler.merge_scalers`); the logistic models averaged, weighted by ``n``,
  in *raw* feature space: each model's weights are divided by its own scaler's standard
  deviations (its intercept absorbs the means), averaged, and mapped back under the merged
  scaler. For a vector that carries every feature, the merged pipeline's logit is the
  count-weighted mean of the inputs' logits (up to rounding); averaging the scaled weights
  directly would mix models that measure each feature in different units.

A feature a model's scaler has not seen, or saw with zero variance, is one River's scaler maps
to 0: in raw space that model's weight on it is 0, and it is averaged as such.

>>> from river import compose, linear_model, preprocessing
>>> def fitted(rows):
...     pipe = preprocessing.StandardScaler() | linear_model.LogisticRegression()
...     for x, y in rows:
...         pipe.learn_one(x, y)
...     return export_linear_pipeline(pipe, n=len(rows), n_pos=sum(y for _, y in rows),
...                                   n_neg=sum(not y for _, y in rows))
>>> a = fitted([({"amount": 10.0}, False), ({"amount": 30.0}, True)] * 5)
>>> b = fitted([({"amount": 100.0}, False), ({"amount": 300.0}, True)] * 5)
>>> merged = merge_linear_pipelines([a, b])
>>> merged["linear"]["n"], merged["scaler"]["counts"], merged["scaler"]["means"]
(20, {'amount': 20}, {'amount': 110.0})
>>> pipe = load_linear_pipeline(json.loads(json.dumps(merged)))
>>> pipe.predict_proba_one({"amount": 300.0})[True] > 0.5
True
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from river import compose, linear_model, optim, preprocessing

from fraud.models.scaler import merge_scalers
from fraud.schema import SchemaError

RIVER_LINEAR_VERSION: Final = 1
RIVER_LINEAR_KIND: Final = "river_linear"


def scaler_to_dict(scaler: preprocessing.StandardScaler) -> dict[str, Any]:
    """``{"counts", "means", "vars", "with_std"}`` (population variances, as River keeps)."""
    if scaler.window_size is not None:
        raise ValueError("a windowed StandardScaler has no mergeable state")
    keys = [k for k, n in scaler.counts.items() if n > 0]
    return {
        "counts": {str(k): int(scaler.counts[k]) for k in keys},
        "means": {str(k): float(scaler.means[k]) for k in keys},
        "vars": {str(k): float(scaler.vars[k]) if scaler.with_std else 0.0 for k in keys},
        "with_std": bool(scaler.with_std),
    }


def scaler_from_dict(d: Mapping[str, Any]) -> preprocessing.StandardScaler:
    with_std = bool(d.get("with_std", True))
    counts = {str(k): int(n) for k, n in d["counts"].items()}
    means = {k: float(d["means"][k]) for k in counts}
    variances = {k: float(d["vars"][k]) for k in counts}
    return preprocessing.StandardScaler._from_state(counts, means, variances, with_std=with_std)


def _constant_rate(scheduler: Any, name: str) -> float:
    if not isinstance(scheduler, optim.schedulers.Constant):
        raise ValueError(f"{name}: only a constant learning rate has a plain-data form")
    return float(scheduler.learning_rate)


def logistic_to_dict(model: linear_model.LogisticRegression) -> dict[str, Any]:
    """Weights, intercept and the hyper-parameters River needs to go on learning."""
    if type(model.optimizer) is not optim.SGD:
        raise ValueError("only LogisticRegression with optim.SGD has a plain-data form")
    if type(model.loss) is not optim.losses.Log or model.l1:
        raise ValueError("only LogisticRegression with the log loss and no l1 is supported")
    return {
        "weights": {str(k): float(w) for k, w in model._weights.items()},
        "intercept": float(model.intercept),
        "params": {
            "lr": _constant_rate(model.optimizer.lr, "optimizer.lr"),
            "l2": float(model.l2),
            "intercept_lr": _constant_rate(model.intercept_lr, "intercept_lr"),
            "clip_gradient": float(model.clip_gradient),
        },
    }


def logistic_from_dict(d: Mapping[str, Any]) -> linear_model.LogisticRegression:
    params = d["params"]
    model = linear_model.LogisticRegression(
        optimizer=optim.SGD(float(params["lr"])), l2=float(params["l2"]),
        intercept_lr=float(params["intercept_lr"]),
        clip_gradient=float(params["clip_gradient"]))
    for k, w in d["weights"].items():
        model._weights[str(k)] = float(w)
    model.intercept = float(d["intercept"])
    return model


def _parts(pipeline: compose.Pipeline) -> tuple[preprocessing.StandardScaler,
                                                 linear_model.LogisticRegression]:
    steps = list(pipeline.steps.values())
    if (len(steps) != 2 or type(steps[0]) is not preprocessing.StandardScaler
            or type(steps[1]) is not linear_model.LogisticRegression):
        raise ValueError("expected a StandardScaler | LogisticRegression pipeline")
    return steps[0], steps[1]


def export_linear_pipeline(pipeline: compose.Pipeline, n: int, n_pos: int, n_neg: int,
                           version: str = "") -> dict[str, Any]:
    """The pipeline's state as versioned plain data; ``n``/``n_pos``/``n_neg`` are the labels
    it learned (the caller counts them: River does not)."""
    scaler, logistic = _parts(pipeline)
    linear = logistic_to_dict(logistic)
    linear.update(n=int(n), n_pos=int(n_pos), n_neg=int(n_neg))
    return {"v": RIVER_LINEAR_VERSION, "kind": RIVER_LINEAR_KIND, "version": version,
            "scaler": scaler_to_dict(scaler), "linear": linear}


def check_linear_state(state: Any) -> None:
    """Raise ``SchemaError`` naming the first bad field of a :func:`export_linear_pipeline`
    state."""
    if not isinstance(state, Mapping):
        raise SchemaError("model", f"expected an object, got {type(state).__name__}")
    if state.get("v") != RIVER_LINEAR_VERSION:
        raise SchemaError("v", f"unsupported state version {state.get('v')!r}")
    if state.get("kind") != RIVER_LINEAR_KIND:
        raise SchemaError("kind", f"expected {RIVER_LINEAR_KIND!r}, got {state.get('kind')!r}")
    scaler, linear = state.get("scaler"), state.get("linear")
    if not isinstance(scaler, Mapping):
        raise SchemaError("scaler", "missing or not an object")
    if not isinstance(linear, Mapping):
        raise SchemaError("linear", "missing or not an object")
    for part in ("counts", "means", "vars"):
        if not isinstance(scaler.get(part), Mapping):
            raise SchemaError(f"scaler.{part}", "missing or not an object")
    if set(scaler["counts"]) != set(scaler["means"]) or set(scaler["counts"]) != set(
            scaler["vars"]):
        raise SchemaError("scaler", "counts, means and vars name different features")
    parts = (("scaler.counts", scaler["counts"]), ("scaler.means", scaler["means"]),
             ("scaler.vars", scaler["vars"]), ("linear.weights", linear.get("weights")))
    for part, values in parts:
        if not isinstance(values, Mapping):
            raise SchemaError(part, "missing or not an object")
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise SchemaError(f"{part}.{k}", f"expected a finite number, got {v!r}")
            if part in ("scaler.counts", "scaler.vars") and v < 0:
                raise SchemaError(f"{part}.{k}", f"must be >= 0, got {v!r}")
    for key in ("n", "n_pos", "n_neg"):
        v = linear.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SchemaError(f"linear.{key}", f"expected a count, got {v!r}")
    v = linear.get("intercept")
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise SchemaError("linear.intercept", f"expected a finite number, got {v!r}")
    params = linear.get("params")
    if not isinstance(params, Mapping):
        raise SchemaError("linear.params", "missing or not an object")
    for key in ("lr", "l2", "intercept_lr", "clip_gradient"):
        v = params.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise SchemaError(f"linear.params.{key}", f"expected a finite number, got {v!r}")


def load_linear_pipeline(state: Mapping[str, Any]) -> compose.Pipeline:
    """A ``StandardScaler | LogisticRegression`` in the exported state, ready to learn on."""
    check_linear_state(state)
    return compose.Pipeline(scaler_from_dict(state["scaler"]),
                            logistic_from_dict(state["linear"]))


def _raw(state: Mapping[str, Any]) -> tuple[dict[str, float], float]:
    """The model's weights per raw feature unit and its raw intercept."""
    scaler, linear = state["scaler"], state["linear"]
    with_std = scaler.get("with_std", True)
    means, variances = scaler["means"], scaler["vars"]
    weights: dict[str, float] = {}
    shifts = []
    for k, w in linear["weights"].items():
        if k not in means:
            continue  # River's scaler maps a feature it never saw to 0
        if with_std:
            v = float(variances[k])
            if not v:
                continue  # zero variance: scaled to 0 as well
            a = float(w) / v**0.5
        else:
            a = float(w)
        weights[k] = a
        shifts.append(a * float(means[k]))
    return weights, float(linear["intercept"]) - math.fsum(shifts)


def merge_linear_pipelines(states: Sequence[Mapping[str, Any]],
                           version: str = "") -> dict[str, Any]:
    """Exact, order-independent merge of :func:`export_linear_pipeline` states.

    Scaler statistics by Chan's formula; weights and intercept averaged in raw feature space,
    weighted by ``n``. A state with ``n == 0`` has no say (merging with it is the identity);
    one state merges to itself unchanged. Hyper-parameters come from the first state that has
    learned something. Sums are exactly rounded (``math.fsum``): the result does not depend on
    the order of ``states``.
    """
    if not states:
        raise ValueError("merge_linear_pipelines needs at least one state")
    for st in states:
        check_linear_state(st)
    if len({bool(st["scaler"].get("with_std", True)) for st in states}) > 1:
        raise ValueError("cannot merge scalers with and without with_std")
    live = [st for st in states if st["linear"]["n"] > 0]
    if len(live) <= 1:
        only = json.loads(json.dumps(live[0] if live else states[0]))
        only["version"] = version
        return dict(only)
    live.sort(key=lambda st: json.dumps(st, sort_keys=True))  # "the first": the same in any order
    with_std = bool(live[0]["scaler"].get("with_std", True))
    merged_scaler = merge_scalers([st["scaler"] for st in live])
    counts = {k: round(n) for k, n in merged_scaler["counts"].items()}
    means, variances = merged_scaler["means"], merged_scaler["vars"]
    if not with_std:
        variances = dict.fromkeys(counts, 0.0)
    ns = [float(st["linear"]["n"]) for st in live]
    total = math.fsum(ns)
    raws = [_raw(st) for st in live]
    keys = sorted({k for ws, _ in raws for k in ws})
    raw_weights = {k: math.fsum(n * ws.get(k, 0.0) for n, (ws, _) in zip(ns, raws, strict=True))
                   / total for k in keys}
    raw_intercept = math.fsum(n * c for n, (_, c) in zip(ns, raws, strict=True)) / total
    weights: dict[str, float] = {}
    for k, a in raw_weights.items():
        if with_std:
            v = variances.get(k, 0.0)
            weights[k] = a * v**0.5 if v else 0.0
        else:
            weights[k] = a
    intercept = raw_intercept + math.fsum(a * means[k] for k, a in raw_weights.items()
                                          if k in means and (not with_std or variances[k]))
    params = dict(live[0]["linear"]["params"])
    return {
        "v": RIVER_LINEAR_VERSION, "kind": RIVER_LINEAR_KIND, "version": version,
        "scaler": {"counts": counts, "means": means, "vars": variances, "with_std": with_std},
        "linear": {
            "weights": weights, "intercept": intercept, "params": params,
            "n": sum(int(st["linear"]["n"]) for st in live),
            "n_pos": sum(int(st["linear"]["n_pos"]) for st in live),
            "n_neg": sum(int(st["linear"]["n_neg"]) for st in live),
        },
    }


__all__ = [
    "RIVER_LINEAR_KIND",
    "RIVER_LINEAR_VERSION",
    "check_linear_state",
    "export_linear_pipeline",
    "load_linear_pipeline",
    "logistic_from_dict",
    "logistic_to_dict",
    "merge_linear_pipelines",
    "scaler_from_dict",
    "scaler_to_dict",
]
