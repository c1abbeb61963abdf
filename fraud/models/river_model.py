"""Any allow-listed River model (:mod:`fraud.models.river_spec`) behind the worker's model API.

:class:`RiverModel` is itself a River classifier wrapping the estimator its spec builds, and
offers what the worker calls on :class:`~fraud.models.risk.RiskModel`: ``predict_proba_one``
and ``score_and_explain_many`` (scoring learns nothing), ``learn_one`` (labels, counted here
since River keeps no counts), ``learn_unsupervised_one`` (an anomaly detector learns the
traffic there; a classifier learns only from labels), ``contributions`` (linear terms of a
``StandardScaler | LogisticRegression``; a model that cannot explain itself, a tree or
``HalfSpaceTrees``, gives the features furthest from their running mean instead, ``|z|``
over the traffic :meth:`RiverModel.learn_unsupervised_one` has shown it), ``version`` and
``n``.

State: the linear pipeline exports versioned plain data (:mod:`fraud.models.river_state`),
mergeable across parties. Every model checkpoints with River's own serialisation
(:meth:`RiverModel.to_checkpoint`): pickle, so only for a checkpoint that never leaves the
worker that wrote it.

>>> model = RiverModel()
>>> for i in range(200):
...     model.learn_one({"amount": float(i % 10), "hour": 3.0}, i % 10 > 7)
>>> model.predict_proba_one({"amount": 9.0, "hour": 3.0})[True] > 0.5
True
>>> model.contributions({"amount": 9.0, "hour": 3.0}, 1)[0][0]
'amount'
>>> clone = RiverModel.from_state(json.loads(json.dumps(model.export_state())))
>>> clone.predict_proba_one({"amount": 2.0}) == model.predict_proba_one({"amount": 2.0})
True
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import numpy as np
from river import base, compose, linear_model, preprocessing

from fraud.models.risk import ModelParams, RiskModel
from fraud.models.river_spec import LINEAR_SPEC, build_estimator, check_spec
from fraud.models.river_state import export_linear_pipeline, load_linear_pipeline
from fraud.models.scaler import RunningScaler

CHECKPOINT_HEADER: Final = b"qsfraud-river-checkpoint/1\n"


class RiverModel(base.Classifier):
    """A River model built from an allow-listed ``spec`` (see :mod:`fraud.models.river_spec`).

    Parameters
    ----------
    spec
        The steps, e.g. ``({"class": "preprocessing.StandardScaler"},
        {"class": "linear_model.LogisticRegression"})`` (the default).
    """

    def __init__(self, spec: tuple[Mapping[str, Any], ...] = LINEAR_SPEC) -> None:
        self.spec = spec
        # Any: a Pipeline, classifier or anomaly detector, told apart at run time
        self.estimator: Any = build_estimator(check_spec(list(spec)))
        self.version = "local"
        self.n = 0
        self.n_pos = 0
        self.n_neg = 0
        # the traffic's running mean/variance per feature: the reasons of a model that
        # cannot explain itself (unclipped: the furthest feature is the reason)
        self.traffic = RunningScaler(clip=float("inf"))

    @classmethod
    def _unit_test_params(cls) -> Iterator[dict[str, Any]]:
        yield {}
        yield {"spec": ({"class": "preprocessing.MinMaxScaler"},
                        {"class": "anomaly.HalfSpaceTrees", "params": {"seed": 1}})}
        yield {"spec": ({"class": "tree.HoeffdingAdaptiveTreeClassifier",
                         "params": {"seed": 1, "grace_period": 50}},)}
        yield {"spec": ({"class": "forest.ARFClassifier", "params": {"seed": 1, "n_models": 3}},)}

    @property
    def has_plain_state(self) -> bool:
        """Whether :meth:`export_state` works (``StandardScaler | LogisticRegression``)."""
        return self._linear_parts() is not None

    def runs(self, spec: Sequence[Mapping[str, Any]] | None) -> bool:
        """Whether this model is the one ``spec`` describes."""
        return spec is not None and check_spec(list(self.spec)) == check_spec(spec)

    @property
    def is_anomaly_detector(self) -> bool:
        """Whether the last step scores anomalies (learning from unlabelled traffic only)."""
        return isinstance(self.estimator, base.AnomalyDetector)

    def _linear_parts(self) -> tuple[Any, linear_model.LogisticRegression] | None:
        est = self.estimator
        if isinstance(est, compose.Pipeline):
            steps = list(est.steps.values())
            if (len(steps) == 2 and type(steps[0]) is preprocessing.StandardScaler
                    and type(steps[1]) is linear_model.LogisticRegression):
                return steps[0], steps[1]
        return None

    # -- scoring ---------------------------------------------------------------------------
    def predict_proba_one(self, x: Mapping[str, float]) -> dict[bool, float]:  # type: ignore[override]
        """``{False: 1 - p, True: p}``; an anomaly detector's score is ``p``. Learns nothing."""
        if self.is_anomaly_detector:
            p = float(self.estimator.score_one(x))
            p = 0.0 if p < 0.0 else 1.0 if p > 1.0 else p
        else:
            proba = self.estimator.predict_proba_one(x)
            p = float(proba.get(True, 0.0))
        return {False: 1.0 - p, True: p}

    def score_one(self, x: Mapping[str, float], observe: bool = False) -> float:
        """``predict_proba_one(x)[True]``; with ``observe``, :meth:`learn_unsupervised_one`
        after."""
        p = self.predict_proba_one(x)[True]
        if observe:
            self.learn_unsupervised_one(x)
        return p

    def contributions(self, x: Mapping[str, float], k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` largest positive terms ``weight * z`` of a linear pipeline, largest
        first (ties by name); for a model that cannot explain itself, the ``k`` largest
        ``|z|`` of ``x`` against the traffic seen (:meth:`deviations`)."""
        if k <= 0:
            return []
        parts = self._linear_parts()
        if parts is None:
            return self.deviations(x, k)
        scaler, logistic = parts
        weights = logistic._weights
        terms = [(str(key), float(weights[key]) * z)
                 for key, z in scaler.transform_one(dict(x)).items() if key in weights]
        terms = [t for t in terms if t[1] > 0.0]
        terms.sort(key=lambda t: (-t[1], t[0]))
        return terms[:k]

    def deviations(self, x: Mapping[str, float], k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` features of ``x`` furthest from their running mean, as ``(name, |z|)``,
        largest first (ties by name); features never seen or never varying give none."""
        terms = [(str(key), abs(z)) for key, z in self.traffic.transform_one(x).items()
                 if z != 0.0]
        terms.sort(key=lambda t: (-t[1], t[0]))
        return terms[:k]

    def score_and_explain_many(
        self, keys: tuple[str, ...], X: np.ndarray, k: int = 3, observe: bool = False
    ) -> tuple[list[float], list[list[tuple[str, float]]]]:
        """Score and explain each row of ``X`` (values of ``keys``) in order; with
        ``observe`` each row is learned by :meth:`learn_unsupervised_one` after its score."""
        if X.ndim != 2 or X.shape[1] != len(keys):
            raise ValueError(f"expected rows of {len(keys)} values, got shape {X.shape}")
        scores, explained = [], []
        for row in X.tolist():
            x = dict(zip(keys, row, strict=True))
            scores.append(self.predict_proba_one(x)[True])
            explained.append(self.contributions(x, k))
            if observe:
                self.learn_unsupervised_one(x)
        return scores, explained

    # -- learning --------------------------------------------------------------------------
    def learn_one(  # type: ignore[override]
        self, x: Mapping[str, float], y: bool | int | float, w: float = 1.0
    ) -> None:
        """Count the label; a classifier learns ``(x, y)`` (with weight ``w``), an anomaly
        detector nothing (it learns in :meth:`learn_unsupervised_one`)."""
        if y:
            self.n_pos += 1
        else:
            self.n_neg += 1
        self.n += 1
        if self.is_anomaly_detector:
            return
        if w != 1.0:
            self.estimator.learn_one(dict(x), bool(y), w=w)
        else:
            self.estimator.learn_one(dict(x), bool(y))

    def learn_unsupervised_one(self, x: Mapping[str, float]) -> None:
        """An anomaly detector learns ``x`` (any traffic); a classifier learns nothing. The
        traffic statistics of :meth:`deviations` learn ``x`` for a model that cannot explain
        itself."""
        if self._linear_parts() is None:
            self.traffic.learn_one(x)
        if self.is_anomaly_detector:
            self.estimator.learn_one(dict(x))

    # -- state -----------------------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        """Versioned plain data (``StandardScaler | LogisticRegression`` only: the one River
        model with a mergeable state); ``ValueError`` for any other."""
        if self._linear_parts() is None:
            raise ValueError("only StandardScaler | LogisticRegression has a plain-data state; "
                             "checkpoint other models with to_checkpoint()")
        assert isinstance(self.estimator, compose.Pipeline)
        state = export_linear_pipeline(self.estimator, self.n, self.n_pos, self.n_neg,
                                       self.version)
        state["spec"] = check_spec(list(self.spec))  # what to rebuild, as configured
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RiverModel:
        """Rebuild from :meth:`export_state` data (``SchemaError`` names a bad field)."""
        pipeline = load_linear_pipeline(state)
        scaler = next(iter(pipeline.steps.values()))
        linear = state["linear"]
        params = linear["params"]
        spec: tuple[dict[str, Any], ...] = (
            {"class": "preprocessing.StandardScaler",
             "params": {"with_std": bool(scaler.with_std)}},
            {"class": "linear_model.LogisticRegression", "params": {
                "optimizer": {"class": "optim.SGD", "params": {"lr": float(params["lr"])}},
                "l2": float(params["l2"]), "intercept_lr": float(params["intercept_lr"]),
                "clip_gradient": float(params["clip_gradient"])}},
        )
        if state.get("spec") is not None:
            spec = spec_tuple(state["spec"])
        model = cls(spec)
        model.estimator = pipeline
        model.version = str(state.get("version", ""))
        model.n, model.n_pos, model.n_neg = (int(linear["n"]), int(linear["n_pos"]),
                                             int(linear["n_neg"]))
        return model

    def to_checkpoint(self) -> bytes:
        """River's own serialisation (pickle) of the whole model: for a checkpoint that never
        leaves this worker; anything that crosses to another party is :meth:`export_state`."""
        return CHECKPOINT_HEADER + pickle.dumps(self)

    @classmethod
    def from_checkpoint(cls, data: bytes) -> RiverModel:
        """The model :meth:`to_checkpoint` wrote (only ever this worker's own bytes)."""
        if not data.startswith(CHECKPOINT_HEADER):
            raise ValueError("not a RiverModel checkpoint (or another version of one)")
        model = pickle.loads(data[len(CHECKPOINT_HEADER):])  # the worker's own bytes
        if not isinstance(model, cls):
            raise ValueError(f"checkpoint holds a {type(model).__name__}, not a RiverModel")
        json.dumps(list(model.spec))  # a spec is plain data; fail loudly if it is not
        return model


def spec_tuple(spec: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], ...]:
    """A validated spec in the immutable form :class:`RiverModel` takes."""
    return tuple(check_spec(spec))


def model_from_config(params: ModelParams,
                      river_model: Sequence[Mapping[str, Any]] | None) -> RiskModel | RiverModel:
    """The model a policy asks for: a :class:`RiverModel` of its ``river_model`` spec, else
    the default :class:`~fraud.models.risk.RiskModel` with ``params``."""
    if river_model is None:
        return RiskModel.from_params(params)
    return RiverModel(spec_tuple(river_model))


__all__ = ["CHECKPOINT_HEADER", "RiverModel", "model_from_config", "spec_tuple"]
