"""River models described as plain data, built from an allow-list (never ``eval``).

A spec is a list of steps, each ``{"class": "<module>.<Class>", "params": {...}}``; the steps
before the last are transformers, the last a classifier or an anomaly detector. Only the
classes and parameters in :data:`ALLOWED` are accepted, each parameter with its type checked;
an optimizer is itself a step from :data:`OPTIMIZERS`. :class:`RiverModel` runs a spec with the
interface the worker uses for :class:`~fraud.models.risk.RiskModel`.

>>> spec = check_spec([{"class": "preprocessing.StandardScaler"},
...                    {"class": "linear_model.LogisticRegression",
...                     "params": {"optimizer": {"class": "optim.SGD", "params": {"lr": 0.05}},
...                                "l2": 0.001}}])
>>> build_estimator(spec)
Pipeline (
  StandardScaler (
    with_std=True
    window_size=None
  ),
  LogisticRegression (
    optimizer=SGD (
      lr=Constant (
        learning_rate=0.05
      )
    )
    loss=Log (
      weight_pos=1.
      weight_neg=1.
    )
    l2=0.001
    l1=0.
    intercept_init=0.
    intercept_lr=Constant (
      learning_rate=0.01
    )
    clip_gradient=1e+12
    initializer=Zeros ()
  )
)
>>> check_spec([{"class": "os.system", "params": {"command": "rm -rf /"}}])
Traceback (most recent call last):
  ...
fraud.schema.SchemaError: model[0].class: not an allowed River class: 'os.system'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from river import anomaly, base, compose, forest, linear_model, optim, preprocessing, tree

from fraud.schema import SchemaError

# parameter kinds: "float" and "int" finite and >= 0, "bool", "optimizer" (a step of OPTIMIZERS)
ParamKinds = Mapping[str, str]

OPTIMIZERS: Final[dict[str, tuple[Callable[..., Any], ParamKinds]]] = {
    "optim.SGD": (optim.SGD, {"lr": "float"}),
    "optim.Adam": (optim.Adam, {"lr": "float", "beta_1": "float", "beta_2": "float",
                                "eps": "float"}),
}

_TREE: Final = {"grace_period": "int", "max_depth": "int", "delta": "float", "tau": "float"}

ALLOWED: Final[dict[str, tuple[Callable[..., Any], ParamKinds]]] = {
    "preprocessing.StandardScaler": (preprocessing.StandardScaler, {"with_std": "bool"}),
    "preprocessing.MinMaxScaler": (preprocessing.MinMaxScaler, {}),
    "linear_model.LogisticRegression": (linear_model.LogisticRegression, {
        "optimizer": "optimizer", "l2": "float", "l1": "float", "intercept_lr": "float",
        "clip_gradient": "float"}),
    "anomaly.HalfSpaceTrees": (anomaly.HalfSpaceTrees, {
        "n_trees": "int", "height": "int", "window_size": "int", "seed": "int"}),
    "tree.HoeffdingTreeClassifier": (tree.HoeffdingTreeClassifier, _TREE),
    "tree.HoeffdingAdaptiveTreeClassifier": (tree.HoeffdingAdaptiveTreeClassifier, {
        **_TREE, "bootstrap_sampling": "bool", "seed": "int"}),
    "forest.ARFClassifier": (forest.ARFClassifier, {
        **_TREE, "n_models": "int", "lambda_value": "int", "disable_weighted_vote": "bool",
        "seed": "int"}),
}
"""River class name -> (constructor, allowed parameters and their kinds)."""

LINEAR_SPEC: Final = ({"class": "preprocessing.StandardScaler", "params": {}},
                      {"class": "linear_model.LogisticRegression", "params": {}})
"""River's ``StandardScaler | LogisticRegression`` with River's defaults."""


def _check_value(field: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        if not isinstance(value, bool):
            raise SchemaError(field, f"expected true or false, got {value!r}")
        return value
    if kind == "optimizer":
        return _check_step(field, value, OPTIMIZERS)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SchemaError(field, f"expected a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise SchemaError(field, f"must be finite and >= 0, got {value!r}")
    if kind == "int":
        if value != int(value):
            raise SchemaError(field, f"expected an integer, got {value!r}")
        return int(value)
    return float(value)


def _check_step(field: str, step: Any,
                allowed: Mapping[str, tuple[Callable[..., Any], ParamKinds]]) -> dict[str, Any]:
    if not isinstance(step, Mapping):
        raise SchemaError(field, f"expected an object, got {type(step).__name__}")
    unknown = set(step) - {"class", "params"}
    if unknown:
        raise SchemaError(f"{field}.{sorted(unknown)[0]}", "unknown key")
    name = step.get("class")
    if not isinstance(name, str) or name not in allowed:
        raise SchemaError(f"{field}.class", f"not an allowed River class: {name!r}")
    params = step.get("params") or {}
    if not isinstance(params, Mapping):
        raise SchemaError(f"{field}.params", "expected an object")
    kinds = allowed[name][1]
    checked: dict[str, Any] = {}
    for key, value in params.items():
        if key not in kinds:
            raise SchemaError(f"{field}.params.{key}", f"not an allowed parameter of {name}")
        checked[key] = _check_value(f"{field}.params.{key}", kinds[key], value)
    return {"class": name, "params": checked}


def check_spec(spec: Any) -> list[dict[str, Any]]:
    """The validated, normalised spec (plain data); ``SchemaError`` names the bad field."""
    if isinstance(spec, str | bytes) or not isinstance(spec, Sequence) or not spec:
        raise SchemaError("model", "expected a non-empty list of steps")
    steps = [_check_step(f"model[{i}]", step, ALLOWED) for i, step in enumerate(spec)]
    for i, step in enumerate(steps):
        cls = ALLOWED[step["class"]][0]
        last = i == len(steps) - 1
        if last and not issubclass(cls, base.Classifier | base.AnomalyDetector):  # type: ignore[arg-type]
            raise SchemaError(f"model[{i}].class", "the last step must be a classifier or an "
                              "anomaly detector")
        if not last and not issubclass(cls, base.Transformer):  # type: ignore[arg-type]
            raise SchemaError(f"model[{i}].class", "a step before the last must be a "
                              "transformer")
        _build_step(f"model[{i}]", step, ALLOWED)  # River's own checks of its parameters
    return steps


def _build_step(field: str, step: Mapping[str, Any],
                allowed: Mapping[str, tuple[Callable[..., Any], ParamKinds]]) -> Any:
    make, kinds = allowed[step["class"]]
    params = {k: _build_step(f"{field}.params.{k}", v, OPTIMIZERS) if kinds[k] == "optimizer"
              else v for k, v in step["params"].items()}
    try:
        return make(**params)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise SchemaError(f"{field}.params", f"rejected by River: {exc}") from None


def build_estimator(spec: Any) -> base.Estimator:
    """A new, untrained River estimator (a ``compose.Pipeline`` for several steps)."""
    steps = [_build_step(f"model[{i}]", step, ALLOWED)
             for i, step in enumerate(check_spec(spec))]
    if len(steps) == 1:
        return steps[0]
    return compose.Pipeline(*steps)


__all__ = ["ALLOWED", "LINEAR_SPEC", "OPTIMIZERS", "build_estimator", "check_spec"]
